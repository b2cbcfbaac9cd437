"""The on-disk cache: content-addressed files and fill locks, with a content record each.

Layout under the cache directory (everything a request can touch is derived from a parsed
digest, so no client input ever becomes a path):

    blobs/<alg>/<hex[:2]>/<hex>   committed content (blobs and manifests), verified
    tmp/<alg>-<hex>.part          a fill in progress (only its lock holder writes it)
    tmp/<alg>-<hex>.size          the expected length of that fill, once upstream told us
    locks/<alg>-<hex>.lock        flock(2) held by the one process filling that digest
    metadata.db                   metadata (`mirror.metadata`): tags, content, access facts

A `.part` becomes the committed file by rename(2): the same inode, so readers that opened
the partial keep reading the very bytes that were verified. Every committed file has a
content record (its verified size, last use and holders); reads check the file against it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mirror.locks import FillLock
from mirror.metadata import ContentRecord, Metadata
from mirror.objectstore import ObjectStore
from mirror.recency import Recency
from mirror.reference import ALGORITHMS, Digest

if TYPE_CHECKING:
    from mirror.readers import Reader

log = logging.getLogger("mirror.store")

CHUNK = 1 << 20
POLL = 0.005  # how often a process looks at another's fill or lock
STALE_TMP = 3600.0  # seconds after which a private temporary file is surely abandoned
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True, slots=True)
class Entry:
    """A file under blobs/: committed content, or (`digest` None) something that is not."""

    path: Path
    digest: Digest | None
    size: int
    mtime: float


class Store:
    def __init__(self, root: Path, metadata: Metadata, remote: ObjectStore | None = None,
                 keep_local: bool = True) -> None:
        """`remote`: the object store content lives in (then the files under `root` are
        scratch for fills and, with `keep_local`, a hot tier of local copies)."""
        self.root = root
        self.remote = remote
        self.keep_local = keep_local or remote is None
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        for path in (self.blobs, self.tmp, self.locks):
            path.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata
        self.recency = Recency(metadata)  # hits are recorded here (batched), for eviction
        self.on_commit: Callable[[int], None] | None = None  # bytes committed (the evictor)
        self.on_damage: Callable[[Digest], None] | None = None  # a damaged file found

    async def close(self) -> None:
        await self.recency.flush()

    # -- paths ---------------------------------------------------------------------------

    def path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def partial_path(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}.part"

    def size_path(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}.size"

    def lock_path(self, digest: Digest) -> Path:
        return self.locks / f"{digest.algorithm}-{digest.hex}.lock"

    # -- committed content ---------------------------------------------------------------

    def size(self, digest: Digest) -> int | None:
        """The length of the file, unchecked (tools and tests; reads use `open`)."""
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def has(self, digest: Digest) -> bool:
        return self.size(digest) is not None

    def read_file(self, digest: Digest) -> bytes | None:
        """The file's bytes, unchecked (tools that verify what they read themselves)."""
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    async def open(self, digest: Digest) -> tuple[int, int] | None:
        """(descriptor, size) of committed content whose file matches its record.

        A file whose length differs from what was verified at commit is damaged (truncated,
        emptied): it is removed and reads as a miss, so the next fill fetches it again. A
        file without a record reads as a miss too (a fill then records it).
        """
        record = await self.record(digest)
        return None if record is None else await self._open_local(digest, record)

    async def _open_local(self, digest: Digest, record: ContentRecord) -> tuple[int, int] | None:
        """The local file of content whose record is `record`, checked against it."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            if self.remote is None:
                await self.metadata.drop_content([str(digest)])  # removed behind our back
            return None
        size = os.fstat(fd).st_size
        if self.remote is not None:  # a local copy: its mtime orders the hot tier
            with contextlib.suppress(OSError):
                os.utime(fd)
        if size != record.size:
            os.close(fd)
            await self.damaged(digest, f"{size} bytes on disk, {record.size} verified",
                               local_only=True)
            return None
        return fd, size

    async def record(self, digest: Digest) -> ContentRecord | None:
        """The content's record; with an object store, rebuilt from the object when the
        metadata store lost it (the bucket is the source of truth)."""
        record = await self.metadata.content(str(digest))
        if record is None and self.remote is not None:
            size = await self.remote.size(digest)
            if size is not None:
                await self.metadata.add_content(str(digest), size, None, time.time())
                record = await self.metadata.content(str(digest))
        return record

    async def reader(self, digest: Digest) -> Reader | None:
        """A reader over committed content: the local copy, else the object store's."""
        from mirror.readers import CommittedReader, ObjectReader  # they read from a Store

        record = await self.record(digest)  # read once: the local check and the object's size
        if record is None:
            return None
        opened = await self._open_local(digest, record)
        if opened is not None:
            return CommittedReader(*opened)
        return ObjectReader(self, digest, record.size) if self.remote is not None else None

    async def committed_size(self, digest: Digest) -> int | None:
        """The size of committed content that checks out (see `open`), else None."""
        record = await self.record(digest)
        if record is None:
            return None
        opened = await self._open_local(digest, record)
        if opened is not None:
            os.close(opened[0])
            return opened[1]
        return record.size if self.remote is not None else None

    async def holds(self, upstream: str, digest: Digest) -> bool:
        """Whether `upstream` delivered the content (rule 1 of `mirror.access`)."""
        if await self.metadata.holds(upstream, str(digest)):
            return True
        if self.remote is not None and await self.remote.holds(upstream, digest):
            await self.metadata.add_holder(str(digest), upstream)  # rebuilt from the bucket
            return True
        return False

    async def add_holder(self, upstream: str, digest: Digest) -> None:
        if self.remote is not None:
            await self.remote.add_holder(upstream, digest)
        await self.metadata.add_holder(str(digest), upstream)

    async def read(self, digest: Digest) -> bytes | None:
        """Small committed content (manifests), checked like `open`."""
        opened = await self.open(digest)
        if opened is None and self.remote is not None:
            record = await self.record(digest)
            data = await self.remote.read_all(digest) if record else None
            if data is not None and record is not None and len(data) != record.size:
                await self.damaged(digest, "object of the wrong length")
                return None
            return data
        if opened is None:
            return None
        fd, size = opened
        try:
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        if len(data) != size:
            await self.damaged(digest, "short read", local_only=True)
            return None
        return data

    async def damaged(self, digest: Digest, why: str, local_only: bool = False) -> None:
        """Content that failed a check: removed, so the next read fetches it again. With an
        object store, a damaged local copy (`local_only`) costs only that copy."""
        log.warning("damaged cache entry %s (%s): removed; it will be fetched again",
                    digest, why)
        if self.on_damage is not None:
            self.on_damage(digest)
        if local_only and self.remote is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(digest))
            return
        await self.remove(digest)

    async def commit(self, digest: Digest, partial: Path, holder: str | None,
                     uploaded: bool = False) -> Path:
        """Move a verified partial into place (atomic; the partial's inode is kept).

        With an object store the content goes there (unless `uploaded` already, as a fill
        streams it) and the file stays only as a local copy (`keep_local`). The record goes
        after the content: a reader that finds the record then always finds the content.
        `holder`: the upstream that delivered the bytes (see `mirror.access`).
        """
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        size = os.stat(partial).st_size
        if self.remote is not None:
            if not uploaded:
                await self.remote.put_file(digest, partial)
            if holder is not None:
                await self.remote.add_holder(holder, digest)
        new = await self.metadata.add_content(str(digest), size, holder, time.time())
        if self.keep_local:
            os.rename(partial, final)
        else:
            partial.unlink(missing_ok=True)
        self.recency.touch(digest)
        if new and self.on_commit is not None:
            self.on_commit(size)
        return final

    async def write(self, digest: Digest, data: bytes, holder: str | None) -> bool:
        """Store small verified content (manifests) through a private partial.

        On a full disk the content is not cached (False): the caller still has it to serve.
        """
        tmp = self.tmp / f"{digest.algorithm}-{digest.hex}.{os.getpid()}.small"
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno not in DISK_FULL:
                raise
            log.warning("cache disk full: %s not cached", digest)
            return False
        await self.commit(digest, tmp, holder)
        return True

    async def remove(self, digest: Digest) -> None:
        """Remove content: the file (and object), then its record (a reader with the file
        open keeps reading it whole)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(digest))
        if self.remote is not None:
            await self.remote.delete(digest)
        await self.metadata.drop_content([str(digest)])

    async def pin(self, owner: str, digests: list[str]) -> None:
        if self.remote is not None:
            await self.remote.put_pin(owner, digests)
        await self.metadata.pin(owner, digests)

    async def unpin(self, owner: str) -> list[str]:
        if self.remote is not None:
            await self.remote.drop_pin(owner)
        return await self.metadata.unpin(owner)

    def entries(self) -> Iterator[Entry]:
        """Every file under blobs/, as the walk finds it (files may come and go meanwhile).

        Cheap enough to run every minute: 10k files take ~0.1 s (the bare directory walk
        ~40 ms, ~200 ms with a cold inode cache); 100k about ten times that.
        """
        for alg in _listdir(self.blobs):
            if not alg.is_dir(follow_symlinks=False):
                yield from _entry(alg, None)
                continue
            for sub in _listdir(alg.path):
                if not sub.is_dir(follow_symlinks=False):
                    yield from _entry(sub, None)
                    continue
                for item in _listdir(sub.path):
                    regular = item.is_file(follow_symlinks=False)
                    yield from _entry(
                        item, _digest_at(alg.name, sub.name, item.name) if regular else None)

    # -- start-up ------------------------------------------------------------------------

    def cleanup_partials(self) -> int:
        """Remove partials whose filler is gone (crashed or killed); returns how many.

        Other temporary files are private to one writer and short-lived: only old ones go.
        """
        removed = 0
        for part in self.tmp.iterdir():
            name = part.name.split(".")[0]
            algorithm, _, hex_ = name.partition("-")
            fill = part.name.endswith((".part", ".size")) and bool(
                _digest_at(algorithm, hex_[:2], hex_))
            if not fill:  # e.g. a push's upload: not under a fill lock, so by age only
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - part.stat().st_mtime > STALE_TMP:
                        part.unlink()
                continue
            lock = FillLock(self.locks / f"{name}.lock")
            if lock.acquire():
                try:
                    with contextlib.suppress(FileNotFoundError):
                        part.unlink()
                        removed += 1
                finally:
                    lock.release(remove=True)
        return removed


def _listdir(path: str | Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entry(item: os.DirEntry[str], digest: Digest | None) -> Iterator[Entry]:
    try:
        st = item.stat(follow_symlinks=False)
    except FileNotFoundError:
        return
    yield Entry(Path(item.path), digest, st.st_size, st.st_mtime)


def _digest_at(algorithm: str, prefix: str, name: str) -> Digest | None:
    """The digest a file at blobs/<algorithm>/<prefix>/<name> holds, if that is a valid path."""
    if (ALGORITHMS.get(algorithm) == len(name) and name[:2] == prefix
            and re.fullmatch(r"[a-f0-9]+", name)):
        return Digest(algorithm, name)
    return None
