"""The metadata index beside the content files (diskcache: SQLite, safe across processes).

What it records, all small:
    ("mt", digest)                          media type of a stored manifest
    ("tag", upstream, repo, tag, accept)    a tag's resolution for one Accept set
    ("tag", upstream, repo, tag, None)      the latest resolution whatever the Accept set
                                            (what offline and stale serving fall back to)
    ("link", upstream, repo, digest)        `repo` on `upstream` is known to hold `digest`
    ("pin", digest)                         never evicted
    ("public", upstream, repo)              True/False: what an anonymous probe last found
    ("pushed", upstream, repo, tag)         when a manifest was last pushed to the tag
    ("ref", upstream, repo, digest)         an image asked for by digest (seeded, imported)
    ("used", digest)                        when the content was last served (batched writes)
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

log = logging.getLogger("mirror.index")


@contextlib.contextmanager
def unless_full(what: str) -> Iterator[None]:
    """For writes that only remember what an upstream said: on a full disk, skip them.

    Each one missing fails safe (a tag is resolved again, a media type read from the
    document, access probed again); failing the request instead would help nobody.
    """
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "full" not in str(exc):
            raise
        log.warning("cache disk full: %s not recorded", what)

AcceptKey = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TagRecord:
    upstream: str
    repo: str
    tag: str
    digest: str
    media_type: str
    size: int
    at: float  # time.time() of the resolution
    anonymous: bool = False  # resolved without credentials: anyone may read it


class Index:
    def __init__(self, directory: Path) -> None:
        # No eviction here: entries are tiny; the content files are what a budget is about.
        self.db = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**40)

    def close(self) -> None:
        self.db.close()

    # -- manifests -----------------------------------------------------------------------

    def media_type(self, digest: str) -> str | None:
        value = self.db.get(("mt", digest))
        return value if isinstance(value, str) else None

    def set_media_type(self, digest: str, media_type: str) -> None:
        with unless_full("a media type"):
            self.db.set(("mt", digest), media_type)

    # -- tags ----------------------------------------------------------------------------

    def tag(
        self, upstream: str, repo: str, tag: str, accept: AcceptKey | None
    ) -> TagRecord | None:
        """The record for exactly this Accept set (None: the latest of any)."""
        value = self.db.get(("tag", upstream, repo, tag, accept))
        return TagRecord(upstream, repo, tag, **value) if isinstance(value, dict) else None

    def set_tag(
        self, upstream: str, repo: str, tag: str, accept: AcceptKey | None,
        digest: str, media_type: str, size: int, anonymous: bool = False,
    ) -> None:
        value = {"digest": digest, "media_type": media_type, "size": size, "at": time.time(),
                 "anonymous": anonymous}
        with unless_full("a tag"), self.db.transact():
            if accept is not None:
                self.db.set(("tag", upstream, repo, tag, accept), value)
            self.db.set(("tag", upstream, repo, tag, None), value)

    def set_pushed(self, upstream: str, repo: str, tag: str) -> None:
        """A new manifest was pushed to the tag: older resolutions of it are void."""
        self.db.set(("pushed", upstream, repo, tag), time.time())

    def pushed(self, upstream: str, repo: str, tag: str) -> float:
        value = self.db.get(("pushed", upstream, repo, tag))
        return float(value) if isinstance(value, int | float) else 0.0

    def tags(self) -> Iterator[TagRecord]:
        """Every tag's latest record (one per upstream, repo and tag)."""
        for key in self.db.iterkeys():
            if isinstance(key, tuple) and key[0] == "tag" and key[4] is None:
                record = self.tag(key[1], key[2], key[3], None)
                if record is not None:
                    yield record

    def tag_records(self) -> Iterator[tuple[AcceptKey | None, TagRecord]]:
        """Every record, for each Accept set too (each may name another manifest)."""
        for key in self.db.iterkeys():
            if isinstance(key, tuple) and key[0] == "tag":
                record = self.tag(key[1], key[2], key[3], key[4])
                if record is not None:
                    yield key[4], record

    def drop_tag(self, upstream: str, repo: str, tag: str) -> None:
        for key in list(self.db.iterkeys()):
            if isinstance(key, tuple) and key[:4] == ("tag", upstream, repo, tag):
                self.db.delete(key)

    # -- which repository holds what ---------------------------------------------------

    def link(self, upstream: str, repo: str, digests: list[str]) -> None:
        with unless_full("a repository's content"), self.db.transact():
            for digest in digests:
                self.db.set(("link", upstream, repo, digest), True)

    def unlink(self, upstream: str, repo: str, digest: str) -> None:
        self.db.delete(("link", upstream, repo, digest))

    def linked(self, upstream: str, repo: str, digest: str) -> bool:
        return bool(self.db.get(("link", upstream, repo, digest)))

    # -- who may read a repository ------------------------------------------------------

    def set_public(self, upstream: str, repo: str, public: bool) -> None:
        with unless_full("an access probe"):
            self.db.set(("public", upstream, repo), (public, time.time()))

    def public(self, upstream: str, repo: str, max_age: float | None = None) -> bool:
        """Whether an anonymous probe found `repo` readable (within `max_age` seconds)."""
        value = self.db.get(("public", upstream, repo))
        if not isinstance(value, tuple) or value[0] is not True:
            return False
        return max_age is None or time.time() - value[1] < max_age

    def private(self, upstream: str, repo: str) -> bool:
        value = self.db.get(("public", upstream, repo))
        return isinstance(value, tuple) and value[0] is False

    # -- pins ----------------------------------------------------------------------------

    def pin(self, digests: list[str]) -> None:
        with self.db.transact():
            for digest in digests:
                self.db.set(("pin", digest), True)

    def pinned(self, digest: str) -> bool:
        return bool(self.db.get(("pin", digest)))

    def pins(self) -> Iterator[str]:
        for key in self.db.iterkeys():
            if isinstance(key, tuple) and key[0] == "pin" and self.db.get(key):
                yield key[1]

    # -- last use (written in batches by `mirror.recency`) --------------------------------

    def last_used(self, digest: str) -> float | None:
        value = self.db.get(("used", digest))
        return value if isinstance(value, float) else None

    def set_last_used(self, uses: Mapping[str, float]) -> None:
        """Record uses; a later time recorded by another worker is never set back."""
        with self.db.transact():
            for digest, at in uses.items():
                old = self.db.get(("used", digest))
                if not isinstance(old, float) or old < at:
                    self.db.set(("used", digest), at)

    def forget_use(self, *digests: str) -> None:
        """The content is gone: its last use goes too (tags and media types stay)."""
        with self.db.transact():
            for digest in digests:
                self.db.delete(("used", digest))

    # -- images named by digest (what a tag is to images named by tag) -------------------

    def add_ref(self, upstream: str, repo: str, digest: str, media_type: str, size: int) -> None:
        self.db.set(("ref", upstream, repo, digest), {"media_type": media_type, "size": size})

    def refs(self) -> Iterator[tuple[str, str, str, str, int]]:
        """(upstream, repo, digest, media type, size) of every image named by digest."""
        for key in self.db.iterkeys():
            if isinstance(key, tuple) and key[0] == "ref":
                value = self.db.get(key)
                if isinstance(value, dict):
                    yield key[1], key[2], key[3], value["media_type"], value["size"]

    def drop_ref(self, upstream: str, repo: str, digest: str) -> None:
        self.db.delete(("ref", upstream, repo, digest))

    def get(self, key: tuple[Any, ...]) -> Any:
        return self.db.get(key)
