"""What an image is made of: walking a manifest (or index) down to every blob it needs.

Shared by seeding (what to fetch), export (what to write) and import (what must be there).
Content is looked up through callbacks, so the same walk runs over the cache, over a bundle
being imported, or over both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MAX_MANIFEST = 4 * 1024 * 1024

Read = Callable[[str], bytes | None]  # digest -> manifest bytes, None if absent
Has = Callable[[str], bool]  # digest -> whether the blob is there


class ManifestError(ValueError):
    """A manifest that is not a JSON object we can read."""


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`os/arch[/variant]`, e.g. `linux/arm64/v8`."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"expected OS/ARCH[/VARIANT], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, other: Platform) -> bool:
        """Whether `other` (a descriptor's platform) is what this filter asks for."""
        return (self.os == other.os and self.architecture == other.architecture
                and (self.variant is None or self.variant == other.variant))


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None

    @classmethod
    def from_json(cls, value: Any) -> Descriptor:
        if not isinstance(value, dict) or not isinstance(value.get("digest"), str):
            raise ManifestError(f"bad descriptor {str(value)[:200]}")
        size = value.get("size")
        platform = value.get("platform")
        return cls(
            str(value.get("mediaType") or ""), value["digest"],
            size if isinstance(size, int) else -1,
            Platform(str(platform.get("os", "")), str(platform.get("architecture", "")),
                     platform.get("variant"))
            if isinstance(platform, dict) else None)


def load(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError("not a JSON object")
    return doc


def media_type(doc: dict[str, Any], declared: str = "") -> str:
    """The manifest's type: as its descriptor declared, else as the document says."""
    if declared:
        return declared
    value = doc.get("mediaType")
    if isinstance(value, str) and value:
        return value
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def is_index(doc: dict[str, Any], declared: str = "") -> bool:
    return media_type(doc, declared) in INDEX_TYPES or (
        not declared and isinstance(doc.get("manifests"), list))


def children(doc: dict[str, Any]) -> list[Descriptor]:
    """The manifests an index lists."""
    return [Descriptor.from_json(d) for d in doc.get("manifests") or []]


def blobs(doc: dict[str, Any]) -> list[Descriptor]:
    """The config and layers an image manifest needs (schema 1's `fsLayers` too)."""
    found = []
    if doc.get("config") is not None:
        found.append(Descriptor.from_json(doc["config"]))
    found += [Descriptor.from_json(d) for d in doc.get("layers") or []]
    for layer in doc.get("fsLayers") or []:
        if isinstance(layer, dict) and isinstance(layer.get("blobSum"), str):
            found.append(Descriptor("", layer["blobSum"], -1))
    return found


def named_digests(data: bytes) -> list[str]:
    """Every digest a manifest names (config, layers, index entries, schema 1 layers),
    whatever its type says: what `cache rm` and `gc` follow. Never a basis for access
    (`mirror.access.linked_descriptors` is)."""
    try:
        doc = load(data)
    except ManifestError:
        return []
    found = []
    for key in ("config",):
        value = doc.get(key)
        if isinstance(value, dict) and isinstance(value.get("digest"), str):
            found.append(value["digest"])
    for key, field_name in (("layers", "digest"), ("manifests", "digest"),
                            ("fsLayers", "blobSum")):
        items = doc.get(key)
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and isinstance(item.get(field_name), str):
                found.append(item[field_name])
    return found


@dataclass
class Closure:
    """Everything one image needs, as found; `missing` empty means complete."""

    root: Descriptor
    manifests: dict[str, str] = field(default_factory=dict)  # digest -> media type
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size (-1 unknown)
    missing: list[str] = field(default_factory=list)
    images: int = 0  # image manifests kept
    skipped: int = 0  # index children left out (absent, or incomplete when not strict)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def digests(self) -> list[str]:
        return [*self.manifests, *self.blobs]


def walk(root: Descriptor, read: Read, has: Has, *, strict: bool = False,
         depth: int = 0) -> Closure:
    """The closure of `root`.

    An index keeps the children that are there (a cache or a bundle may carry only some
    platforms) and is incomplete only if none is. A child that is there but lacks content
    is left out too, unless `strict`: then its missing content makes the image incomplete.
    """
    closure = Closure(root)
    data = read(root.digest)
    if data is None:
        closure.missing.append(root.digest)
        return closure
    try:
        doc = load(data)
        closure.manifests[root.digest] = media_type(doc, root.media_type)
        if not is_index(doc, root.media_type):
            for blob in blobs(doc):
                if has(blob.digest):
                    closure.blobs[blob.digest] = blob.size
                else:
                    closure.missing.append(blob.digest)
            closure.images = 1
            return closure
        if depth > 4:
            raise ManifestError("indexes nested too deep")
        kids = children(doc)
    except ManifestError as exc:
        raise ManifestError(f"manifest {root.digest}: {exc}") from None
    for child in kids:
        sub = walk(child, read, has, strict=strict, depth=depth + 1)
        if sub.complete:
            closure.manifests.update(sub.manifests)
            closure.blobs.update(sub.blobs)
            closure.images += sub.images
            closure.skipped += sub.skipped
        else:
            closure.skipped += 1
            if strict and child.digest in sub.manifests:
                closure.missing += sub.missing
    if kids and closure.images == 0 and not closure.missing:
        closure.missing += [k.digest for k in kids]
    return closure
