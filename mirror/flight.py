"""Single flight: concurrent callers of one key share one run of the work, within one
process (`SingleFlight`) and across worker processes (`exclusive`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from mirror.errors import UpstreamTimeout
from mirror.locks import FillLock, lock_is_held
from mirror.store import POLL, Store

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


async def exclusive(store: Store, name: str, timeout: float) -> FillLock | None:
    """Across processes: take the lock `name`, or wait for its holder to finish (None).

    Callers re-check the shared result after a None: the holder produced it.
    """
    lock = FillLock(store.locks / f"{name}.lock")
    if lock.acquire():
        return lock
    deadline = time.monotonic() + timeout
    while lock_is_held(lock.path):
        if time.monotonic() > deadline:
            raise UpstreamTimeout(f"timed out waiting for another worker fetching {name}")
        await asyncio.sleep(POLL)
    return None
