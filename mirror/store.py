"""The on-disk cache: content-addressed files, fill locks and a small metadata index.

Layout under the cache directory (everything a request can touch is derived from a parsed
digest, so no client input ever becomes a path):

    blobs/<alg>/<hex[:2]>/<hex>   committed content (blobs and manifests), verified
    tmp/<alg>-<hex>.part          a fill in progress (only its lock holder writes it)
    tmp/<alg>-<hex>.size          the expected length of that fill, once upstream told us
    locks/<alg>-<hex>.lock        flock(2) held by the one process filling that digest
    index/                        metadata (`mirror.index`): media types, tags, links, pins

A `.part` becomes the committed file by rename(2): the same inode, so readers that opened
the partial keep reading the very bytes that were verified.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from mirror.index import Index
from mirror.reference import Digest

CHUNK = 1 << 20
STALE_TMP = 3600.0  # seconds after which a private temporary file is surely abandoned


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        for path in (self.blobs, self.tmp, self.locks):
            path.mkdir(parents=True, exist_ok=True)
        self.index = Index(root / "index")

    def close(self) -> None:
        self.index.close()

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
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def has(self, digest: Digest) -> bool:
        return self.size(digest) is not None

    def read(self, digest: Digest) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def commit(self, digest: Digest, partial: Path) -> Path:
        """Move a verified partial into place (atomic; the partial's inode is kept)."""
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(partial, final)
        return final

    def write(self, digest: Digest, data: bytes) -> None:
        """Store small verified content (manifests) through a private partial."""
        tmp = self.tmp / f"{digest.algorithm}-{digest.hex}.{os.getpid()}.small"
        tmp.write_bytes(data)
        self.commit(digest, tmp)

    def remove(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(digest))

    # -- start-up ------------------------------------------------------------------------

    def cleanup_partials(self) -> int:
        """Remove partials whose filler is gone (crashed or killed); returns how many.

        Other temporary files are private to one writer and short-lived: only old ones go.
        """
        removed = 0
        for part in self.tmp.iterdir():
            if not part.name.endswith((".part", ".size")):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - part.stat().st_mtime > STALE_TMP:
                        part.unlink()
                continue
            name = part.name.split(".")[0]
            lock = FillLock(self.locks / f"{name}.lock")
            if lock.acquire():
                try:
                    with contextlib.suppress(FileNotFoundError):
                        part.unlink()
                        removed += 1
                finally:
                    lock.release(remove=True)
        return removed


class FillLock:
    """An exclusive, non-blocking flock(2) on a per-digest file, shared across processes.

    The kernel drops it when its holder dies, which is how followers notice a dead filler.
    The holder unlinks the file before releasing; acquirers re-check the inode so a lock
    taken on an already unlinked file does not count.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)

    def release(self, remove: bool = True) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def lock_is_held(path: Path) -> bool:
    """Whether some process holds the fill lock at `path` (never creates the file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as exc:  # pragma: no cover - exotic filesystems
        return exc.errno != errno.ENOLCK
    finally:
        os.close(fd)
    return False


def read_chunks(fd: int, start: int, end: int, chunk: int = CHUNK) -> Iterator[bytes]:
    pos = start
    while pos < end:
        data = os.pread(fd, min(chunk, end - pos), pos)
        if not data:
            return
        pos += len(data)
        yield data
