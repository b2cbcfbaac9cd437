"""The bounded in-memory relay a fill falls back to when the cache's disk is full.

On ENOSPC a fill stops caching (`Fills._detach`) but keeps downloading, to relay the rest of
the blob to the readers already following it in this process. They read what reached the
disk from their descriptor of the (now unlinked) partial, and everything from `start` on
from here. Memory stays bounded: only bytes a reader still needs are kept, at most `LIMIT`
past the slowest reader. The download waits for room (backpressure, so the fastest reader
goes at the pace of the slowest), and drops a reader that has not moved for `STALL` seconds
(its stream is cut, as for any failed download). With no reader left the download stops:
nobody would get the bytes, and they are not cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Set
from typing import Protocol

from mirror.errors import StreamAborted, UpstreamError

LIMIT = 8 << 20  # bytes held past the slowest reader
STALL = 30.0  # seconds the slowest reader may hold the download up before it is dropped
ORPHAN_WAIT = 5.0  # seconds to wait for a first reader (or a reader to come back) before stopping


class Follower(Protocol):
    pos: int  # the next byte this reader will ask for
    dropped: bool


class NoFollowers(UpstreamError):
    """Every reader of a relayed download left: it stops (nothing is cached anyway)."""


class Relay:
    def __init__(self, start: int, followers: Set[Follower], limit: int = LIMIT,
                 stall: float = STALL) -> None:
        self.start = start  # bytes before this offset are in the partial file
        self.base = start  # first byte still held
        self.end = start  # one past the last byte received
        self.followers = followers  # the fill's readers: a live view, they come and go
        self.limit = limit
        self.stall = stall
        self._chunks: deque[bytes] = deque()
        self._moved = asyncio.Event()

    @property
    def held(self) -> int:
        return self.end - self.base

    def read(self, follower: Follower, pos: int, size: int) -> bytes:
        """Up to `size` bytes at `pos` (>= start); b"" if they have not arrived yet."""
        if follower.dropped or pos < self.base:
            raise StreamAborted("reader fell behind a download relayed past a full disk")
        offset = self.base
        for chunk in self._chunks:
            if pos < offset + len(chunk):
                return chunk[pos - offset:pos - offset + size]
            offset += len(chunk)
        return b""

    def moved(self) -> None:
        """A reader came, read on or left: drop what nobody needs now, wake the download."""
        keep = self._needed(self._live())
        while self._chunks and self.base + len(self._chunks[0]) <= keep:
            self.base += len(self._chunks.popleft())
        self._moved.set()

    async def put(self, data: bytes) -> None:
        """Append `data` once there is room for it (see the module's description)."""
        since = time.monotonic()
        while True:
            live = self._live()
            if live and self.end - self._needed(live) <= self.limit:
                break
            waited = time.monotonic() - since
            if not live and waited >= ORPHAN_WAIT:
                raise NoFollowers("every reader of the relayed download left")
            if live and waited >= self.stall:
                slowest = self._needed(live)
                for follower in live:
                    if max(follower.pos, self.start) <= slowest:
                        follower.dropped = True
                self.moved()
                since = time.monotonic()
                continue
            self._moved.clear()
            timeout = (self.stall if live else ORPHAN_WAIT) - waited
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), timeout)
        self._chunks.append(data)
        self.end += len(data)

    def _live(self) -> list[Follower]:
        return [f for f in self.followers if not f.dropped]

    def _needed(self, live: list[Follower]) -> int:
        """The first byte some live reader still needs (past the end: none)."""
        return min((max(f.pos, self.start) for f in live), default=self.end)
