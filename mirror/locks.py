"""Cross-process locks on files: flock(2), which the kernel drops when its holder dies.

They serialise fills of one digest among a host's worker processes, and every other
"one process at a time" on that host (tag resolutions, proofs; `mirror.flight`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path


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
