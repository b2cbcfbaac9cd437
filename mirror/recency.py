"""When cached content was last used, for least-recently-used eviction, at no write per hit.

A hit only sets `pending[digest] = now` in memory. The batch goes to the metadata store in
one write every `FLUSH_EVERY` seconds (`run`, a background task of the app) and at close.
Eviction sees other processes' hits of the last few seconds late, which only makes that
content look a little older (and eviction never touches content used in its last seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mirror.metadata import Metadata
from mirror.reference import Digest

log = logging.getLogger("mirror.recency")

FLUSH_EVERY = 5.0
MAX_PENDING = 100_000  # flush early past this many distinct digests: memory stays bounded


class Recency:
    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self.pending: dict[str, float] = {}

    def touch(self, digest: Digest | str) -> None:
        self.pending[str(digest)] = time.time()

    async def last_used(self, digest: str) -> float | None:
        pending = self.pending.get(digest)
        if pending is not None:
            return pending
        record = await self.metadata.content(digest)
        return None if record is None else record.used

    async def flush(self) -> int:
        """Write the pending batch now; returns how many entries it held."""
        batch, self.pending = self.pending, {}
        if not batch:
            return 0
        try:
            await self.metadata.touch(batch)
        except Exception as exc:  # e.g. the disk is full: recency is best effort, retry later
            log.warning("could not record the last use of %d entries: %r", len(batch), exc)
            for digest, at in batch.items():
                if len(self.pending) < MAX_PENDING:
                    self.pending.setdefault(digest, at)
        return len(batch)

    async def run(self, every: float = FLUSH_EVERY) -> None:
        while True:
            waited = 0.0
            while waited < every and len(self.pending) < MAX_PENDING:
                await asyncio.sleep(min(every, 0.5))
                waited += min(every, 0.5)
            await self.flush()
