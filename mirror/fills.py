"""Fills: one upstream download per digest, shared by every client in every worker.

The process that wins the digest's `FillLock` runs the download as a background task (it
belongs to no client, so a client leaving never cuts it short) into `tmp/<digest>.part`,
verifies length and digest, and renames the partial into place. Every client, including
the one that started the fill, reads the file: clients in the filling process are woken
as bytes land; clients in other worker processes poll the file's size and the lock.

The bytes themselves move in a thread of their own (`mirror.datapath`: read, hash, write,
resume a broken body, feed the object store); how clients read what a fill writes is
`mirror.readers`.

When the disk is full (ENOSPC, EDQUOT) the fill detaches from the cache (`_detach`) and
relays the rest of the blob from memory to the readers it has (`mirror.relay`): they still
get every (verified) byte, nothing is cached, and new clients start a new fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from mirror.cluster import Cluster, Holder
from mirror.datapath import MAX_THREADS, DigestMismatch, Fetch, Pump
from mirror.errors import RegistryError, UpstreamError, UpstreamTimeout
from mirror.locks import FillLock, lock_is_held
from mirror.metrics import Metrics
from mirror.objectstore import Writer
from mirror.readers import Fill, LocalReader, Reader, RemoteReader
from mirror.reference import Digest
from mirror.relay import Relay
from mirror.store import DISK_FULL, POLL, Store
from mirror.upstream import Streamed

log = logging.getLogger("mirror.fills")

__all__ = ["DigestMismatch", "Fetch", "Fills"]


class Fills:
    def __init__(self, store: Store, wait_timeout: float = 60.0,
                 metrics: Metrics | None = None, max_size: int = 10 * 10**9,
                 deadline: float = 3600.0) -> None:
        self.store = store
        self.metrics = metrics
        self.wait_timeout = wait_timeout
        self.max_size = max_size  # no blob is longer (max_layer_size)
        self.deadline = deadline  # seconds a whole download may take (upstream_deadline)
        self.active: dict[Digest, Fill] = {}
        self.cluster: Cluster | None = None  # replicas to share downloads with
        self._tasks: set[asyncio.Task[None]] = set()
        self._threads = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="fill")

    async def open(self, digest: Digest, fetch: Fetch, upstream: str = "", *,
                   cached: bool = True, expected: int | None = None) -> Reader:
        """A reader over `digest`: from the cache, or following a (new or running) fill.

        `upstream` names where a new fill downloads from (the holder it records). With
        `cached` False, bytes already committed may not serve this read (that upstream has
        not delivered them itself: see `mirror.access`): it follows a fill from the same
        upstream, or runs a private fill that no one else joins. `expected`: the exact
        length, when that upstream said.
        """
        for _ in range(5):
            if cached:
                reader = await self._committed(digest)
                if reader:
                    self._count("hit")
                    return reader
            elif await self.store.committed_size(digest) is not None:
                return await self._own(digest, fetch, upstream, expected)
            fill = self.active.get(digest)
            if fill is not None:
                if not cached and fill.upstream != upstream:
                    return await self._own(digest, fetch, upstream, expected)
                self._joined()
            else:
                lock = FillLock(self.store.lock_path(digest))
                if lock.acquire():
                    if await self.store.committed_size(digest) is not None:
                        lock.release()
                        continue
                    claim = None
                    if self.cluster is not None:  # one download for the whole cluster
                        claimed = await self.cluster.claim(digest, upstream)
                        if isinstance(claimed, Holder):  # another replica downloads it
                            lock.release()
                            if not cached and claimed.upstream != upstream:
                                # From another upstream: not bytes this read may have.
                                return await self._own(digest, fetch, upstream, expected)
                            reader = await self.cluster.follow(claimed.address, digest)
                            self._joined()
                            self._count("miss")
                            return reader
                        claim = claimed
                    fill = self._start(digest, lock, fetch, upstream, expected)
                    fill.claim = claim
            if fill is not None:
                await fill.started.wait()
                if fill.error is not None and fill.size is None:
                    raise fill.error
                if fill.fd < 0:
                    continue  # finished or failed meanwhile: look again
                self._count("miss")
                return LocalReader(os.dup(fill.fd), fill)
            remote = await self._follow_remote(digest, None if cached else upstream)
            if isinstance(remote, Reader):
                self._joined()
                self._count("miss")
                return remote
            if remote == "elsewhere":
                return await self._own(digest, fetch, upstream, expected)
        raise UpstreamError(f"could not fetch {digest}: the download kept failing")

    async def serve_peer(self, digest: Digest) -> Reader | None:
        """For another replica following a fill of ours: its bytes from this host (the fill
        in this process, another worker's, or the content once committed)."""
        fill = self.active.get(digest)
        if fill is not None:
            await fill.started.wait()
            if fill.fd >= 0:
                return LocalReader(os.dup(fill.fd), fill)
        reader = await self._committed(digest)
        if reader is not None:
            return reader
        remote = await self._follow_remote(digest, None)
        return remote if isinstance(remote, Reader) else None

    async def _own(self, digest: Digest, fetch: Fetch, upstream: str,
                   expected: int | None) -> Reader:
        """A private fill: its bytes come from `upstream` itself, whatever the cache has."""
        fill = self._start(digest, None, fetch, upstream, expected)
        await fill.started.wait()
        if fill.error is not None and fill.size is None:
            raise fill.error
        self._count("miss")
        return LocalReader(os.dup(fill.fd), fill)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.lookups.labels("blob", result).inc()

    def _joined(self) -> None:
        if self.metrics is not None:
            self.metrics.fill_joins.inc()

    async def _committed(self, digest: Digest) -> Reader | None:
        reader = await self.store.reader(digest)
        if reader is not None:
            self.store.recency.touch(digest)
        return reader

    def _start(self, digest: Digest, lock: FillLock | None, fetch: Fetch, upstream: str,
               expected: int | None) -> Fill:
        """A fill under `lock` (shared: in `active`, its partial followed by other workers),
        or without one (private: its own partial, joined by no one)."""
        fill = Fill(digest)
        fill.upstream = upstream
        fill.expected = expected
        if lock is None:
            fill.private = self.store.tmp / (
                f"{digest.algorithm}-{digest.hex}.{os.getpid()}-{id(fill):x}.own")
        log.debug("fill of %s started in process %d", digest, os.getpid())
        if lock is not None:
            self.active[digest] = fill
        if self.metrics is not None:
            self.metrics.fills.inc()
        task = asyncio.create_task(self._run(fill, lock, fetch), name=f"fill {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def _follow_remote(self, digest: Digest,
                             upstream: str | None) -> Reader | str | None:
        """Wait for another process's fill to announce its size; None if it went away,
        "elsewhere" if it downloads from another upstream than `upstream` (when given)."""
        deadline = time.monotonic() + self.wait_timeout
        size_path = self.store.size_path(digest)
        while time.monotonic() < deadline:
            try:
                text = size_path.read_text()
                fd = os.open(self.store.partial_path(digest), os.O_RDONLY)
            except FileNotFoundError:
                if self.store.has(digest) or not lock_is_held(self.store.lock_path(digest)):
                    return None
                await asyncio.sleep(POLL)
                continue
            size, _, source = text.partition("\n")
            if upstream is not None and source != upstream:
                os.close(fd)
                return "elsewhere"
            return RemoteReader(fd, int(size) if size.strip() else None, self.store, digest)
        raise UpstreamTimeout(f"timed out waiting for another worker's download of {digest}")

    async def _run(self, fill: Fill, lock: FillLock | None, fetch: Fetch) -> None:
        digest = fill.digest
        part = fill.private or self.store.partial_path(digest)
        size_path = self.store.size_path(digest) if fill.private is None else None
        fd = -1
        fill.lock = lock
        upload: Writer | None = None
        try:
            for stale in (part, size_path):
                with contextlib.suppress(FileNotFoundError):
                    if stale is not None:
                        stale.unlink()
            # However the upstream behaves, a fill ends by this deadline.
            async with asyncio.timeout(self.deadline):
                if self.store.remote is not None:  # content lives there: stream it up too
                    fill.upload = upload = await self.store.remote.writer(digest)
                response = await fetch(0)
                try:
                    fill.size = self._announced(fill, response)
                    try:
                        fill.fd = fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                        if size_path is not None:
                            tmp = size_path.with_suffix(f".{os.getpid()}")
                            try:
                                tmp.write_text(("" if fill.size is None else str(fill.size))
                                               + "\n" + fill.upstream)
                                os.rename(tmp, size_path)
                            finally:
                                tmp.unlink(missing_ok=True)
                    except OSError as exc:
                        if exc.errno not in DISK_FULL:
                            raise
                        if fd < 0:  # not even an empty partial: readers need an fd all the same
                            fill.fd = fd = os.memfd_create("relay")
                        self._detach(fill, 0)
                    fill.started.set()
                    await Pump(fill, fd, fetch, max_size=self.max_size, metrics=self.metrics,
                               detach=self._detach, threads=self._threads).run(response)
                finally:
                    await response.aclose()
            if fill.relay is None:
                if upload is not None:  # verified: now, and only now, the object appears
                    await upload.complete()
                await self.store.commit(digest, part, fill.upstream or None,
                                        uploaded=upload is not None)
            elif upload is not None:
                await upload.abort()  # relayed past a full disk: nothing is cached
            fill.committed = True  # verified: readers may have the last byte
        except BaseException as exc:
            if upload is not None:
                await upload.abort(exc)  # nothing half-written ever becomes visible
            if isinstance(exc, TimeoutError):
                exc = UpstreamTimeout(f"download of {digest} did not finish within "
                                      f"{self.deadline:g} s")
            fill.error = exc
            if self.metrics is not None and not isinstance(exc, asyncio.CancelledError):
                reason = ("digest_mismatch" if isinstance(exc, DigestMismatch)
                          else "upstream" if isinstance(exc, RegistryError) else "error")
                self.metrics.fill_failures.labels(reason).inc()
            if fill.relay is None:  # once detached, the paths may be another fill's
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
            if not isinstance(exc, RegistryError | asyncio.CancelledError):
                log.warning("fill of %s failed: %r", digest, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if fill.relay is None and size_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    size_path.unlink()
            if fd >= 0:
                os.close(fd)
            fill.fd = -1
            if lock is not None:
                lock.release()
            if fill.claim is not None:
                await fill.claim.release()
            if self.active.get(digest) is fill:
                del self.active[digest]
            if self.metrics is not None:
                self.metrics.fills.dec()
            fill.started.set()
            fill.notify()

    def _announced(self, fill: Fill, response: Streamed) -> int | None:
        """The length the fill must reach, checked against what we know before any byte."""
        length = response.headers.get("content-length", "")
        size = int(length) if length.isascii() and length.isdigit() else None
        if size is not None and fill.expected is not None and size != fill.expected:
            raise DigestMismatch(f"upstream announced {size} bytes for {fill.digest}, "
                                 f"its descriptor says {fill.expected}")
        size = size if size is not None else fill.expected
        if size is not None and size > self.max_size:
            raise UpstreamError(f"upstream announced {size} bytes for {fill.digest}, over "
                                f"the limit of {self.max_size}")
        return size

    def _detach(self, fill: Fill, start: int) -> None:
        """The disk is full: stop caching `fill`, relay the rest to its readers from memory.

        Its partial and size file go (followers in other workers see the partial unlinked
        and give up: their clients retry), its lock is released and it leaves `active`, so
        new clients start a new fill: cached if there is room by then, else relayed too.
        """
        digest = fill.digest
        fill.relay = Relay(start, fill.followers)
        if self.metrics is not None:
            self.metrics.fill_failures.labels("disk_full").inc()
        for path in (self.store.partial_path(digest), self.store.size_path(digest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if fill.lock is not None:
            fill.lock.release()
        if self.active.get(digest) is fill:
            del self.active[digest]
        log.warning("cache disk full: %s relayed to its %d reader(s) from byte %d, not cached",
                    digest, len(fill.followers), start)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._threads.shutdown(wait=False)  # the cancelled downloads have joined theirs
