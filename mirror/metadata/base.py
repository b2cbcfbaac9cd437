"""The metadata interface: everything the mirror knows besides content bytes.

Two implementations keep it: `SqliteMetadata` (the embedded default, one file beside the
cache) and `RedisMetadata` (shared by replicas). Services reach metadata only through this
interface; every operation touches only what it names (point reads and writes on indexed
keys), and the listings (`iter_*`) stream in pages, so cost follows what an operation
touches, not the size of the cache.

What it holds:
- tag records: a tag's resolution per normalised Accept set, plus the latest one whatever
  the Accept set (what offline and stale serving fall back to);
- manifests: media type and children (config, layers, index entries) of stored manifests;
- content: size, last use and holders (the upstreams that delivered the bytes) of every
  committed digest, and the running totals the byte budget needs;
- access facts (`mirror.access` defines them): repository links and caller grants;
- pins, images named by digest (refs), pushes (tag generations), upload sessions, locks;
- pull counts of tags (for the cache browser's "most pulled"), one per tag record at most.

Errors: `MetadataError` and its subclasses; an implementation turns its backend's failures
into them (`MetadataUnavailable` when the backend cannot be reached).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# A normalised Accept set (sorted media types); None names the latest record of any set.
AcceptKey = tuple[str, ...]



def accept_text(accept: AcceptKey | None) -> str:
    """How an Accept key is stored: '-' for the latest record, else the types joined."""
    return "-" if accept is None else ",".join(accept)


# Listings are read in pages of this many rows: constant memory whatever the cache holds.
PAGE = 500


class MetadataError(Exception):
    """Metadata could not be read or written."""


class MetadataUnavailable(MetadataError):
    """The metadata backend cannot be reached (a Redis server down, a disk gone)."""


@dataclass(frozen=True, slots=True)
class TagRecord:
    upstream: str
    repo: str
    tag: str
    digest: str
    media_type: str
    size: int
    at: float  # time.time() of the resolution


@dataclass(frozen=True, slots=True)
class RefRecord:
    """An image named by digest (seeded, imported): what a tag is to images named by tag."""

    upstream: str
    repo: str
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class ContentRecord:
    digest: str
    size: int
    used: float  # time.time() of the last use (the commit counts as one)


@dataclass(frozen=True, slots=True)
class PullCount:
    """How often a tag was pulled (resolved for a client) since it was first recorded."""

    upstream: str
    repo: str
    tag: str
    count: int


@dataclass(frozen=True, slots=True)
class Grant:
    """A caller proved, at `at`, that it may read a repository (see `mirror.access`)."""

    upstream: str
    repo: str
    identity: str
    at: float
    durable: bool  # kept for offline use (an identity that outlives one token)


class Metadata(abc.ABC):
    """The operations the services need. All are coroutines; none scans the whole store."""

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect, create or migrate the schema; called once before use."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the backend answers (for readiness)."""

    @abc.abstractmethod
    async def secret(self) -> bytes:
        """This installation's MAC key (created once, shared by every worker and replica)."""

    # -- manifests -------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_manifest(self, digest: str, media_type: str, children: Iterable[str]) -> None:
        """A stored manifest: its media type and the digests it names (config, layers,
        index entries), which `cache rm` and `gc` follow."""

    @abc.abstractmethod
    async def media_type(self, digest: str) -> str | None: ...

    @abc.abstractmethod
    async def children(self, digest: str) -> list[str] | None:
        """What the manifest names; None if it is not a recorded manifest."""

    @abc.abstractmethod
    async def parents(self, digest: str) -> list[str]:
        """The recorded manifests that name `digest`."""

    # -- content ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_content(self, digest: str, size: int, holder: str | None, at: float) -> bool:
        """Committed content of `size` bytes; `holder` the upstream that delivered it.
        Returns whether it was new (the totals grew)."""

    @abc.abstractmethod
    async def content(self, digest: str) -> ContentRecord | None: ...

    @abc.abstractmethod
    async def contents(self, digests: Sequence[str]) -> dict[str, ContentRecord]:
        """The records of several digests at once (at most `PAGE`), keyed by digest;
        digests without one are left out."""

    @abc.abstractmethod
    async def drop_content(self, digests: Iterable[str]) -> int:
        """Content removed (evicted, damaged, collected); returns the bytes it held."""

    @abc.abstractmethod
    async def totals(self) -> tuple[int, int]:
        """(bytes, entries) of recorded content."""

    @abc.abstractmethod
    def oldest(self, before: float) -> AsyncIterator[ContentRecord]:
        """Unpinned content last used before `before`, least recently used first."""

    @abc.abstractmethod
    def iter_content(self, after: str = "") -> AsyncIterator[ContentRecord]:
        """Every recorded content entry after `after`, in digest order."""

    @abc.abstractmethod
    async def touch(self, uses: Mapping[str, float]) -> None:
        """Record last uses (batched); a later use recorded by another process stays."""

    @abc.abstractmethod
    async def add_holder(self, digest: str, upstream: str) -> None: ...

    @abc.abstractmethod
    async def holds(self, upstream: str, digest: str) -> bool:
        """Whether `upstream` itself delivered (or accepted) the bytes of `digest`."""

    # -- tags ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def tag(self, upstream: str, repo: str, tag: str,
                  accept: AcceptKey | None) -> TagRecord | None:
        """The record for exactly this Accept set (None: the latest of any)."""

    @abc.abstractmethod
    async def set_tag(self, record: TagRecord, accept: AcceptKey | None) -> None:
        """Record a resolution for `accept` and as the tag's latest."""

    @abc.abstractmethod
    async def drop_tag(self, upstream: str, repo: str, tag: str) -> list[str]:
        """Forget every record of the tag; returns the digests they named."""

    @abc.abstractmethod
    async def tag_digests(self, upstream: str, repo: str, tag: str) -> list[str]:
        """The digests the tag's records name (one per Accept set, deduplicated)."""

    @abc.abstractmethod
    async def repo_tags(self, upstream: str, repo: str, after: str = "",
                        limit: int = PAGE) -> list[TagRecord]:
        """The latest records of a repository's tags, in tag order, after `after`."""

    @abc.abstractmethod
    def iter_tags(self) -> AsyncIterator[TagRecord]:
        """Every tag's latest record, in (upstream, repo, tag) order."""

    @abc.abstractmethod
    async def tagged(self, upstream: str, repo: str, digest: str) -> bool:
        """Whether some tag of the repository resolves to `digest`."""

    @abc.abstractmethod
    async def tags_naming(self, upstream: str, repo: str, digest: str) -> list[str]:
        """The repository's tags with a record (for any Accept set) naming `digest`."""

    @abc.abstractmethod
    async def named(self, digest: str) -> bool:
        """Whether a tag record, a ref or a pin names `digest` directly (a root)."""

    # -- pull counts -----------------------------------------------------------------------

    @abc.abstractmethod
    async def add_pulls(self, pulls: Mapping[tuple[str, str, str], int]) -> None:
        """Add pulls of tags, keyed by (upstream, repo, tag) (batched). Only tags with a
        record are counted, and `drop_tag` forgets a tag's count: there are never more
        counts than tag records."""

    @abc.abstractmethod
    async def pulls(self, upstream: str, repo: str, tags: Sequence[str]) -> dict[str, int]:
        """The pull counts of some of a repository's tags (at most `PAGE`); a tag never
        pulled is left out."""

    @abc.abstractmethod
    async def most_pulled(self, limit: int, offset: int = 0) -> list[PullCount]:
        """The most pulled tags, most first (an index gives them in order: no scan)."""

    # -- images named by digest ----------------------------------------------------------

    @abc.abstractmethod
    async def add_ref(self, record: RefRecord) -> None: ...

    @abc.abstractmethod
    async def ref(self, upstream: str, repo: str, digest: str) -> RefRecord | None: ...

    @abc.abstractmethod
    async def drop_ref(self, upstream: str, repo: str, digest: str) -> bool: ...

    @abc.abstractmethod
    def iter_refs(self) -> AsyncIterator[RefRecord]: ...

    # -- pushes ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def set_pushed(self, upstream: str, repo: str, tag: str, at: float) -> None:
        """A manifest was pushed to (or deleted from) the tag: older resolutions are void."""

    @abc.abstractmethod
    async def pushed(self, upstream: str, repo: str, tag: str) -> float: ...

    @abc.abstractmethod
    async def generation(self) -> int:
        """A number that changes whenever any process forgets tags (pushes, refreshes)."""

    @abc.abstractmethod
    async def bump_generation(self) -> int: ...

    # -- access facts (rules in `mirror.access`) -------------------------------------------

    @abc.abstractmethod
    async def link(self, upstream: str, repo: str, digests: Iterable[str]) -> None: ...

    @abc.abstractmethod
    async def unlink(self, upstream: str, repo: str, digest: str) -> None: ...

    @abc.abstractmethod
    async def linked(self, upstream: str, repo: str, digest: str) -> bool: ...

    @abc.abstractmethod
    async def grant(self, grant: Grant) -> None: ...

    @abc.abstractmethod
    async def granted(self, upstream: str, repo: str, identity: str) -> Grant | None: ...

    async def readable(self, upstream: str, repo: str, identity: str,
                       digest: str) -> tuple[Grant | None, bool, bool]:
        """`granted`, then `linked` if granted, then `holds` if linked, as one read where the
        store can (each a fresh read: nothing is remembered)."""
        grant = await self.granted(upstream, repo, identity)
        linked = grant is not None and await self.linked(upstream, repo, digest)
        return grant, linked, linked and await self.holds(upstream, digest)

    @abc.abstractmethod
    async def revoke(self, upstream: str, repo: str, identity: str) -> None: ...

    @abc.abstractmethod
    async def prune_grants(self, before: float) -> int:
        """Drop grants that are not durable and older than `before`; returns how many."""

    @abc.abstractmethod
    async def upstream_names(self) -> list[str]:
        """The upstreams that have a tag record or a ref."""

    @abc.abstractmethod
    def iter_repos(self, upstream: str, after: str = "") -> AsyncIterator[str]:
        """Repositories of `upstream` with a tag record or a ref, in name order."""

    # -- pins ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def pin(self, owner: str, digests: Iterable[str]) -> None:
        """Keep `digests` from eviction on behalf of `owner` (an image reference)."""

    @abc.abstractmethod
    async def unpin(self, owner: str) -> list[str]:
        """Drop `owner`'s pins; returns the digests it pinned."""

    @abc.abstractmethod
    async def pinned(self, digest: str) -> bool: ...

    @abc.abstractmethod
    def iter_pins(self) -> AsyncIterator[tuple[str, str]]:
        """(owner, digest) of every pin."""

    # -- upload sessions -------------------------------------------------------------------

    @abc.abstractmethod
    async def put_upload(self, upload_id: str, data: Mapping[str, Any], expires: float) -> None:
        ...

    @abc.abstractmethod
    async def get_upload(self, upload_id: str) -> dict[str, Any] | None:
        """The session's data, if it has not expired."""

    @abc.abstractmethod
    async def drop_upload(self, upload_id: str) -> None: ...

    @abc.abstractmethod
    def iter_uploads(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Every session not yet expired (for sweeps of orphans)."""

    # -- locks -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def acquire(self, name: str, owner: str, lease: float) -> bool:
        """Take lock `name` for `lease` seconds unless another owner holds an unexpired
        lease (atomic compare-and-set); taking it again as its owner renews it."""

    @abc.abstractmethod
    async def release(self, name: str, owner: str) -> None:
        """Release the lock if `owner` holds it."""

    @abc.abstractmethod
    async def holder(self, name: str) -> str | None:
        """The owner of an unexpired lease, if any."""
