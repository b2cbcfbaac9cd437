"""`mirror import`: load an OCI image layout (ours, skopeo's, anyone's) into the cache.

The bundle is read once, front to back. Each blob the cache lacks is hashed while it is
copied into a private file under `tmp/`; only when every blob matched its digest and every
named image is whole (in the bundle, or already in the cache: an incremental bundle goes on
top of the one it was made against) is anything committed: the blobs by rename, then media
types, tags, links and pins. Otherwise nothing is, and the error names the bad blobs.

Names come from `io.containerd.image.name` or `org.opencontainers.image.ref.name`. A full
reference (`docker.io/library/nginx:1.27`) names upstream, repository and tag; a bare tag
(`1.0`, as `skopeo copy ... oci-archive:F:1.0` writes) needs the repository from `--name`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirror import errors, imageref, oci
from mirror.airgap import exporter, layout
from mirror.airgap.progress import Progress, Task, human_bytes, human_duration
from mirror.identity import ANONYMOUS_IDENTITY
from mirror.imageref import ImageRef
from mirror.metadata import Grant, RefRecord, TagRecord
from mirror.oci import Closure, Descriptor
from mirror.reference import parse_digest
from mirror.settings import Upstream
from mirror.store import CHUNK, Store

COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


class BundleError(Exception):
    """The bundle was refused; nothing was imported. One problem per line."""


@dataclass
class Image:
    ref: ImageRef | None  # None: the bundle does not name it
    closure: Closure
    label: str


@dataclass
class Report:
    images: list[Image] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    added: int = 0  # blobs committed
    added_bytes: int = 0
    present: int = 0  # blobs the cache already had
    elapsed: float = 0.0


class Importer:
    def __init__(self, store: Store, upstreams: Sequence[Upstream], name: str | None = None,
                 pin: bool = True) -> None:
        self.store = store
        self.upstreams = upstreams
        self.base = imageref.parse(name, upstreams, known_only=False) if name else None
        self.pin = pin
        self.staged: dict[str, Path] = {}
        self.problems: list[str] = []

    # -- reading the bundle ------------------------------------------------------------

    def load(self, source: Path, progress: Progress, report: Report) -> bytes | None:
        """Stage every blob the cache lacks; return index.json's bytes."""
        index_json: bytes | None = None
        task = progress.task(f"import {source.name}", _input_size(source))
        for member in layout.members(source):
            if member.name == layout.INDEX_FILE:
                if member.size > layout.MAX_INDEX:
                    raise BundleError(f"{source}: index.json is too large")
                with member.open() as f:
                    index_json = f.read()
            else:
                digest = layout.blob_digest(member.name)
                if digest is not None:
                    self._blob(digest, member, task, report)
            task.advance(member.size)
        task.finish("read")
        return index_json

    def _blob(self, name: str, member: layout.Member, task: Task, report: Report) -> None:
        try:
            digest = parse_digest(name)
        except errors.DigestInvalid as exc:
            self.problems.append(f"blob {name}: {exc.message}")
            return
        if self.store.has(digest):
            report.present += 1
            return
        if name in self.staged:
            return
        path = self.store.tmp / f"import-{os.getpid()}-{digest.algorithm}-{digest.hex}.blob"
        hasher = hashlib.new(digest.algorithm)
        try:
            with member.open() as src, open(path, "wb") as dst:
                while data := src.read(CHUNK):
                    hasher.update(data)
                    dst.write(data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        got = hasher.hexdigest()
        if got != digest.hex:
            path.unlink()
            self.problems.append(f"blob {digest} is corrupt: its content hashes to "
                                 f"{digest.algorithm}:{got}")
            return
        self.staged[name] = path

    # -- what it names -----------------------------------------------------------------

    def read(self, digest: str) -> bytes | None:
        path = self.staged.get(digest)
        if path is not None:
            if path.stat().st_size > oci.MAX_MANIFEST:
                raise oci.ManifestError(f"{digest} is too large for a manifest")
            return path.read_bytes()
        try:
            parsed = parse_digest(digest)
        except errors.DigestInvalid:
            return None
        size = self.store.size(parsed)
        if size is not None and size > oci.MAX_MANIFEST:
            raise oci.ManifestError(f"{digest} is too large for a manifest")
        return self.store.read_file(parsed)

    def has(self, digest: str) -> bool:
        if digest in self.staged:
            return True
        try:
            return self.store.has(parse_digest(digest))
        except errors.DigestInvalid:
            return False

    def size(self, digest: str) -> int:
        path = self.staged.get(digest)
        if path is not None:
            return path.stat().st_size
        return self.store.size(parse_digest(digest)) or 0

    def images(self, index_json: bytes, report: Report) -> list[Image]:
        try:
            doc = json.loads(index_json)
            entries = [(d, Descriptor.from_json(d)) for d in doc["manifests"]]
        except (ValueError, KeyError, TypeError, oci.ManifestError) as exc:
            raise BundleError(f"index.json is not an image index: {exc}") from None
        found = []
        for raw, desc in entries:
            annotations = raw.get("annotations") if isinstance(raw.get("annotations"), dict) \
                else {}
            label = annotations.get(layout.CONTAINERD_NAME) or annotations.get(
                layout.REF_NAME) or desc.digest
            try:
                ref = self._ref(annotations, report)
                root = self._unwrap(desc)
                closure = oci.walk(root, self.read, self.has, strict=True)
            except (imageref.RefError, oci.ManifestError) as exc:
                self.problems.append(f"{label}: {exc}")
                continue
            if not closure.complete:
                shown = ", ".join(closure.missing[:3]) + (
                    f" and {len(closure.missing) - 3} more" if len(closure.missing) > 3 else "")
                self.problems.append(
                    f"{label}: incomplete: {shown} neither in the bundle nor in the cache (an "
                    "incremental bundle goes on top of the one it was made against)")
                continue
            found.append(Image(ref, closure, str(ref) if ref else label))
        return found

    def _ref(self, annotations: dict[str, Any], report: Report) -> ImageRef | None:
        full = annotations.get(layout.CONTAINERD_NAME)
        name = full if isinstance(full, str) and full else annotations.get(layout.REF_NAME)
        if not isinstance(name, str) or not name:
            return None
        if not any(c in name for c in "/:@"):  # a bare tag
            if self.base is None:
                report.notes.append(f"{name!r} is only a tag: give --name REPOSITORY to tag it;"
                                    " imported untagged")
                return None
            return ImageRef(self.base.upstream, self.base.repo, name, None)
        return imageref.parse(name, self.upstreams, known_only=False)

    def _unwrap(self, desc: Descriptor) -> Descriptor:
        """The image an export's compatibility index stands for (see `mirror.airgap.exporter`)."""
        if desc.media_type != oci.OCI_INDEX:
            return desc
        data = self.read(desc.digest)
        if data is None:
            return desc
        annotations = oci.load(data).get("annotations")
        if not isinstance(annotations, dict):
            return desc
        target = annotations.get(exporter.TARGET_DIGEST)
        if not isinstance(target, str) or not self.has(target):
            return desc
        size = annotations.get(exporter.TARGET_SIZE, "")
        return Descriptor(str(annotations.get(exporter.TARGET_TYPE, "")), target,
                          int(size) if str(size).isdigit() else -1)

    # -- committing --------------------------------------------------------------------

    async def commit(self, images: list[Image], report: Report) -> None:
        """Everything checked out: move the blobs in and record what the bundle says.

        The operator vouches for a bundle: each image's content is held by the upstream it
        names, linked to its repository, and readable by anyone (an anonymous grant, which
        counts offline; online, access is probed again once it is older than access_ttl).
        """
        needed = {d for image in images for d in image.closure.digests}
        for name, path in self.staged.items():
            parsed = parse_digest(name)
            if name not in needed or await self.store.committed_size(parsed) is not None:
                path.unlink(missing_ok=True)
                continue
            report.added_bytes += path.stat().st_size
            await self.store.commit(parsed, path, None)
            report.added += 1
        self.staged.clear()
        metadata = self.store.metadata
        for image in images:
            closure = image.closure
            for digest, media_type in closure.manifests.items():
                data = self.read(digest) or b""
                await metadata.add_manifest(digest, media_type, oci.named_digests(data))
            ref, root = image.ref, closure.root.digest
            if ref is not None:
                media_type, size = closure.manifests[root], self.size(root)
                if ref.tag is not None:
                    await metadata.drop_tag(ref.upstream, ref.repo, ref.tag)  # the bundle says
                    await metadata.set_tag(TagRecord(ref.upstream, ref.repo, ref.tag, root,
                                                     media_type, size, time.time()), None)
                if ref.digest is not None:
                    await metadata.add_ref(RefRecord(ref.upstream, ref.repo, root, media_type,
                                                     size))
                await metadata.link(ref.upstream, ref.repo, closure.digests)
                for digest in closure.digests:
                    await self.store.add_holder(ref.upstream, parse_digest(digest))
                await metadata.grant(Grant(ref.upstream, ref.repo, ANONYMOUS_IDENTITY,
                                           time.time(), True))
            if self.pin:
                await self.store.pin(image.label, closure.digests)

    def discard(self) -> None:
        for path in self.staged.values():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.staged.clear()


def _input_size(source: Path) -> int | None:
    """Bytes to read, for progress (None for a compressed archive: unknown)."""
    if source.is_dir():
        return sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    with open(source, "rb") as f:
        head = f.read(8)
    return None if head.startswith(COMPRESSED) else os.stat(source).st_size


async def import_bundle(
    store: Store, upstreams: Sequence[Upstream], source: Path, progress: Progress,
    name: str | None = None, pin: bool = True,
) -> Report:
    """Import `source` (an OCI layout directory or a tar of one), all or nothing."""
    started = time.monotonic()
    report = Report()
    importer = Importer(store, upstreams, name, pin)
    try:
        index_json = importer.load(source, progress, report)
        if index_json is None:
            raise BundleError(f"{source}: not an OCI image layout (no index.json)")
        images = importer.images(index_json, report)
        if importer.problems:
            raise BundleError("\n".join(importer.problems))
        await importer.commit(images, report)
    finally:
        importer.discard()
    report.images = images
    report.elapsed = time.monotonic() - started
    return report


def summary(report: Report, source: Path) -> str:
    rate = report.added_bytes / report.elapsed if report.elapsed > 0 else 0.0
    lines = [f"imported {len(report.images)} image(s) from {source}: {report.added} blobs added "
             f"({human_bytes(report.added_bytes)}, {human_bytes(rate)}/s), {report.present} "
             f"already cached, in {human_duration(report.elapsed)}"]
    for image in report.images:
        lines.append(f"  {image.label} {image.closure.root.digest}")
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)

