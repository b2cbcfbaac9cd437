"""When cached content was last used, for least-recently-used eviction, at no write per hit.

A hit only sets `pending[digest] = now` in memory. The batch goes to the index in one
transaction every `FLUSH_EVERY` seconds (`run`, a background task of the app) and at close.
Eviction reads this process's pending batch first, then the index: another worker's hits
of the last few seconds are not seen yet, which only makes that content look a little older
(and eviction never touches content used in its last few seconds anyway).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mirror.index import Index
from mirror.reference import Digest

log = logging.getLogger("mirror.recency")

FLUSH_EVERY = 5.0


class Recency:
    def __init__(self, index: Index) -> None:
        self.index = index
        self.pending: dict[str, float] = {}

    def touch(self, digest: Digest | str) -> None:
        self.pending[str(digest)] = time.time()

    def last_used(self, digest: str) -> float | None:
        pending = self.pending.get(digest)
        return pending if pending is not None else self.index.last_used(digest)

    def flush(self) -> int:
        """Write the pending batch now; returns how many entries it held."""
        batch = self._take()
        if batch:
            self._write(batch)
        return len(batch)

    async def run(self, every: float = FLUSH_EVERY) -> None:
        while True:
            await asyncio.sleep(every)
            batch = self._take()
            if batch:
                await asyncio.to_thread(self._write, batch)

    def _take(self) -> dict[str, float]:
        batch, self.pending = self.pending, {}
        return batch

    def _write(self, batch: dict[str, float]) -> None:
        try:
            self.index.set_last_used(batch)
        except Exception as exc:  # e.g. the disk is full: recency is best effort, retry later
            log.warning("could not record the last use of %d entries: %r", len(batch), exc)
            for digest, at in batch.items():
                self.pending.setdefault(digest, at)
