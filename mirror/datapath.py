"""A fill's data path: one thread per download moves the upstream body into the partial.

The thread reads the body straight from the upstream's socket (`mirror.upstream.SocketBody`)
into one reused buffer of `BUFFER` bytes (the size of a core's L2 cache here: bigger buffers
measured slower), hashes each piece it read and writes it to the partial while it is still
in the cache, and wakes the readers (`Fill.notify`, through the event loop) for every full
buffer, at least every FLUSH_INTERVAL, and at once for the first bytes. Reading (and TLS),
hashing and writing all release the GIL: a download costs the event loop one wake-up per
MiB, and readers send the partial from the page cache (`mirror.zerocopy`).

On the way it
- caps the body at the announced length (or `max_size` when none was announced), and checks
  length and digest at the end (DigestMismatch otherwise);
- resumes a body that breaks (reset, truncated, stalled) with a Range request from the byte
  it reached, up to RESUMES times, without the readers noticing;
- feeds the object store's multipart upload (`Fill.upload`) as bytes land: one copy per
  buffer, in order, at most UPLOAD_AHEAD buffers ahead of the upload;
- past a full disk (ENOSPC, EDQUOT), detaches the fill from the cache (`Fills._detach`) and
  relays the rest to its readers from memory (`mirror.relay`).

Bytes from any other source (an httpx response; aiohttp's, behind proxies the socket path
does not speak) reach the same thread through the event loop, a chunk at a time
(`_AsyncChunks`). Cancelling `run` (the deadline, shutdown) stops the thread: its socket is
cut, and `run` returns only once the thread has let go of the partial.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import httpx

from mirror.errors import UpstreamError, UpstreamTimeout
from mirror.metrics import Metrics
from mirror.objectstore import Writer
from mirror.readers import Fill
from mirror.store import CHUNK, DISK_FULL
from mirror.upstream import BodyBroken, SocketBody, Streamed

BUFFER = CHUNK  # 1 MiB: read, hash and write in one reused buffer
WAKE_EVERY = 4 * CHUNK  # readers are woken when this much more landed (spans this long)
FLUSH_INTERVAL = 0.05  # and at least this often (slow downloads)
# Blocks are reserved this far ahead of what landed, never the whole announced size at
# once: an upstream that announces 10 GB and stalls holds this much disk, not 10 GB.
RESERVE_AHEAD = 64 * CHUNK
UPLOAD_AHEAD = 8  # buffers queued for the object store before the thread waits for it
RESUMES = 3  # a broken download is resumed this many times before the fill gives up
log = logging.getLogger("mirror.fills")
# Threads of a process's downloads: one per running download (created as needed, reused
# after). `Fills` owns the executor; this bounds it.
MAX_THREADS = 1024

# Opens the upstream body from a byte offset (0: the whole blob; more: resuming).
Fetch = Callable[[int], Awaitable[Streamed]]
T = TypeVar("T")


class DigestMismatch(UpstreamError):
    """The upstream sent bytes that do not match the digest or the announced length."""


class _Stopped(Exception):
    """The download was cancelled while its thread waited on the event loop."""


class _Source(Protocol):
    def readinto(self, view: memoryview) -> int: ...


class Pump:
    """Runs one fill's download in a thread: see the module's description."""

    def __init__(self, fill: Fill, fd: int, fetch: Fetch, *, max_size: int,
                 metrics: Metrics | None, detach: Callable[[Fill, int], None],
                 threads: ThreadPoolExecutor) -> None:
        self.fill = fill
        self.threads = threads
        self.fd = fd
        self.fetch = fetch
        self.max_size = max_size
        self.metrics = metrics
        self.detach = detach
        self.loop = asyncio.get_running_loop()
        self.hasher = hashlib.new(fill.digest.algorithm)
        self.response: Streamed | None = None
        self.uploader = _Uploader(fill.upload, self) if fill.upload is not None else None
        self.unannounced = 0  # bytes landed since the readers were last woken
        self.reserved = 0  # the partial's blocks allocated so far (`reserve`)
        self._stopping = False

    # -- on the event loop ------------------------------------------------------------------

    async def run(self, response: Streamed) -> None:
        """Download `response`'s body (and resumes) into the fill's partial, verified."""
        self.response = response
        thread = self.loop.run_in_executor(self.threads, self._work)
        try:
            await asyncio.shield(thread)
            if self.uploader is not None:
                await self.uploader.finish()
        except BaseException:
            self.stop()
            await _joined(thread)  # it may write to the partial until it is done
            if self.uploader is not None:
                self.uploader.cancel()
            raise
        finally:
            if self.response is not None and self.response is not response:
                await self.response.aclose()  # a resumed body (the caller closes its own)

    def stop(self) -> None:
        """Make the thread give up soon: cut its socket, end its waits on the loop."""
        self._stopping = True
        if isinstance(self.response, SocketBody):
            self.response.abort()

    def _wake(self) -> None:
        self.fill.notify()

    # -- in the thread ----------------------------------------------------------------------

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` on the event loop and wait for it (giving up when stopped)."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        while True:
            try:
                return future.result(timeout=0.2)
            except TimeoutError:
                if future.done():
                    raise
                if self._stopping:
                    future.cancel()
                    raise _Stopped from None

    def _source(self, response: Streamed) -> _Source:
        return response if isinstance(response, SocketBody) else _AsyncChunks(response, self)

    def _work(self) -> None:
        try:
            self._download()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"download of {self.fill.digest} stalled") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"download of {self.fill.digest} broke: {exc}") from exc

    def _download(self) -> None:
        fill = self.fill
        assert self.response is not None
        buffer = memoryview(bytearray(BUFFER))
        cap = fill.size if fill.size is not None else self.max_size
        source = self._source(self.response)
        received = skip = resumes = filled = 0
        woken = time.monotonic()
        while True:
            broken: Exception | None = None
            try:
                while received <= cap:
                    n = source.readinto(buffer[filled:])
                    if self._stopping:  # nothing lands once the download is stopped
                        raise _Stopped
                    if n == 0:
                        break
                    if skip:  # resumed, but the upstream ignored our Range
                        dropped = min(skip, n)
                        skip -= dropped
                        n -= dropped
                        buffer[filled:filled + n] = buffer[filled + dropped:filled + dropped + n]
                        if not n:
                            continue
                    n = min(n, cap + 1 - received)  # one byte past the cap tells enough
                    self._land(buffer[filled:filled + n])
                    filled += n
                    received += n
                    now = time.monotonic()
                    first = received == n  # the first bytes go to the readers at once
                    if filled == len(buffer) or first or now - woken >= FLUSH_INTERVAL:
                        self._hand_off(buffer[:filled])
                        filled = 0
                        if (first or now - woken >= FLUSH_INTERVAL
                                or self.unannounced >= WAKE_EVERY):
                            self._wake_readers()
                            woken = now
            except (httpx.TransportError, BodyBroken, UpstreamTimeout) as exc:
                broken = exc  # reset, truncated, stalled
            if filled:
                self._hand_off(buffer[:filled])
                filled = 0
            self._wake_readers()
            if self._stopping:
                raise _Stopped
            if received > cap or fill.size is None or received >= fill.size:
                if broken is not None:
                    raise broken
                break
            # The body ended early: ask for the rest, invisibly to the readers.
            resumes += 1
            if resumes > RESUMES:
                raise UpstreamError(
                    f"download of {fill.digest} broke {RESUMES + 1} times: {broken!r}")
            self.loop.call_soon_threadsafe(
                _log_resume, str(fill.digest), received, repr(broken))
            old, self.response = self.response, None
            self._call(old.aclose())
            self.response = response = self._call(_awaited(self.fetch(received)))
            if response.status_code == 206:
                start = response.headers.get("content-range", "").partition(" ")[2]
                if not start.startswith(f"{received}-"):
                    raise UpstreamError(f"upstream resumed {fill.digest} at the wrong byte")
            else:
                skip = received
            source = self._source(response)
        if fill.size is None and fill.written > self.max_size:
            raise DigestMismatch(f"upstream sent over {self.max_size} bytes for {fill.digest}")
        if fill.size is not None and fill.written != fill.size:
            raise DigestMismatch(
                f"upstream sent {fill.written} bytes for {fill.digest}, announced {fill.size}")
        if self.hasher.hexdigest() != fill.digest.hex:
            raise DigestMismatch(f"upstream sent content that does not match {fill.digest}")
        if fill.size is None:
            fill.size = fill.written

    def _land(self, piece: memoryview) -> None:
        """Hash `piece` and put it where readers find it: the partial, or the relay."""
        fill = self.fill
        self.hasher.update(piece)
        rest = piece
        if fill.relay is None:
            end = fill.written + len(piece)
            if fill.size is not None and self.reserved < min(end, fill.size):
                ahead = min(fill.size, end + RESERVE_AHEAD) - self.reserved
                reserve(self.fd, self.reserved, ahead)
                self.reserved += ahead
            landed = _write(self.fd, piece)
            if landed < len(piece):
                self._call(_run_sync(self.detach, fill, fill.written + landed))
                rest = piece[landed:]
            else:
                rest = piece[:0]
        fill.written += len(piece) - len(rest)
        if rest and fill.relay is not None:
            self._call(fill.relay.put(bytes(rest)))
            fill.written += len(rest)
            self.loop.call_soon_threadsafe(self._wake)  # relayed: readers make room for more

    def _hand_off(self, batch: memoryview) -> None:
        """A buffer's worth landed: feed the upload, count it."""
        if self.uploader is not None and self.fill.relay is None:
            self.uploader.put(bytes(batch))
        if self.metrics is not None:
            self.metrics.upstream_bytes.labels(self.fill.upstream).inc(len(batch))
        self.unannounced += len(batch)

    def _wake_readers(self) -> None:
        if self.unannounced:
            self.unannounced = 0
            self.loop.call_soon_threadsafe(self._wake)


class _AsyncChunks:
    """A body that streams on the event loop, read from the data thread a chunk at a time."""

    def __init__(self, response: Streamed, pump: Pump) -> None:
        self.chunks = response.aiter_raw()
        self.pump = pump
        self.rest = memoryview(b"")

    async def _next(self) -> bytes | None:
        return await anext(self.chunks, None)

    def readinto(self, view: memoryview) -> int:
        while not self.rest:
            chunk = self.pump._call(self._next())
            if chunk is None:
                return 0
            self.rest = memoryview(chunk)
        n = min(len(view), len(self.rest))
        view[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n


class _Uploader:
    """Feeds the object store upload from the data thread, in order, bounded."""

    def __init__(self, writer: Writer, pump: Pump) -> None:
        self.writer = writer
        self.pump = pump
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.room = threading.Semaphore(UPLOAD_AHEAD)
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run(), name="fill upload")

    def put(self, data: bytes) -> None:
        """From the thread: queue `data`, waiting while UPLOAD_AHEAD buffers are queued."""
        while not self.room.acquire(timeout=0.2):
            if self.error is not None or self.pump._stopping:
                break
        if self.error is not None:
            raise self.error
        if self.pump._stopping:
            raise _Stopped
        self.pump.loop.call_soon_threadsafe(self.queue.put_nowait, data)

    async def _run(self) -> None:
        while (data := await self.queue.get()) is not None:
            try:
                if self.error is None:
                    await self.writer.write(data)
            except Exception as exc:
                self.error = exc
            finally:
                self.room.release()

    async def finish(self) -> None:
        """Every queued byte handed to the writer (not completed: that follows the check)."""
        self.queue.put_nowait(None)
        await self.task
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.task.cancel()


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate the partial's blocks ahead of the writes, its length unchanged (readers in
    other workers go by it): the filesystem then has no block to reserve per page written,
    a sixth of the cost of writing here (ext4). Where that cannot be done (another
    filesystem, too little room), writes allocate as they go, as usual."""
    fallocate = _libc_fallocate()
    if fallocate is None:
        return
    if fallocate(fd, FALLOC_FL_KEEP_SIZE, ctypes.c_int64(offset),
                 ctypes.c_int64(length)) != 0:
        log.debug("no room reserved for a partial: %s", os.strerror(ctypes.get_errno()))


@functools.cache  # loaded on first use, not at import
def _libc_fallocate() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None


FALLOC_FL_KEEP_SIZE = 1


def _write(fd: int, data: memoryview) -> int:
    """Write all of `data`; returns how much landed (less: the disk is full)."""
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, data[done:])
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            break
    return done


async def _run_sync(fn: Callable[..., None], *args: Any) -> None:
    fn(*args)


def _log_resume(digest: str, received: int, why: str) -> None:
    log.info("resuming %s from byte %d (%s)", digest, received, why)


async def _joined(thread: asyncio.Future[None]) -> None:
    """Wait for a stopped thread to finish (it does, soon), cancelled or not."""
    cancelled = False
    while not thread.done():
        try:
            await asyncio.wait([thread])
        except asyncio.CancelledError:
            cancelled = True
    if not thread.cancelled():
        thread.exception()  # retrieved: the caller raises its own
    if cancelled:
        raise asyncio.CancelledError


async def _awaited(work: Awaitable[T]) -> T:
    return await work
