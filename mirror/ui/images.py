"""What the pages show of an image, read from the cache: platforms, sizes, annotations,
layers. Content is named by its digest, so what a page shows of D is what any upstream
holding D serves; who may see it is for `mirror.ui.visitors` to say.

Manifests and configs are read through the store (`Store.read`, which checks them against
their records) and parsed once: their documents are kept in a small LRU, since content never
changes under its digest. Closure sizes come from content records, which do change (layers
arrive, are evicted), so they are kept a minute only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import cachetools

from mirror import oci
from mirror.errors import DigestInvalid
from mirror.metadata import Metadata
from mirror.reference import Digest, parse_digest
from mirror.store import Store

MAX_DOCUMENT = oci.MAX_MANIFEST  # larger manifests are not shown (registries refuse them)
MAX_CONFIG = 1 << 20  # a config this large is not read for its labels
MAX_CHILDREN = 256  # an index's platforms (and a manifest's layers) looked at, at most
DOCUMENT_BYTES = 16 << 20  # parsed documents kept, counted by their size
SIZE_ENTRIES, SIZE_TTL = 20_000, 60.0
CONCURRENCY = 16  # reads in flight for one page

# The standard annotations (and labels) a page shows, with the length each is cut to.
FIELDS: tuple[tuple[str, str, int], ...] = (
    ("title", "org.opencontainers.image.title", 256),
    ("description", "org.opencontainers.image.description", 512),
    ("licenses", "org.opencontainers.image.licenses", 256),
    ("source", "org.opencontainers.image.source", 512),
    ("revision", "org.opencontainers.image.revision", 128),
    ("version", "org.opencontainers.image.version", 128),
    ("created", "org.opencontainers.image.created", 64),
    ("vendor", "org.opencontainers.image.vendor", 256),
    ("url", "org.opencontainers.image.url", 512),
)
LINKS = ("source", "url")  # fields shown as links when they are http(s) URLs


@dataclass(frozen=True, slots=True)
class Summary:
    """A row of a repository's tag table."""

    platforms: tuple[str, ...]
    size: int | None  # bytes of the cached content of the image's closure; None: none
    complete: bool  # every manifest and blob it names is cached


@dataclass(frozen=True, slots=True)
class Part:
    """A descriptor an image names: a layer, its config, or a platform of an index."""

    digest: str
    media_type: str
    size: int
    cached: bool
    platform: str = ""


@dataclass(slots=True)
class Details:
    """An image as its page shows it."""

    digest: str
    media_type: str
    cached: bool  # its manifest is in the cache (else only its record is)
    index: bool = False
    labels: dict[str, str] = field(default_factory=lambda: merge_fields())  # FIELDS, cut
    platforms: list[Part] = field(default_factory=list)  # of an index
    config: Part | None = None
    layers: list[Part] = field(default_factory=list)
    platform: str = ""  # of an image manifest, from its config
    summary: Summary | None = None
    pinned: bool = False
    fetched: float | None = None  # when its manifest was stored here
    used: float | None = None  # its last pull (content last use)

    def link(self, name: str) -> str | None:
        """A field that is a plain http(s) URL: safe to put in an href."""
        return safe_url(self.labels[name])


def safe_url(text: str) -> str | None:
    parts = urlsplit(text)
    if parts.scheme in ("http", "https") and parts.netloc and text.isprintable() \
            and " " not in text:
        return text
    return None


def clean(value: object, limit: int) -> str | None:
    """A string annotation as shown: printable, trimmed, cut to `limit` characters."""
    if not isinstance(value, str):
        return None
    text = "".join(c if c.isprintable() or c in "\n\t" else " " for c in value).strip()
    if not text:
        return None
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def platform_of(value: object) -> str:
    """`os/arch[/variant]` of a descriptor's platform or a config."""
    if not isinstance(value, dict):
        return ""
    parts = [value.get("os"), value.get("architecture"), value.get("variant")]
    return "/".join(p for p in parts if isinstance(p, str) and p)


def merge_fields(*sources: Mapping[str, Any] | None) -> dict[str, str]:
    """Every one of FIELDS, from the first source that has it ("" when none does)."""
    found = dict.fromkeys((name for name, _, _ in FIELDS), "")
    for name, key, limit in FIELDS:
        for source in sources:
            if source is not None and not found[name]:
                found[name] = clean(source.get(key), limit) or ""
    return found


def _mapping(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


class Images:
    def __init__(self, store: Store, metadata: Metadata) -> None:
        self.store = store
        self.metadata = metadata
        self._documents: cachetools.LRUCache[str, tuple[dict[str, Any], int]] = \
            cachetools.LRUCache(DOCUMENT_BYTES, getsizeof=lambda entry: entry[1])
        self._summaries: cachetools.TTLCache[str, Summary] = cachetools.TTLCache(
            SIZE_ENTRIES, SIZE_TTL)
        self._limit = asyncio.Semaphore(CONCURRENCY)

    # -- documents -------------------------------------------------------------------------

    async def document(self, digest: str, limit: int = MAX_DOCUMENT) -> dict[str, Any] | None:
        """A cached JSON document (manifest, index, config), parsed; None if not cached,
        too large or not a JSON object."""
        kept = self._documents.get(digest)
        if kept is not None:
            return kept[0]
        try:
            parsed = parse_digest(digest)
        except DigestInvalid:
            return None
        data = await self._read(parsed, limit)
        if data is None:
            return None
        try:
            doc = oci.load(data)
        except oci.ManifestError:
            return None
        self._documents[digest] = (doc, len(data))
        return doc

    async def _read(self, digest: Digest, limit: int) -> bytes | None:
        """Committed content of at most `limit` bytes, checked against its record (a
        descriptor may name anything as a config: nothing large is read)."""
        opened = await self.store.open(digest)
        if opened is None:
            if self.store.remote is None:
                return None
            record = await self.metadata.content(str(digest))  # in the object store only
            return await self.store.read(digest) if record and record.size <= limit else None
        fd, size = opened
        try:
            return os.pread(fd, size, 0) if size <= limit else None
        finally:
            os.close(fd)

    async def config_of(self, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        config = _mapping(manifest.get("config"))
        digest = config.get("digest") if config else None
        return await self.document(digest, MAX_CONFIG) if isinstance(digest, str) else None

    # -- a row of the tag table ------------------------------------------------------------

    async def summary(self, digest: str, media_type: str) -> Summary:
        kept = self._summaries.get(digest)
        if kept is not None:
            return kept
        async with self._limit:
            doc = await self.document(digest)
            platforms: tuple[str, ...] = ()
            if doc is not None and oci.is_index(doc, media_type):
                platforms = tuple(self._index_platforms(doc))
            elif doc is not None:
                config = await self.config_of(doc)
                platform = platform_of(config)
                platforms = (platform,) if platform else ()
            size, complete = await self.closure_size(digest, doc, media_type)
        summary = Summary(platforms, size, complete)
        self._summaries[digest] = summary
        return summary

    @staticmethod
    def _index_platforms(doc: Mapping[str, Any]) -> list[str]:
        names = []
        for entry in (doc.get("manifests") or [])[:MAX_CHILDREN]:
            name = platform_of(_mapping(entry) and entry.get("platform"))
            if name and name != "unknown/unknown" and name not in names:  # not attestations
                names.append(name)
        return names

    async def closure_size(self, digest: str, doc: dict[str, Any] | None,
                           media_type: str) -> tuple[int | None, bool]:
        """Bytes of the cached content of the image and what it names (an index: its
        manifests and theirs), from content records and recorded children."""
        kept = self._documents.get(digest)  # read just now, checked against its record
        if kept is not None:
            root_size = kept[1]
        else:
            root = await self.metadata.content(digest)
            if root is None:
                return None, False
            root_size = root.size
        names = (await self.metadata.children(digest) or [])[:MAX_CHILDREN]
        if doc is not None and oci.is_index(doc, media_type):
            for child in list(names):
                names += (await self.metadata.children(child) or [])[:MAX_CHILDREN]
        total, complete = root_size, True
        for name in sorted(set(names) - {digest}):  # one at a time: rows run side by side
            record = await self.metadata.content(name)
            total += record.size if record is not None else 0
            complete = complete and record is not None
        return total, complete

    # -- an image's page -------------------------------------------------------------------

    async def details(self, digest: str, media_type: str) -> Details:
        doc = await self.document(digest)
        media_type = media_type or (oci.media_type(doc) if doc is not None else "")
        details = Details(digest, media_type, doc is not None)
        details.summary = await self.summary(digest, media_type)
        details.pinned = await self.metadata.pinned(digest)
        details.used = await self.store.recency.last_used(digest)
        details.fetched = self._stored_at(digest)
        if doc is None:
            return details
        if oci.is_index(doc, media_type):
            details.index = True
            details.platforms = await self._parts(doc.get("manifests"), with_platform=True)
            child = self._main_child(details.platforms)
            child_doc = await self.document(child.digest) if child is not None else None
            config = await self.config_of(child_doc) if child_doc is not None else None
            details.labels = merge_fields(_mapping(doc.get("annotations")),
                                          _mapping(child_doc and child_doc.get("annotations")),
                                          _labels(config))
        else:
            config = await self.config_of(doc)
            details.platform = platform_of(config)
            configs = await self._parts([doc.get("config")])
            details.config = configs[0] if configs else None
            details.layers = await self._parts(doc.get("layers"))
            details.labels = merge_fields(_mapping(doc.get("annotations")), _labels(config))
        if not details.labels["created"] and config is not None:
            details.labels["created"] = clean(config.get("created"), 64) or ""
        return details

    async def _parts(self, value: object, with_platform: bool = False) -> list[Part]:
        entries = [e for e in (value if isinstance(value, list) else [])[:MAX_CHILDREN]
                   if isinstance(e, dict) and isinstance(e.get("digest"), str)]
        records = await asyncio.gather(*(self.metadata.content(e["digest"]) for e in entries))
        return [Part(e["digest"], str(e.get("mediaType") or ""),
                     e["size"] if isinstance(e.get("size"), int) else -1, r is not None,
                     platform_of(e.get("platform")) if with_platform else "")
                for e, r in zip(entries, records, strict=True)]

    @staticmethod
    def _main_child(platforms: list[Part]) -> Part | None:
        """The platform whose annotations and labels stand for the index: a cached one,
        linux/amd64 first (the most common), never an attestation."""
        usable = [p for p in platforms if p.cached and p.platform != "unknown/unknown"]
        usable.sort(key=lambda p: not p.platform.startswith("linux/amd64"))
        return usable[0] if usable else None

    def _stored_at(self, digest: str) -> float | None:
        with contextlib.suppress(OSError, DigestInvalid):
            return os.stat(self.store.path(parse_digest(digest))).st_mtime
        return None


def _labels(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    inner = _mapping(config.get("config")) if config is not None else None
    return _mapping(inner.get("Labels")) if inner is not None else None
