"""`mirror export`: cached images out as one OCI image layout in a tar, for air-gapped sites.

`index.json` names each image by its full reference (`docker.io/library/nginx:1.27`) in both
`org.opencontainers.image.ref.name` and `io.containerd.image.name`. Manifests stay byte-exact;
an index keeps only the platforms the cache holds whole.

skopeo (as of 1.9) finds images by name only under OCI-typed descriptors, so a Docker-typed
image (a v2 manifest or manifest list) is named through a small OCI index that lists what it
lists (`wrapper`), annotated with the real manifest; `mirror import` records the tag against
that real manifest, so digests stay the upstream's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from mirror import errors, imageref, oci, policy
from mirror.airgap import layout
from mirror.airgap.progress import Progress, human_bytes, human_duration
from mirror.imageref import ImageRef
from mirror.oci import Closure, Descriptor
from mirror.reference import Digest, parse_digest
from mirror.settings import Upstream
from mirror.store import Store

TARGET_DIGEST = "mirror.target.digest"
TARGET_TYPE = "mirror.target.mediaType"
TARGET_SIZE = "mirror.target.size"


class ExportError(Exception):
    """Nothing was written; the message says why."""


@dataclass
class Entry:
    ref: ImageRef
    root: Descriptor
    closure: Closure
    wrapper: bytes | None = None

    @property
    def name(self) -> str:
        return str(self.ref)

    def descriptor(self) -> dict[str, Any]:
        """This image's entry in index.json."""
        if self.wrapper is not None:
            desc: dict[str, Any] = {"mediaType": oci.OCI_INDEX, "digest": sha256(self.wrapper),
                                    "size": len(self.wrapper)}
        else:
            desc = {"mediaType": self.root.media_type, "digest": self.root.digest,
                    "size": self.root.size}
        desc["annotations"] = {layout.CONTAINERD_NAME: self.name, layout.REF_NAME: self.name}
        return desc


@dataclass
class Report:
    entries: list[Entry]
    skipped: list[str] = field(default_factory=list)  # images left out, with why
    blobs: int = 0
    bytes: int = 0
    elapsed: float = 0.0


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _digest(value: str) -> Digest | None:
    try:
        return parse_digest(value)
    except errors.DigestInvalid:
        return None


class Exporter:
    def __init__(self, store: Store, upstreams: Sequence[Upstream]) -> None:
        self.store = store
        self.upstreams = upstreams
        self.policies = policy.policies(upstreams)

    def read(self, digest: str) -> bytes | None:
        parsed = _digest(digest)
        size = self.store.size(parsed) if parsed else None
        if parsed is None or size is None or size > oci.MAX_MANIFEST:
            return None
        return self.store.read_file(parsed)

    def has(self, digest: str) -> bool:
        parsed = _digest(digest)
        return parsed is not None and self.store.has(parsed)

    # -- what to export ------------------------------------------------------------------

    async def select(self, names: Sequence[str]) -> Report:
        """The entries for `names` (all cached images if none); raises if a named one is
        not whole in the cache."""
        report = Report([])
        if names:
            problems = []
            for text in names:
                try:
                    report.entries.append(await self._named(text))
                except (ExportError, imageref.RefError, oci.ManifestError) as exc:
                    problems.append(str(exc))
            if problems:
                raise ExportError("\n".join(problems))
        else:
            async for ref, root in self._everything():
                try:
                    report.entries.append(await self.entry(ref, root))
                except (ExportError, oci.ManifestError) as exc:
                    report.skipped.append(str(exc))
        by_name = {e.name: e for e in report.entries}
        report.entries = [by_name[n] for n in sorted(by_name)]
        return report

    async def _everything(self) -> AsyncIterator[tuple[ImageRef, Descriptor]]:
        metadata = self.store.metadata
        async for r in metadata.iter_tags():
            yield ImageRef(r.upstream, r.repo, r.tag, None), Descriptor(r.media_type, r.digest,
                                                                        r.size)
        async for ref in metadata.iter_refs():
            if not await metadata.tagged(ref.upstream, ref.repo, ref.digest):
                yield (ImageRef(ref.upstream, ref.repo, None, ref.digest),
                       Descriptor(ref.media_type, ref.digest, ref.size))

    async def _named(self, text: str) -> Entry:
        ref = imageref.parse(text, self.upstreams)
        digest = ref.digest
        media_type = ""
        if digest is None:
            assert ref.tag is not None
            record = await self.store.metadata.tag(ref.upstream, ref.repo, ref.tag, None)
            if record is None:
                raise ExportError(f"{ref}: not in the cache (seed it first)")
            digest, media_type = record.digest, record.media_type
        return await self.entry(ref, Descriptor(media_type, digest, -1))

    async def entry(self, ref: ImageRef, root: Descriptor) -> Entry:
        try:
            policy.check(self.policies, ref.upstream, ref.repo)
        except policy.Refused as exc:
            raise ExportError(f"{ref}: {exc.message}") from None
        parsed = _digest(root.digest)
        size = self.store.size(parsed) if parsed else None
        if parsed is None or size is None:
            raise ExportError(f"{ref}: manifest {root.digest} is not in the cache")
        media_type = await self.store.metadata.media_type(root.digest) or root.media_type
        root = Descriptor(media_type, root.digest, size)
        closure = oci.walk(root, self.read, self.has)
        if not closure.complete:
            shown = ", ".join(closure.missing[:3]) + (" ..." if len(closure.missing) > 3 else "")
            raise ExportError(f"{ref}: not whole in the cache (missing {shown})")
        root = Descriptor(closure.manifests[root.digest], root.digest, size)
        entry = Entry(ref, root, closure)
        entry.wrapper = self._wrapper(entry)
        return entry

    def _wrapper(self, entry: Entry) -> bytes | None:
        """For a Docker-typed image: an OCI index listing its platform manifests."""
        root = entry.root
        data = self.read(root.digest)
        assert data is not None
        doc = oci.load(data)
        if root.media_type == oci.DOCKER_LIST:
            kept = [m for m in doc.get("manifests") or []
                    if isinstance(m, dict) and m.get("digest") in entry.closure.manifests]
        elif root.media_type == oci.DOCKER_MANIFEST:
            kept = [{"mediaType": root.media_type, "digest": root.digest, "size": root.size,
                     **self._platform(doc)}]
        else:
            return None
        wrapper = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_INDEX,
            "manifests": kept,
            "annotations": {TARGET_DIGEST: root.digest, TARGET_TYPE: root.media_type,
                            TARGET_SIZE: str(root.size)},
        }
        return json.dumps(wrapper, indent=2).encode() + b"\n"

    def _platform(self, manifest: dict[str, Any]) -> dict[str, Any]:
        config = manifest.get("config")
        data = self.read(config["digest"]) if isinstance(config, dict) else None
        try:
            doc = oci.load(data) if data else {}
        except oci.ManifestError:
            doc = {}
        platform = {k: doc[k] for k in ("architecture", "os", "variant")
                    if isinstance(doc.get(k), str) and doc[k]}
        return {"platform": platform} if "os" in platform and "architecture" in platform else {}

    # -- writing -------------------------------------------------------------------------

    def write(self, report: Report, out: BinaryIO, since: set[str], progress: Progress) -> None:
        index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
                 "manifests": [e.descriptor() for e in report.entries]}
        extra = {sha256(e.wrapper): e.wrapper for e in report.entries if e.wrapper is not None}
        sizes: dict[str, int] = {}
        for entry in report.entries:
            for digest in entry.closure.digests:
                if digest not in since:
                    sizes[digest] = self.store.size(parse_digest(digest)) or 0
        # Wrappers always go: an importer reads them to learn what each entry names.
        sizes.update({d: len(w) for d, w in extra.items()})
        report.blobs, report.bytes = len(sizes), sum(sizes.values())
        task = progress.task("export", report.bytes)
        writer = layout.TarWriter(out, task.advance)
        writer.add_bytes(layout.LAYOUT_FILE, layout.LAYOUT_VERSION + b"\n")
        writer.add_bytes(layout.INDEX_FILE, json.dumps(index, indent=2).encode() + b"\n")
        for digest in sorted(sizes, key=layout.blob_name):
            if digest in extra:
                writer.add_bytes(layout.blob_name(digest), extra[digest])
            else:
                writer.add_file(layout.blob_name(digest), self.store.path(parse_digest(digest)))
        writer.close()
        task.finish(f"{report.blobs} blobs, {human_bytes(report.bytes)}")


async def export(
    store: Store, upstreams: Sequence[Upstream], output: str, names: Sequence[str],
    since: Path | None, progress: Progress,
) -> Report:
    """Write the bundle to `output` (`-`: standard output); in place only when complete."""
    started = time.monotonic()
    exporter = Exporter(store, upstreams)
    report = await exporter.select(names)
    if not report.entries:
        raise ExportError("no cached image to export" + (
            ": " + "; ".join(report.skipped) if report.skipped else ""))
    old = layout.blob_digests(since) if since is not None else set()
    if output == "-":
        exporter.write(report, sys.stdout.buffer, old, progress)
    else:
        target = Path(output)
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            with open(part, "wb") as out:
                exporter.write(report, out, old, progress)
            os.replace(part, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
    report.elapsed = time.monotonic() - started
    return report


def summary(report: Report, output: str) -> str:
    rate = report.bytes / report.elapsed if report.elapsed > 0 else 0.0
    lines = [f"exported {len(report.entries)} image(s) to {output}: {report.blobs} blobs, "
             f"{human_bytes(report.bytes)} in {human_duration(report.elapsed)} "
             f"({human_bytes(rate)}/s)"]
    for entry in report.entries:
        closure = entry.closure
        platforms = f", {closure.images} of {closure.images + closure.skipped} platforms" \
            if closure.skipped else ""
        lines.append(f"  {entry.name} {entry.root.digest}{platforms}")
    lines += [f"  skipped: {why}" for why in report.skipped]
    return "\n".join(lines)
