"""Fills: one upstream download per digest, shared by every client in every worker.

The process that wins the digest's `FillLock` runs the download as a background task (it
belongs to no client, so a client leaving never cuts it short) into `tmp/<digest>.part`,
verifies length and digest, and renames the partial into place. Every client, including
the one that started the fill, reads the file: clients in the filling process are woken
as bytes land; clients in other worker processes poll the file's size and the lock.

A reader never hands out the blob's last byte before the blob is committed, so a client
can only ever see a complete body that was verified; on failure its stream is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

from mirror.errors import RegistryError, StreamAborted, UpstreamError, UpstreamTimeout
from mirror.reference import Digest
from mirror.store import CHUNK, FillLock, Store, lock_is_held

log = logging.getLogger("mirror.fills")

POLL = 0.005  # how often followers in other processes look at a fill's progress
FLUSH_INTERVAL = 0.05  # hand slow downloads to readers at least this often
Fetch = Callable[[], Awaitable[httpx.Response]]


class DigestMismatch(UpstreamError):
    """The upstream sent bytes that do not match the digest or the announced length."""


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


class Fill:
    """A download in progress in this process."""

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.size: int | None = None
        self.written = 0
        self.committed = False
        self.error: BaseException | None = None
        self.started = asyncio.Event()  # size known, or failed
        self.readers = 0
        self._progress = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None

    def notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), timeout)


class Reader:
    """Streams a blob from a file descriptor: committed content or a growing partial."""

    def __init__(self, fd: int, size: int | None) -> None:
        self.fd = fd
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # How much may be read now, and whether the content is verified and complete.
    def progress(self) -> tuple[int, bool]:
        return os.fstat(self.fd).st_size, True

    def failed(self) -> bool:
        return False

    async def wait(self) -> None:
        await asyncio.sleep(POLL)

    async def chunks(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """Bytes [start, end) (end None: to the end of the blob); the fd is closed after."""
        pos = start
        try:
            while True:
                available, committed = self.progress()
                stop = end if end is not None else (available if committed else None)
                if stop is not None and pos >= stop:
                    return
                limit = available if committed else available - 1  # keep back the last byte
                if stop is not None:
                    limit = min(limit, stop)
                if limit > pos:
                    data = await asyncio.to_thread(os.pread, self.fd, min(CHUNK, limit - pos), pos)
                    if not data:
                        raise StreamAborted(f"blob {self.size} bytes ended early at {pos}")
                    pos += len(data)
                    yield data
                elif self.failed():
                    raise StreamAborted("upstream download failed")
                else:
                    await self.wait()
        finally:
            self.close()


class LocalReader(Reader):
    """Follows a fill running in this process."""

    def __init__(self, fd: int, fill: Fill) -> None:
        super().__init__(fd, fill.size)
        self.fill = fill
        fill.readers += 1

    def progress(self) -> tuple[int, bool]:
        return self.fill.written, self.fill.committed

    def failed(self) -> bool:
        return self.fill.error is not None

    async def wait(self) -> None:
        await self.fill.wait(1.0)

    def close(self) -> None:
        if self.fd >= 0:
            self.fill.readers -= 1
        super().close()


class RemoteReader(Reader):
    """Follows a fill running in another worker process, through the file system."""

    def __init__(self, fd: int, size: int | None, store: Store, digest: Digest) -> None:
        super().__init__(fd, size)
        self.store = store
        self.digest = digest

    def progress(self) -> tuple[int, bool]:
        try:
            final = os.stat(self.store.path(self.digest))
        except FileNotFoundError:
            return os.fstat(self.fd).st_size, False
        if final.st_ino != os.fstat(self.fd).st_ino:
            # Our partial was abandoned and someone else committed: read theirs.
            fd = os.open(self.store.path(self.digest), os.O_RDONLY)
            os.close(self.fd)
            self.fd = fd
        return final.st_size, True

    def failed(self) -> bool:
        return not lock_is_held(self.store.lock_path(self.digest)) and not self.store.has(
            self.digest)


class Fills:
    def __init__(self, store: Store, wait_timeout: float = 60.0) -> None:
        self.store = store
        self.wait_timeout = wait_timeout
        self.active: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.joined = 0  # clients that joined a fill someone else started

    async def open(self, digest: Digest, fetch: Fetch) -> Reader:
        """A reader over `digest`: from the cache, or following a (new or running) fill."""
        for _ in range(5):
            reader = self._committed(digest)
            if reader:
                return reader
            fill = self.active.get(digest)
            if fill is not None:
                self.joined += 1
            else:
                lock = FillLock(self.store.lock_path(digest))
                if lock.acquire():
                    if self.store.has(digest):
                        lock.release()
                        continue
                    fill = self._start(digest, lock, fetch)
            if fill is not None:
                await fill.started.wait()
                if fill.error is not None and fill.size is None:
                    raise fill.error
                try:
                    fd = os.open(self.store.partial_path(digest), os.O_RDONLY)
                except FileNotFoundError:
                    continue  # finished or failed between the two lines: look again
                return LocalReader(fd, fill)
            reader = await self._follow_remote(digest)
            if reader:
                self.joined += 1
                return reader
        raise UpstreamError(f"could not fetch {digest}: the download kept failing")

    def _committed(self, digest: Digest) -> Reader | None:
        try:
            fd = os.open(self.store.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        return Reader(fd, os.fstat(fd).st_size)

    def _start(self, digest: Digest, lock: FillLock, fetch: Fetch) -> Fill:
        fill = Fill(digest)
        log.debug("fill of %s started in process %d", digest, os.getpid())
        self.active[digest] = fill
        task = asyncio.create_task(self._run(fill, lock, fetch), name=f"fill {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def _follow_remote(self, digest: Digest) -> Reader | None:
        """Wait for another process's fill to announce its size; None if it went away."""
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
            return RemoteReader(fd, int(text) if text.strip() else None, self.store, digest)
        raise UpstreamTimeout(f"timed out waiting for another worker's download of {digest}")

    async def _run(self, fill: Fill, lock: FillLock, fetch: Fetch) -> None:
        digest = fill.digest
        part = self.store.partial_path(digest)
        size_path = self.store.size_path(digest)
        fd = -1
        try:
            for stale in (part, size_path):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            response = await fetch()
            try:
                length = response.headers.get("content-length")
                fill.size = int(length) if length and length.isdigit() else None
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                tmp = size_path.with_suffix(f".{os.getpid()}")
                tmp.write_text("" if fill.size is None else str(fill.size))
                os.rename(tmp, size_path)
                fill.started.set()
                await self._download(fill, fd, response)
            finally:
                await response.aclose()
            self.store.commit(digest, part)
            fill.committed = True
        except BaseException as exc:
            fill.error = exc
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            if not isinstance(exc, RegistryError | asyncio.CancelledError):
                log.warning("fill of %s failed: %r", digest, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                size_path.unlink()
            if fd >= 0:
                os.close(fd)
            lock.release()
            self.active.pop(digest, None)
            fill.started.set()
            fill.notify()

    async def _download(self, fill: Fill, fd: int, response: httpx.Response) -> None:
        hasher = hashlib.new(fill.digest.algorithm)
        buffer = bytearray()
        flushed = time.monotonic()

        def write(data: bytes) -> None:
            hasher.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        try:
            async for chunk in response.aiter_raw():
                buffer += chunk
                now = time.monotonic()
                if len(buffer) >= CHUNK or now - flushed > FLUSH_INTERVAL:
                    data = bytes(buffer)
                    buffer.clear()
                    await asyncio.to_thread(write, data)
                    fill.written += len(data)
                    flushed = now
                    fill.notify()
                    if fill.size is not None and fill.written > fill.size:
                        break
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"download of {fill.digest} stalled") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"download of {fill.digest} broke: {exc}") from exc
        if buffer:
            data = bytes(buffer)
            await asyncio.to_thread(write, data)
            fill.written += len(data)
        if fill.size is not None and fill.written != fill.size:
            raise DigestMismatch(
                f"upstream sent {fill.written} bytes for {fill.digest}, announced {fill.size}")
        if hasher.hexdigest() != fill.digest.hex:
            raise DigestMismatch(f"upstream sent content that does not match {fill.digest}")
        if fill.size is None:
            fill.size = fill.written

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
