"""Single flight within one process: concurrent callers of one key share one run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    """In-process: concurrent calls with one key share one run of the work.

    The work runs as its own task, so the caller that started it may be cancelled (its
    client left) without cancelling it for the others.
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, asyncio.Task[Any]] = {}

    async def do(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._pending[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        result: T = await asyncio.shield(task)
        return result

    def _forget(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may be gone
