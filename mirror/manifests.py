"""Manifests: tag resolution, on top of fetch-once-by-digest (`mirror.manifestbytes`).

A tag is resolved upstream with a HEAD carrying the client's Accept set (a HEAD does not count
against Docker Hub's pull limit); the answer is kept for `tag_ttl`, in memory and in the
metadata store (so other workers share it). While the upstream's rate limit is in the
reserve (`mirror.ratelimit`) cached tags are not revalidated; with `serve_deleted` a tag the
upstream answers 404 for is served from the cache. Such answers say why (`STALE_*`).

Who may read what is not decided here (`mirror.access`): `resolve` serves callers whose
access is proven, from the caches; `resolve_fresh` asks the upstream with the caller's own
credential, which is how access gets proven.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Protocol

import cachetools

from mirror import errors
from mirror.flight import exclusive
from mirror.manifestbytes import HOT_BYTES, Manifest, ManifestBytes, ManifestInfo
from mirror.mediatypes import (
    ACCEPT_ALL,
    ACCEPT_KEPT,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    MAX_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1,
    SCHEMA1_SIGNED,
    accept_key,
    media_type_of,
)
from mirror.metadata import AcceptKey, Metadata, TagRecord
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.store import Store
from mirror.upstream import Credential, UpstreamClient, upstream_error


class Proof(Protocol):
    """A caller's access to a repository, as `mirror.access` keeps it: whether it was proven
    lately (`held`), and recording that the upstream just proved it (`record`)."""

    async def held(self) -> bool: ...

    async def record(self) -> None: ...

__all__ = ["ACCEPT_ALL", "ACCEPT_KEPT", "DOCKER_LIST", "DOCKER_MANIFEST", "MANIFEST_TYPES",
           "MAX_MANIFEST", "OCI_INDEX", "OCI_MANIFEST", "SCHEMA1", "SCHEMA1_SIGNED", "Manifest",
           "ManifestInfo", "ManifestService", "accept_key", "media_type_of"]
# Why a tag's answer is the cache's alone (`ManifestInfo.stale`): the upstream could not be
# reached, its rate limit is in the reserve (`mirror.ratelimit`), or it no longer has the tag.
STALE_UNREACHABLE, STALE_RESERVE, STALE_DELETED = "unreachable", "reserve", "deleted"


class ManifestService(ManifestBytes):
    def __init__(
        self, store: Store, metadata: Metadata, tag_ttl: Callable[[UpstreamClient], float],
        negative_ttl: float = 10.0, metrics: Metrics | None = None, *,
        tag_entries: int = 100_000, negative_entries: int = 10_000,
        hot_bytes: int = HOT_BYTES,
    ) -> None:
        super().__init__(store, metadata, metrics, hot_bytes)
        self.tag_ttl = tag_ttl
        self.negative_ttl = negative_ttl
        self.tag_entries = tag_entries
        self._missing: cachetools.TTLCache[tuple[object, ...], errors.RegistryError] = (
            cachetools.TTLCache(negative_entries, negative_ttl or 1))
        self._tags: dict[str, cachetools.TTLCache[tuple[str, str, AcceptKey], ManifestInfo]] = {}
        self._seen_generation = -1

    # -- tags ----------------------------------------------------------------------------

    async def resolve(
        self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey,
        credential: Credential | None = None,
    ) -> ManifestInfo:
        """The tag's manifest digest, type and size for this Accept set, from the caches
        when fresh (for callers whose access is proven), else from the upstream."""
        await self._notice_pushes()
        cache = self._tag_cache(client)
        key = (repo, tag, accept)
        info = cache.get(key)
        if info is not None:
            self._lookup("tag", "hit")
            return info
        missing = self._missing.get((client.name, *key))
        if missing is not None:
            self._lookup("tag", "negative")
            raise missing
        try:
            info = await self._flight.do(
                ("tag", client.name, *key),
                lambda: self._resolve_shared(client, repo, tag, accept, credential))
        except (errors.ManifestUnknown, errors.NameUnknown) as exc:
            if client.upstream.serve_deleted:
                kept = await self.deleted_tag(client, repo, tag, accept)
                if kept is not None:
                    return kept
            # Remembered briefly: a storm of pulls of a missing tag is no storm upstream.
            if self.negative_ttl > 0:
                self._missing[(client.name, *key)] = exc
            raise
        except (errors.UpstreamError, errors.Unavailable, errors.TooManyRequests):
            # The upstream is down or refusing us: the last answer we had beats none.
            kept = await self._kept(client, repo, tag, accept, STALE_UNREACHABLE)
            if kept is None:
                raise
            self._lookup("tag", "stale")
            return kept
        if not info.stale:  # a stale answer is looked at again on the next pull
            cache[key] = info
        return info

    def remembers(self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey) -> bool:
        """Whether this process holds a fresh resolution of the tag (no upstream needed)."""
        return (repo, tag, accept) in self._tag_cache(client)

    async def deleted_tag(self, client: UpstreamClient, repo: str, tag: str,
                          accept: AcceptKey) -> ManifestInfo | None:
        """The cached resolution of a tag the upstream answered 404 for (`serve_deleted`)."""
        kept = await self._kept(client, repo, tag, accept, STALE_DELETED)
        if kept is not None:
            self._lookup("tag", "deleted")
        return kept

    async def _kept(self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey,
                    why: str) -> ManifestInfo | None:
        """The last resolution kept of the tag (this Accept set's, else any), as stale."""
        record = await self.metadata.tag(client.name, repo, tag, accept) \
            or await self.metadata.tag(client.name, repo, tag, None)
        return None if record is None else ManifestInfo.of(record, stale=why)

    async def resolve_fresh(
        self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey,
        credential: Credential | None, identity: str, proof: Proof | None = None,
    ) -> ManifestInfo | None:
        """Ask the upstream with `credential` (no cache answers: this is how a caller's
        access is proven); the answer is kept for everyone, and `proof` recorded, before
        another worker asking for the same caller goes on. None: such a worker just asked
        (or `proof` was held by the time this one could ask); look at what it proved.

        A 404 is remembered briefly for this caller only (whoever else asks, asks again).
        """
        await self._notice_pushes()
        key = (client.name, repo, tag, accept, identity)
        missing = self._missing.get(key)
        if missing is not None:
            self._lookup("tag", "negative")
            raise missing

        async def ask() -> ManifestInfo | None:
            name = "proof-" + hashlib.sha256(repr(key).encode()).hexdigest()
            lock = await exclusive(self.store, name, timeout=120)
            if lock is None:
                return None
            try:
                if proof is not None and await proof.held():
                    return None  # proven by whoever held the lock just before
                info = await self._resolve_upstream(client, repo, tag, accept, credential)
                await self._remember(client, repo, tag, accept, info)
                if proof is not None:
                    await proof.record()
                return info
            finally:
                lock.release()

        try:
            return await self._flight.do(("fresh", *key), ask)
        except (errors.ManifestUnknown, errors.NameUnknown) as exc:
            if self.negative_ttl > 0:
                self._missing[key] = exc
            raise

    async def record(self, client: UpstreamClient, repo: str, tag: str,
                     accept: AcceptKey | None, info: ManifestInfo) -> None:
        """Keep a resolution learnt elsewhere (seeding) like one of our own."""
        await self._remember(client, repo, tag, accept, info)

    async def _remember(self, client: UpstreamClient, repo: str, tag: str,
                        accept: AcceptKey | None, info: ManifestInfo) -> None:
        await self.metadata.set_tag(TagRecord(client.name, repo, tag, str(info.digest),
                                              info.media_type, info.size, time.time()), accept)
        if accept is not None:
            self._tag_cache(client)[(repo, tag, accept)] = info
            self._missing.pop((client.name, repo, tag, accept), None)

    def _tag_cache(
        self, client: UpstreamClient
    ) -> cachetools.TTLCache[tuple[str, str, AcceptKey], ManifestInfo]:
        cache = self._tags.get(client.name)
        if cache is None:
            cache = self._tags[client.name] = cachetools.TTLCache(
                self.tag_entries, self.tag_ttl(client) or 1e-9)
        return cache

    async def _resolve_shared(
        self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey,
        credential: Credential | None,
    ) -> ManifestInfo:
        """One upstream HEAD per tag across all workers: lock, then share via metadata."""
        name = "tag-" + hashlib.sha256(repr((client.name, repo, tag, accept)).encode()).hexdigest()
        ttl = self.tag_ttl(client)
        for _ in range(3):
            record = await self.metadata.tag(client.name, repo, tag, accept)
            if (record and time.time() - record.at < ttl
                    and record.at > await self.metadata.pushed(client.name, repo, tag)):
                return ManifestInfo.of(record)
            if client.ratelimit.low():
                # Budget in the reserve: no revalidation; only what the cache lacks is asked.
                kept = await self._kept(client, repo, tag, accept, STALE_RESERVE)
                if kept is not None:
                    self._lookup("tag", "stale")
                    return kept
            lock = await exclusive(self.store, name, timeout=120)
            if lock is None:
                continue  # another worker just resolved it: read its record
            try:
                info = await self._resolve_upstream(client, repo, tag, accept, credential)
                await self._remember(client, repo, tag, accept, info)
                return info
            finally:
                lock.release()
        return await self._resolve_upstream(client, repo, tag, accept, credential)

    async def _resolve_upstream(
        self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey,
        credential: Credential | None,
    ) -> ManifestInfo:
        self._lookup("tag", "miss")
        headers = {"Accept": ", ".join(accept)} if accept else {}
        path = f"/v2/{repo}/manifests/{tag}"
        what = f"manifest {repo}:{tag}"
        response = await client.send("HEAD", path, repo=repo, headers=headers,
                                     credential=credential)
        digest_header = response.headers.get("docker-content-digest")
        if response.status_code == 200 and digest_header:
            length = response.headers.get("content-length", "")
            if length.isascii() and length.isdigit() and int(length) > MAX_MANIFEST:
                raise errors.UpstreamError(f"upstream {client.name}: {what} is over 4 MiB")
            try:
                digest = parse_digest(digest_header)
            except errors.DigestInvalid as exc:
                raise errors.UpstreamError(
                    f"upstream {client.name} sent a bad digest for {what}") from exc
            media_type = (response.headers.get("content-type") or "").split(";")[0].strip()
            if media_type and length.isascii() and length.isdigit() and media_type.isascii():
                return ManifestInfo.compact(digest, media_type, int(length))
        elif response.status_code != 200:
            raise upstream_error(response, client.name, errors.ManifestUnknown, what)
        # No usable HEAD answer: GET the manifest and learn its digest from the bytes.
        manifest = await self._download(client, repo, tag, None, headers, credential)
        return manifest.info

    # -- pushes --------------------------------------------------------------------------

    async def _notice_pushes(self) -> None:
        """Drop remembered tags when any process has pushed, deleted or refreshed since."""
        generation = await self.metadata.generation()
        if generation != self._seen_generation:
            self._seen_generation = generation
            for cache in self._tags.values():
                cache.clear()
            self._missing.clear()

    async def pushed(self, upstream: str, repo: str, data: bytes, media_type: str,
                     tag: str | None) -> ManifestInfo:
        """A manifest pushed through us that the upstream accepted (exactly these bytes).

        It is cached (the upstream holds it now), but it names nothing for anyone: the
        tag's older resolutions are void, and the next pull resolves it upstream.
        """
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        info = ManifestInfo(digest, media_type, len(data))
        await self._keep(upstream, Manifest(info, data))
        if tag is not None:
            await self.metadata.set_pushed(upstream, repo, tag, time.time())
        await self.forget_tags()
        return info

    async def deleted(self, upstream: str, repo: str, reference: Digest | str) -> None:
        """A manifest (by digest) or a tag was deleted upstream through us: older
        resolutions are void, and so are the repository's tags resolving to a deleted
        manifest. Shared content stays (other repositories may hold it)."""
        if not isinstance(reference, Digest):
            await self.metadata.set_pushed(upstream, repo, reference, time.time())
        else:
            for tag in await self.metadata.tags_naming(upstream, repo, str(reference)):
                await self.metadata.drop_tag(upstream, repo, tag)
        await self.forget_tags()

    async def forget_tags(self) -> None:
        """Tell every process (and ourselves) to forget the tags they remember."""
        await self.metadata.bump_generation()
        await self._notice_pushes()
