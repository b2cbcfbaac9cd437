"""The background scrub: re-hash cached content at a bounded rate and evict what fails.

Reads check a file's length against its record (`Store.open`); the scrub catches the damage
a length cannot show (flipped bits, overwritten blocks). It walks the content records in
digest order, `scrub_rate` bytes per second at most, one process at a time (the `scrub`
lock in the metadata store), and carries on from where it stopped after a restart of the
lock's holder only roughly: a new holder starts from the beginning.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time

from mirror.evict import lock_owner
from mirror.reference import Digest, parse_digest
from mirror.store import CHUNK, Store

log = logging.getLogger("mirror.scrub")

LEASE = 120.0  # seconds the scrub lock lasts unless renewed
PAUSE = 60.0  # seconds between passes, and before retrying a lock another process holds


class Scrubber:
    def __init__(self, store: Store, rate: int, pause: float = PAUSE) -> None:
        self.store = store
        self.rate = rate  # bytes per second
        self.pause = pause
        self.owner = lock_owner()
        self.checked = 0  # entries re-hashed (tests, metrics)
        self.bad = 0

    async def run(self) -> None:
        if self.rate <= 0:
            return
        while True:
            try:
                if await self.store.metadata.acquire("scrub", self.owner, LEASE):
                    await self.scrub_all()
            except Exception:  # keep scrubbing later; one bad entry must not stop it
                log.exception("scrub pass failed")
            await asyncio.sleep(self.pause)

    async def scrub_all(self) -> None:
        """One pass over every content record (the lock is renewed as it goes)."""
        metadata = self.store.metadata
        renewed = time.monotonic()
        async for record in metadata.iter_content():
            if time.monotonic() - renewed > LEASE / 3:
                if not await metadata.acquire("scrub", self.owner, LEASE):
                    return  # lost the lock: another process scrubs now
                renewed = time.monotonic()
            await self.scrub(record.digest)

    async def scrub(self, text: str) -> bool:
        """Re-hash one entry at the bounded rate; evict it if it fails. True if it is good."""
        digest = parse_digest(text)
        if self.store.remote is not None:
            return await self._scrub_object(digest)
        opened = await self.store.open(digest)
        if opened is None:
            return False  # gone, or damaged (removed by `open`)
        fd, size = opened
        hasher = hashlib.new(digest.algorithm)
        pos = 0
        try:
            while pos < size:
                started = time.monotonic()
                data = await asyncio.to_thread(os.pread, fd, min(CHUNK, size - pos), pos)
                if not data:
                    break
                await asyncio.to_thread(hasher.update, data)
                pos += len(data)
                # Pace: this chunk's share of a second at `rate` bytes per second.
                await asyncio.sleep(max(len(data) / self.rate - (time.monotonic() - started),
                                        0.0))
        finally:
            os.close(fd)
        self.checked += 1
        if pos == size and hasher.hexdigest() == digest.hex:
            return True
        self.bad += 1
        await self.store.damaged(digest, f"scrub: content hashes to {hasher.hexdigest()}")
        return False

    async def _scrub_object(self, digest: Digest) -> bool:
        """The object store's copy (the source of truth), streamed at the bounded rate."""
        remote = self.store.remote
        assert remote is not None
        record = await self.store.record(digest)
        if record is None:
            return False
        hasher = hashlib.new(digest.algorithm)
        size = 0
        try:
            async for chunk in remote.read(digest):
                started = time.monotonic()
                await asyncio.to_thread(hasher.update, chunk)
                size += len(chunk)
                await asyncio.sleep(max(len(chunk) / self.rate - (time.monotonic() - started),
                                        0.0))
        except FileNotFoundError:
            await self.store.metadata.drop_content([str(digest)])
            return False
        self.checked += 1
        if size == record.size and hasher.hexdigest() == digest.hex:
            return True
        self.bad += 1
        await self.store.damaged(digest, f"scrub: object hashes to {hasher.hexdigest()}")
        return False
