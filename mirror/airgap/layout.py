"""OCI image layouts on disk and in tar archives: the bundle format of export and import.

    oci-layout              {"imageLayoutVersion": "1.0.0"}
    index.json              an image index: one descriptor per image, named by annotation
    blobs/<alg>/<hex>       content

Archives are written reproducibly (fixed order, times, owners and modes; PAX format, which
also takes blobs over 8 GiB), so the same content always gives the same bytes.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = b'{"imageLayoutVersion": "1.0.0"}'
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
MAX_INDEX = 64 * 1024 * 1024
COPY = 1 << 20
_BLOB = re.compile(r"(?:\./)?blobs/([a-z0-9]+)/([a-f0-9]+)")


def blob_name(digest: str) -> str:
    algorithm, _, hex_ = digest.partition(":")
    return f"blobs/{algorithm}/{hex_}"


def blob_digest(name: str) -> str | None:
    """`blobs/sha256/<hex>` -> `sha256:<hex>` (None for any other member)."""
    match = _BLOB.fullmatch(name)
    return f"{match[1]}:{match[2]}" if match else None


def member_name(name: str) -> str:
    return name[2:] if name.startswith("./") else name


# -- writing ---------------------------------------------------------------------------------


class TarWriter:
    """Writes a reproducible tar to `out`; `advance(n)` is told of every n content bytes.

    Headers come from `tarfile`; the content is copied here in large chunks (tarfile's own
    stream writer re-slices its buffer per 10 kB record, which is slow for big layers).
    """

    def __init__(self, out: BinaryIO, advance: Callable[[int], None] = lambda n: None) -> None:
        self.out = out
        self.advance = advance
        self.written = 0
        self._dirs: set[str] = set()

    def _header(self, name: str, size: int, directory: bool = False) -> None:
        info = tarfile.TarInfo(name)
        info.size = 0 if directory else size
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        info.mode = 0o755 if directory else 0o644
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _write(self, data: bytes | memoryview) -> None:
        self.out.write(data)
        self.written += len(data)

    def _pad(self, size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            self._write(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            if directory not in self._dirs:
                self._dirs.add(directory)
                self._header(directory + "/", 0, directory=True)

    def add_bytes(self, name: str, data: bytes) -> None:
        self._parents(name)
        self._header(name, len(data))
        self._write(data)
        self._pad(len(data))
        self.advance(len(data))

    def add_file(self, name: str, path: Path) -> None:
        self._parents(name)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._header(name, size)
            left = size
            while left > 0:
                data = f.read(min(COPY, left))
                if not data:
                    raise OSError(f"{path} shrank while being written")
                self._write(data)
                left -= len(data)
                self.advance(len(data))
        self._pad(size)

    def close(self) -> None:
        """End of archive: two zero blocks, then zeros up to a whole record (as tar does)."""
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self.written % tarfile.RECORDSIZE:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE - self.written % tarfile.RECORDSIZE))
        self.out.flush()


# -- reading ---------------------------------------------------------------------------------


@dataclass
class Member:
    name: str  # relative to the layout's root, e.g. `blobs/sha256/<hex>`
    size: int
    open: Callable[[], IO[bytes]]


def members(source: Path) -> Iterator[Member]:
    """The files of a layout, a directory or a tar (plain or compressed), in stored order.

    A tar is read front to back once; each member's `open()` is valid until the next one.
    """
    if source.is_dir():
        yield from _dir_members(source)
        return
    with tarfile.open(source, mode="r:*") as tar:
        for info in tar:
            if not (info.isfile() or info.islnk()):
                continue
            name = member_name(info.name)

            def opener(info: tarfile.TarInfo = info) -> IO[bytes]:
                f = tar.extractfile(info)
                if f is None:
                    raise OSError(f"cannot read {info.name} from the archive")
                return f

            yield Member(name, info.size, opener)


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


def _dir_members(root: Path) -> Iterator[Member]:
    for name in (LAYOUT_FILE, INDEX_FILE):
        path = root / name
        if path.is_file():
            yield Member(name, path.stat().st_size, _opener(path))
    blobs = root / "blobs"
    if not blobs.is_dir():
        return
    for algorithm in sorted(blobs.iterdir()):
        if not algorithm.is_dir():
            continue
        for path in sorted(algorithm.iterdir()):
            if path.is_file():
                yield Member(f"blobs/{algorithm.name}/{path.name}", path.stat().st_size,
                             _opener(path))


def blob_digests(source: Path) -> set[str]:
    """Which blobs a layout or archive holds (by name; for `export --since`)."""
    if source.is_dir():
        return {d for m in _dir_members(source) if (d := blob_digest(m.name))}
    with tarfile.open(source, mode="r:*") as tar:
        return {d for info in tar if (d := blob_digest(member_name(info.name)))}
