"""Write-through of pushes: the bytes of an upload session are kept as they stream up, and
enter the cache once the upstream accepted the blob and its digest checks out here too.

Keeping them is best effort: on a full disk (or any failure to write), or when a session's
earlier bytes are missing, the blob is simply not cached; the push itself never fails for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mirror.reference import Digest
from mirror.store import CHUNK, DISK_FULL, Store

log = logging.getLogger("mirror.writethrough")
PREFIX, SUFFIX = "upload-", ".part"  # tmp/upload-<session id>.part


class WriteThrough:
    def __init__(self, store: Store) -> None:
        self.store = store
        # session id -> (bytes hashed so far, sha256): when its chunks came in order to us
        self._hashers: dict[str, tuple[int, Any]] = {}

    def partial(self, session_id: str) -> Path:
        return self.store.tmp / f"{PREFIX}{session_id}{SUFFIX}"

    def partials(self, limit: int) -> Iterator[tuple[str, Path]]:
        """(session id, file) of at most `limit` write-through files, for sweeps."""
        for path in itertools.islice(self.store.tmp.glob(f"{PREFIX}*{SUFFIX}"), limit):
            yield path.name.removeprefix(PREFIX).removesuffix(SUFFIX), path

    def tee(self, session_id: str, offset: int) -> Tee:
        path = self.partial(session_id)
        # Past the start, bytes before `offset` must already be there (not lost to a full
        # disk, swept, or sent through another replica): else there is nothing to add to.
        useless = offset > 0 and _size(path) < offset
        return Tee(path, offset, self._hashers, session_id, enabled=not useless)

    def discard(self, session_id: str) -> None:
        self._hashers.pop(session_id, None)
        with contextlib.suppress(FileNotFoundError):
            self.partial(session_id).unlink()

    async def keep(self, session_id: str, digest: Digest, holder: str) -> None:
        """Commit what streamed through if it is exactly the blob the upstream (`holder`)
        accepted."""
        partial = self.partial(session_id)
        state = self._hashers.pop(session_id, None)
        actual = ""
        try:
            size = partial.stat().st_size
            if state is not None and state[0] == size and digest.algorithm == "sha256":
                actual = state[1].hexdigest()
            else:  # chunks went through several workers: hash the file itself
                actual = await asyncio.to_thread(_hash_file, partial, digest.algorithm)
            if actual == digest.hex and await self.store.committed_size(digest) is None:
                await self.store.commit(digest, partial, holder)
                return
        except FileNotFoundError:  # never written, or swept meanwhile
            return
        except OSError as exc:  # the push succeeded: caching it is best effort
            log.warning("%s: pushed blob %s not cached", _why(exc), digest)
            actual = ""
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        if actual == digest.hex:  # cached already: the upstream holds it now too
            await self.store.add_holder(holder, digest)


class Tee:
    """Writes a session's bytes at their offset, in MiB batches, hashing when in order."""

    def __init__(self, path: Path, offset: int, hashers: dict[str, tuple[int, Any]],
                 key: str, enabled: bool = True) -> None:
        self.path, self.offset, self.hashers, self.key = path, offset, hashers, key
        self.enabled = enabled
        self.buffer = bytearray()

    async def write(self, chunk: bytes) -> None:
        if not self.enabled:
            return
        self.buffer += chunk
        if len(self.buffer) >= CHUNK:
            await self.flush()

    async def flush(self) -> None:
        if not self.buffer or not self.enabled:
            return
        data, offset = bytes(self.buffer), self.offset
        self.buffer.clear()
        self.offset += len(data)
        state = self.hashers.get(self.key)
        if offset == 0:
            state = (0, hashlib.sha256())
        if state is not None and state[0] == offset:
            state[1].update(data)
            self.hashers[self.key] = (offset + len(data), state[1])
        else:
            self.hashers.pop(self.key, None)
        try:
            await asyncio.to_thread(_write_at, self.path, offset, data)
        except OSError as exc:
            # Give up on this blob (the upload goes on): what was kept only wastes room.
            self.enabled = False
            self.hashers.pop(self.key, None)
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            log.warning("%s: pushed blob of upload %s not written through", _why(exc),
                        self.key)


def _why(exc: OSError) -> str:
    return "cache disk full" if exc.errno in DISK_FULL else f"cache write failed ({exc})"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _hash_file(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
