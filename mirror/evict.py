"""Keeping the cache under its byte budget: the least recently used content goes first.

Usage comes from the metadata store's running totals (every commit and removal keeps them),
so a pass never walks the disk: it reads unpinned content in order of last use from an index
and removes until the total is under `LOW_WATER` of the budget. Every worker (and replica)
runs an evictor; they take turns through the `evict` lock in the metadata store. A commit
in this process that passes the budget wakes its evictor at once.

Never removed:
- pinned content;
- content used (or committed) in the last `GRACE` seconds, whatever the budget: a follower
  in another worker may not have seen the commit yet, and it is in use;
- fills in progress: they are not content yet.
Removal is unlink(2): a client already reading the file keeps its descriptor and gets every
byte; the next request misses and fetches again. Tag records stay: offline serving falls
back to them, and a tag whose manifest was evicted simply misses (online: refetched).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

from mirror.metrics import Metrics
from mirror.reference import parse_digest
from mirror.store import Store

log = logging.getLogger("mirror.evict")

RESCAN = 60.0  # seconds between passes when nothing wakes the evictor earlier
GRACE = 2.0  # content used this recently stays, even over budget
LOW_WATER = 0.9  # a pass frees down to this fraction of the budget
DEFAULT_SHARE = 0.8  # default budget: this share of the room the cache has at start
MIN_INTERVAL = 1.0  # seconds between two passes of one process
LEASE = 300.0  # seconds the evict lock is held at most (a dead evictor's lock expires)


@dataclass(frozen=True, slots=True)
class Pass:
    total: int  # bytes under blobs/ after the pass
    entries: int  # entries under blobs/ after the pass
    removed: int  # entries removed
    freed: int  # bytes removed
    kept_recent: bool  # over budget still, because of content used within GRACE


def default_budget(store: Store, held: int) -> int:
    """`DEFAULT_SHARE` of the room the cache has: what it holds plus the free space.

    Counting what it holds keeps the budget stable across restarts (a fuller cache has less
    free space left), so a restart does not evict what the previous run was allowed to keep.
    """
    st = os.statvfs(store.root)
    return int(DEFAULT_SHARE * (held + st.f_bavail * st.f_frsize))


def lock_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


async def evict_once(store: Store, budget: int, grace: float = GRACE,
                     owner: str | None = None) -> Pass | None:
    """One pass; None if another process is evicting right now."""
    metadata = store.metadata
    owner = owner or lock_owner()
    if not await metadata.acquire("evict", owner, LEASE):
        return None
    try:
        await restore_pins(store)
        await store.recency.flush()  # this process's hits count in the order
        total, entries = await metadata.totals()
        if total <= budget:
            return Pass(total, entries, 0, 0, False)
        target = int(budget * LOW_WATER)
        now = time.time()
        removed = freed = 0
        async for record in metadata.oldest(before=now - grace):
            if total <= target:
                break
            pending = store.recency.pending.get(record.digest)
            if pending is not None and now - pending < max(grace, 1.0):
                continue  # used here since the flush: in use
            with contextlib.suppress(Exception):
                await store.remove(parse_digest(record.digest))
                removed += 1
                freed += record.size
                total -= record.size
        return Pass(total, entries - removed, removed, freed, total > budget)
    finally:
        await metadata.release("evict", owner)


async def restore_pins(store: Store) -> None:
    """With an object store, pins live in the bucket too: after the metadata store lost
    them (flushed, replaced), they come back before any eviction could take pinned content.
    The `pins-restored` lock, taken for good, marks a metadata store that has them."""
    if store.remote is None:
        return
    if not await store.metadata.acquire("pins-restored", "restored", 10 * 365 * 86400.0):
        return
    restored = 0
    async for owner, digests in store.remote.iter_pins():
        await store.metadata.pin(owner, digests)
        restored += 1
    if restored:
        log.info("restored %d pins from the object store", restored)


def trim_local(store: Store, budget: int) -> int:
    """Keep the local copies of object-store content within `budget` bytes, least recently
    used (by mtime, refreshed on use) first; returns the bytes removed. Blocking."""
    entries = sorted((e for e in store.entries() if e.digest is not None),
                     key=lambda e: e.mtime)
    total = sum(e.size for e in entries)
    freed = 0
    for entry in entries:
        if total - freed <= budget:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            freed += entry.size
    return freed


class Evictor:
    """The background task that keeps one process's view of usage and runs passes."""

    def __init__(self, store: Store, budget: int | None, grace: float = GRACE,
                 metrics: Metrics | None = None, local_budget: int | None = None) -> None:
        """`local_budget`: with an object store, the bytes of local copies to keep."""
        self.store = store
        self.local_budget = local_budget
        self.metrics = metrics
        self.budget = budget  # None: computed (default_budget) by the first pass
        self.grace = grace
        self.used = 0  # bytes of content: the last pass's total plus commits since
        self.passes = 0
        self.stuck = False  # over budget with nothing left to evict (pinned content)
        self._since = 0  # bytes committed while a pass runs
        self._wake = asyncio.Event()
        self.owner = lock_owner()

    def committed(self, size: int) -> None:
        """Called on every commit in this process (`Store.on_commit`): cheap."""
        self.used += size
        self._since += size
        if self.metrics is not None:
            self.metrics.cache_bytes.set(self.used)
            self.metrics.cache_entries.inc()
        if self.budget is not None and self.used > self.budget:
            self._wake.set()

    async def _pass(self) -> Pass | None:
        if self.local_budget is not None:
            await asyncio.to_thread(trim_local, self.store, self.local_budget)
        if self.budget is None and self.store.remote is not None:
            return None  # a bucket has no free space to take a share of: no budget, no pass
        if self.budget is None:
            held, _ = await self.store.metadata.totals()
            self.budget = default_budget(self.store, held)
            log.info("cache budget %d bytes (%d%% of the room the cache has; holding %d)",
                     self.budget, DEFAULT_SHARE * 100, held)
        return await evict_once(self.store, self.budget, self.grace, self.owner)

    async def run(self) -> None:
        wait = 0.0  # the first pass runs at once: it learns the usage (and the budget)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            self._since = 0
            try:
                result = await self._pass()
            except Exception:
                log.exception("eviction pass failed")
                result = None
            self.passes += 1
            if result is None:  # another process is evicting (or we failed): look again soon
                wait = MIN_INTERVAL
                continue
            self.used = result.total + self._since
            if self.metrics is not None:
                self.metrics.cache_bytes.set(self.used)
                self.metrics.cache_entries.set(result.entries)
                self.metrics.cache_budget.set(self.budget or 0)
                self.metrics.evictions.inc(result.removed)
                self.metrics.evicted_bytes.inc(result.freed)
            if result.removed:
                log.info("evicted %d entries (%d bytes); the cache holds %d of %d bytes",
                         result.removed, result.freed, result.total, self.budget)
            stuck = result.total > (self.budget or 0) and not result.kept_recent
            if stuck and not self.stuck:
                log.warning("the cache holds %d bytes, over its budget of %d, and all of it "
                            "is pinned: raise max_cache_size or unpin", result.total,
                            self.budget)
            self.stuck = stuck
            # Over budget only because of recent content: look again once it has aged.
            wait = self.grace + 0.1 if result.kept_recent else RESCAN
            await asyncio.sleep(MIN_INTERVAL)
