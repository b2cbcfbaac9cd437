"""What the pages show of an image, read from the cache: platforms, sizes, annotations,
layers. Who may see an upstream's repository is for `mirror.ui.visitors` to say; what its
pages show of a document (a manifest, an index, a config) comes only from bytes that
upstream itself delivered (rule 1 of `mirror.access`): a digest it merely names (a tag's
HEAD, a descriptor) shows nothing of what another upstream delivered under that digest.

Manifests and configs are read through the store (`Store.read`, which checks them against
their records) and parsed once: their documents are kept in a small LRU, since content never
changes under its digest. Closure sizes come from content records, which do change (layers
arrive, are evicted), so they are kept a minute only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import cachetools

from mirror import oci
from mirror.errors import DigestInvalid
from mirror.metadata import PAGE, ContentRecord, Metadata
from mirror.reference import parse_digest
from mirror.store import Store

MAX_DOCUMENT = oci.MAX_MANIFEST  # larger manifests are not shown (registries refuse them)
MAX_CONFIG = 1 << 20  # a config this large is not read for its labels
MAX_CHILDREN = 256  # an index's platforms (and a manifest's layers) looked at, at most
DOCUMENT_BYTES = 16 << 20  # parsed documents kept, counted by their size
SIZE_ENTRIES, SIZE_TTL = 20_000, 60.0

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
        self._summaries: cachetools.TTLCache[tuple[str, str], Summary] = cachetools.TTLCache(
            SIZE_ENTRIES, SIZE_TTL)

    # -- records and documents -------------------------------------------------------------

    async def records(self, digests: Iterable[str]) -> dict[str, ContentRecord]:
        """Content records, a page of digests per metadata read."""
        wanted = list(dict.fromkeys(digests))
        found: dict[str, ContentRecord] = {}
        for start in range(0, len(wanted), PAGE):
            found.update(await self.metadata.contents(wanted[start:start + PAGE]))
        return found

    async def last_used(self, digests: Iterable[str]) -> dict[str, float]:
        """Last uses: this process's newest (not yet written) first, else the records'."""
        wanted = list(digests)
        pending = self.store.recency.pending
        found = {d: pending[d] for d in wanted if d in pending}
        records = await self.records(d for d in wanted if d not in found)
        return {**{d: r.used for d, r in records.items()}, **found}

    async def held(self, upstream: str, digests: Iterable[str]) -> set[str]:
        """Those of `digests` whose bytes `upstream` delivered (or accepted): the only
        content its pages may show."""
        found = set()
        for digest in dict.fromkeys(digests):
            with contextlib.suppress(DigestInvalid):
                if await self.store.holds(upstream, parse_digest(digest)):
                    found.add(digest)
        return found

    async def documents(self, wanted: Mapping[str, int],
                        upstream: str) -> dict[str, dict[str, Any]]:
        """Cached JSON documents (manifests, indexes, configs) that `upstream` delivered,
        parsed, by digest; `wanted` gives each digest's size limit. Those not cached, not
        delivered by `upstream`, too large or not JSON objects are left out."""
        found: dict[str, dict[str, Any]] = {}
        held = await self.held(upstream, wanted)
        for digest in wanted:
            kept = self._documents.get(digest)
            if kept is not None and digest in held:
                found[digest] = kept[0]
        records = await self.records(d for d in wanted if d not in found and d in held)
        for digest, record in records.items():
            if record.size > wanted[digest]:
                continue  # a descriptor may name anything as a config: nothing large is read
            data = await self._read(digest, record.size)
            if data is None:
                continue
            try:
                doc = oci.load(data)
            except oci.ManifestError:
                continue
            self._documents[digest] = (doc, len(data))
            found[digest] = doc
        return found

    async def document(self, digest: str, upstream: str,
                       limit: int = MAX_DOCUMENT) -> dict[str, Any] | None:
        return (await self.documents({digest: limit}, upstream)).get(digest)

    async def _read(self, digest: str, size: int) -> bytes | None:
        """The committed bytes of `digest`, when they have the length its record verified
        (a file that does not is left for the next pull to replace)."""
        try:
            parsed = parse_digest(digest)
        except DigestInvalid:
            return None
        try:
            with open(self.store.path(parsed), "rb") as file:
                data = file.read(size + 1)
        except FileNotFoundError:
            return await self.store.read(parsed) if self.store.remote is not None else None
        return data if len(data) == size else None

    @staticmethod
    def _config_digest(doc: Mapping[str, Any] | None) -> str | None:
        config = _mapping(doc.get("config")) if doc is not None else None
        digest = config.get("digest") if config is not None else None
        return digest if isinstance(digest, str) else None

    async def config_of(self, manifest: Mapping[str, Any] | None,
                        upstream: str) -> dict[str, Any] | None:
        digest = self._config_digest(manifest)
        return await self.document(digest, upstream, MAX_CONFIG) if digest is not None \
            else None

    # -- rows of the tag table -------------------------------------------------------------

    async def summaries(self, images: Sequence[tuple[str, str]],
                        upstream: str) -> list[Summary]:
        """Summaries of (digest, media type) pairs of `upstream`'s repositories, read
        together: a few metadata reads for a whole page, whatever it holds."""
        todo = {d: t for d, t in images if (upstream, d) not in self._summaries}
        if todo:
            roots = await self.documents(dict.fromkeys(todo, MAX_DOCUMENT), upstream)
            second: dict[str, int] = {}  # an index's manifests, an image's config
            for digest, doc in roots.items():
                if oci.is_index(doc, todo[digest]):
                    second.update(dict.fromkeys(_named(doc, "manifests"), MAX_DOCUMENT))
                elif (config := self._config_digest(doc)) is not None:
                    second[config] = MAX_CONFIG
            inner = await self.documents(second, upstream)
            closures = {d: self._closure(d, roots.get(d), t, inner) for d, t in todo.items()}
            records = await self.records(n for names in closures.values() for n in names)
            held = await self.held(upstream, todo)
            for digest, media_type in todo.items():
                self._summaries[(upstream, digest)] = self._summary(
                    digest, roots.get(digest), media_type, inner, closures[digest],
                    records if digest in held else {})
        return [self._summaries[(upstream, d)] for d, _ in images]

    async def summary(self, digest: str, media_type: str, upstream: str) -> Summary:
        return (await self.summaries([(digest, media_type)], upstream))[0]

    def _closure(self, digest: str, doc: dict[str, Any] | None, media_type: str,
                 inner: Mapping[str, dict[str, Any]]) -> list[str]:
        """The image and what it names: an index's manifests and what they name."""
        names = [digest]
        if doc is None:
            return names
        named = _named(doc)
        names += named
        if oci.is_index(doc, media_type):
            for child in named:
                child_doc = inner.get(child)
                names += _named(child_doc) if child_doc is not None else []
        return names

    def _summary(self, digest: str, doc: dict[str, Any] | None, media_type: str,
                 inner: Mapping[str, dict[str, Any]], closure: list[str],
                 records: Mapping[str, ContentRecord]) -> Summary:
        platforms: tuple[str, ...] = ()
        if doc is not None and oci.is_index(doc, media_type):
            platforms = tuple(self._index_platforms(doc))
        elif doc is not None:
            config = self._config_digest(doc)
            platform = platform_of(inner.get(config)) if config is not None else ""
            platforms = (platform,) if platform else ()
        if digest not in records:
            return Summary(platforms, None, False)
        names = set(closure)
        total = sum(records[n].size for n in names if n in records)
        return Summary(platforms, total, names <= records.keys())

    @staticmethod
    def _index_platforms(doc: Mapping[str, Any]) -> list[str]:
        names = []
        for entry in (doc.get("manifests") or [])[:MAX_CHILDREN]:
            name = platform_of(_mapping(entry) and entry.get("platform"))
            if name and name != "unknown/unknown" and name not in names:  # not attestations
                names.append(name)
        return names

    # -- an image's page -------------------------------------------------------------------

    async def details(self, digest: str, media_type: str, upstream: str) -> Details:
        """An image of `upstream`'s, from the documents that upstream delivered."""
        doc = await self.document(digest, upstream)
        media_type = media_type or (oci.media_type(doc) if doc is not None else "")
        details = Details(digest, media_type, doc is not None)
        details.summary = await self.summary(digest, media_type, upstream)
        details.pinned = await self.metadata.pinned(digest)
        details.used = (await self.last_used([digest])).get(digest)
        details.fetched = self._stored_at(digest)
        if doc is None:
            return details
        if oci.is_index(doc, media_type):
            details.index = True
            details.platforms = await self._parts(doc.get("manifests"), with_platform=True)
            child = self._main_child(details.platforms)
            child_doc = await self.document(child.digest, upstream) if child is not None \
                else None
            config = await self.config_of(child_doc, upstream) if child_doc is not None \
                else None
            details.labels = merge_fields(_mapping(doc.get("annotations")),
                                          _mapping(child_doc and child_doc.get("annotations")),
                                          _labels(config))
        else:
            config = await self.config_of(doc, upstream)
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
        records = await self.records(e["digest"] for e in entries)
        return [Part(e["digest"], str(e.get("mediaType") or ""),
                     e["size"] if isinstance(e.get("size"), int) else -1, e["digest"] in records,
                     platform_of(e.get("platform")) if with_platform else "")
                for e in entries]

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


def _named(doc: Mapping[str, Any], *keys: str) -> list[str]:
    """The digests a document's descriptors name (`keys`: config, layers, manifests by
    default), at most MAX_CHILDREN of each kind."""
    found: list[str] = []
    for key in keys or ("config", "layers", "manifests"):
        value = doc.get(key)
        items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
        found += [item["digest"] for item in items[:MAX_CHILDREN]
                  if isinstance(item, dict) and isinstance(item.get("digest"), str)]
    return found
