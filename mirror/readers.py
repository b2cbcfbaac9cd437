"""How a client reads a blob: verified content from the cache, or the partial file of a
fill running in this process (woken as bytes land) or in another worker (polled).

A reader never hands out the blob's last byte before the blob is committed, so a client
can only ever see a complete body that was verified; on failure its stream is aborted.

Readers hand out `parts`: a reader following a fill, `Span`s of the partial (what may be
sent now, as one piece, which the server sends with sendfile when it can: `mirror.zerocopy`);
committed content, views of its mapping; others, bytes (a relay's, an object's, another
replica's). `chunks` is the same as bytes, at most CHUNK at a time, read inline (a pread from
the page cache, or a view of the mapping).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mirror.errors import StreamAborted
from mirror.objectstore import ObjectStoreError, Writer

if TYPE_CHECKING:
    from mirror.cluster import Claim
from mirror.locks import FillLock, lock_is_held
from mirror.reference import Digest
from mirror.relay import Relay
from mirror.store import CHUNK, POLL, Store


class Fill:
    """A download in progress in this process."""

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.size: int | None = None
        self.written = 0
        self.committed = False
        self.error: BaseException | None = None
        self.started = asyncio.Event()  # size known, or failed
        self._progress = asyncio.Event()
        self.fd = -1  # the partial (read-write) while the fill runs: readers dup it
        self.lock: FillLock | None = None
        self.followers: set[LocalReader] = set()
        self.relay: Relay | None = None  # the disk filled up: relayed, not cached
        self.upstream = ""  # where it downloads from (the holder it records; a label)
        self.expected: int | None = None  # the exact length a descriptor announced
        self.private: Path | None = None  # its own partial: a fill no one else joins
        self.upload: Writer | None = None  # the object store upload it feeds, if any
        self.claim: Claim | None = None  # its claim in the cluster, if any

    def notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), timeout)


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes [offset, offset + count) of the open file `fd`, all there to be sent now."""

    fd: int
    offset: int
    count: int


Part = Span | bytes | memoryview


class Reader:
    """Streams a blob from a file descriptor: committed content or a growing partial."""

    source = "cache"  # where the bytes come from, for metrics: cache, or upstream (a fill)

    def __init__(self, fd: int, size: int | None) -> None:
        self.fd = fd
        self.size = size
        self.pos = 0  # the next byte to hand out

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

    def part(self, pos: int, count: int) -> Part:
        """What to hand out for bytes [pos, pos + count), all of which are there: a span of
        our file (or, from a relay, fewer bytes as such)."""
        return Span(self.fd, pos, count)

    def advanced(self) -> None:
        """`pos` moved on (a relay may let go of what every reader has)."""

    def read(self, fd: int, pos: int, size: int) -> bytes | memoryview:
        """Up to `size` bytes of `fd` at `pos`, inline: a pread of bytes that are in the
        page cache costs less than a hop to a thread and back."""
        return os.pread(fd, size, pos)

    async def parts(self, start: int, end: int | None) -> AsyncGenerator[Part, None]:
        """Bytes [start, end) (end None: to the end of the blob) as they may be handed out;
        the fd is closed after."""
        pos = self.pos = start
        try:
            while True:
                available, committed = self.progress()
                stop = end if end is not None else (available if committed else None)
                if stop is not None and pos >= stop:
                    return
                limit = available if committed else available - 1  # keep back the last byte
                if stop is not None:
                    limit = min(limit, stop)
                if not committed and self.size is not None:
                    # An upstream may send more than it announced: the blob's own last byte
                    # still waits for the verification, however much has arrived.
                    limit = min(limit, self.size - 1)
                if limit > pos:
                    part = self.part(pos, limit - pos)
                    length = part.count if isinstance(part, Span) else len(part)
                    if not length:
                        raise StreamAborted(f"blob {self.size} bytes ended early at {pos}")
                    pos = self.pos = pos + length
                    self.advanced()
                    yield part
                elif self.failed():
                    raise StreamAborted("upstream download failed")
                else:
                    await self.wait()
        finally:
            self.close()

    async def chunks(
        self, start: int, end: int | None
    ) -> AsyncGenerator[bytes | memoryview, None]:
        """Bytes [start, end) as bytes, at most CHUNK at a time; the fd is closed after."""
        async with contextlib.aclosing(self.parts(start, end)) as parts:
            async for part in parts:
                if not isinstance(part, Span):
                    yield part
                    continue
                pos, end_ = part.offset, part.offset + part.count
                while pos < end_:
                    data = self.read(part.fd, pos, min(CHUNK, end_ - pos))
                    if not data:
                        raise StreamAborted(f"blob {self.size} bytes ended early at {pos}")
                    pos += len(data)
                    yield data


class CommittedReader(Reader):
    """Reads verified content from the cache."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size)
        self._view: memoryview | None = None

    def progress(self) -> tuple[int, bool]:
        assert self.size is not None  # checked against its record when opened: immutable
        return self.size, True

    def part(self, pos: int, count: int) -> Part:
        """Committed content is immutable: it is mapped once and handed out as views of the
        page cache, written to the socket from there. To a client on the same host that is
        1.6x the throughput of sendfile here (whose page fragments the receiving side copies
        slower), and no copy or thread hop on our side either."""
        return self.read(self.fd, pos, min(count, CHUNK))

    def read(self, fd: int, pos: int, size: int) -> bytes | memoryview:
        if self._view is None:
            self._view = memoryview(mmap.mmap(self.fd, 0, prot=mmap.PROT_READ))
        return self._view[pos:pos + size]


class LocalReader(Reader):
    """Follows a fill running in this process."""

    source = "upstream"

    def __init__(self, fd: int, fill: Fill) -> None:
        super().__init__(fd, fill.size)
        self.fill = fill
        self.dropped = False  # the relay gave up waiting for this reader
        fill.followers.add(self)
        if fill.relay is not None:
            fill.relay.moved()

    def progress(self) -> tuple[int, bool]:
        return self.fill.written, self.fill.committed

    def failed(self) -> bool:
        return self.fill.error is not None

    async def wait(self) -> None:
        await self.fill.wait(1.0)

    def part(self, pos: int, count: int) -> Part:
        relay = self.fill.relay
        if relay is None or pos + count <= relay.start:
            return Span(self.fd, pos, count)
        if pos < relay.start:  # what reached the disk is in our (unlinked) partial
            return Span(self.fd, pos, relay.start - pos)
        return relay.read(self, pos, count)

    def advanced(self) -> None:
        if self.fill.relay is not None:
            self.fill.relay.moved()

    def close(self) -> None:
        if self.fd >= 0:
            self.fill.followers.discard(self)
            if self.fill.relay is not None:
                self.fill.relay.moved()
        super().close()


class RemoteReader(Reader):
    """Follows a fill running in another worker process, through the file system."""

    source = "upstream"

    def __init__(self, fd: int, size: int | None, store: Store, digest: Digest) -> None:
        super().__init__(fd, size)
        self.store = store
        self.digest = digest
        self.verified = False  # saw the commit: the fd holds the verified blob, evicted or not

    def progress(self) -> tuple[int, bool]:
        if self.verified:
            return os.fstat(self.fd).st_size, True
        try:
            final = os.stat(self.store.path(self.digest))
        except FileNotFoundError:
            return os.fstat(self.fd).st_size, False
        if final.st_ino != os.fstat(self.fd).st_ino:
            # Our partial was abandoned and someone else committed: read theirs.
            fd = os.open(self.store.path(self.digest), os.O_RDONLY)
            os.close(self.fd)
            self.fd = fd
        self.verified = True
        return final.st_size, True

    def failed(self) -> bool:
        if self.store.has(self.digest):
            return False
        # The filler gave up (lock free), or stopped caching (partial unlinked: disk full).
        return (os.fstat(self.fd).st_nlink == 0
                or not lock_is_held(self.store.lock_path(self.digest)))


class ObjectReader(Reader):
    """Streams committed content from the object store, for a replica without a local copy.

    A whole read also keeps a local copy (when the store keeps them), written and hashed as
    it streams and put in place only if it hashes to the digest.
    """

    source = "cache"

    def __init__(self, store: Store, digest: Digest, size: int) -> None:
        super().__init__(-1, size)
        self.store = store
        self.digest = digest

    async def parts(self, start: int, end: int | None) -> AsyncGenerator[Part, None]:
        remote = self.store.remote
        assert remote is not None and self.size is not None
        end = self.size if end is None else end
        copy = self._copy() if start == 0 and end == self.size else None
        try:
            async for chunk in remote.read(self.digest, start, end):
                if copy is not None and not await copy.add(chunk):
                    copy = None
                yield chunk
        except FileNotFoundError:
            raise StreamAborted(f"{self.digest} is gone from the object store") from None
        except ObjectStoreError as exc:
            raise StreamAborted(str(exc)) from None
        finally:
            if copy is not None:
                await copy.finish(self.store.path(self.digest))

    def _copy(self) -> LocalCopy | None:
        if not self.store.keep_local or self.store.remote is None:
            return None
        return LocalCopy(self.store.tmp / f"{self.digest.algorithm}-{self.digest.hex}."
                         f"{os.getpid()}-{id(self):x}.copy", self.digest, self.size or 0)


class LocalCopy:
    """A local copy of content read from the object store, kept once it hashes right."""

    def __init__(self, path: Path, digest: Digest, size: int) -> None:
        self.path = path
        self.digest = digest
        self.size = size
        self.hasher = hashlib.new(digest.algorithm)
        self.written = 0
        self.fd = -1

    async def add(self, chunk: bytes) -> bool:
        """Write and hash `chunk`; False once the copy is given up (e.g. a full disk)."""
        try:
            if self.fd < 0:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            await asyncio.to_thread(self._write, chunk)
        except OSError:
            await self.finish(None)
            return False
        return True

    def _write(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view):]
        self.written += len(chunk)

    async def finish(self, target: Path | None) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        whole = self.written == self.size and self.hasher.hexdigest() == self.digest.hex
        if target is not None and whole:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.path, target)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
