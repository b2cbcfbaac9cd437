"""Manifests: tag resolution, fetch-once-by-digest, and byte-exact storage.

A tag is resolved upstream with a HEAD carrying the client's Accept set (a HEAD does not count
against Docker Hub's pull limit); the answer is kept for `tag_ttl`, in memory and in the index
(so other workers share it). Manifest bytes are fetched once per digest, verified, stored and
served exactly as received.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import cachetools

from mirror import errors
from mirror.flight import SingleFlight, exclusive
from mirror.index import AcceptKey, TagRecord
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.store import Store
from mirror.tokens import ANONYMOUS, Credential
from mirror.upstream import UpstreamClient, upstream_error

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, SCHEMA1_SIGNED, SCHEMA1)
# What we ask for when fetching by digest: the bytes are fixed, any type will do.
ACCEPT_ALL = ", ".join((*MANIFEST_TYPES, "*/*"))
MAX_MANIFEST = 4 * 1024 * 1024
HOT_BYTES = 64 * 1024 * 1024


# The Accept entries that can change which manifest a tag resolves to. Others are dropped:
# they cannot change the answer, and keying tag records by them would let a client grow the
# index without bound (and anything not a plain media type must not reach upstream headers).
ACCEPT_KEPT = frozenset((*MANIFEST_TYPES, "application/vnd.oci.artifact.manifest.v1+json",
                         "application/json", "application/*", "*/*"))


def accept_key(headers: list[str]) -> AcceptKey:
    """The set of media types a client accepts, normalised (order, params, case dropped)."""
    types = {part.split(";")[0].strip().lower() for h in headers for part in h.split(",")}
    return tuple(sorted(types & ACCEPT_KEPT))


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    digest: Digest
    media_type: str
    size: int
    stale: bool = False  # from the cache because the upstream could not answer
    anonymous: bool = False  # resolved with no credentials: proof that anyone may read it

    @classmethod
    def of(cls, record: TagRecord, stale: bool = False) -> ManifestInfo:
        return cls(parse_digest(record.digest), record.media_type, record.size, stale,
                   record.anonymous)


@dataclass(frozen=True, slots=True)
class Manifest:
    info: ManifestInfo
    data: bytes


def media_type_of(data: bytes, content_type: str | None) -> str:
    """The manifest's media type: the upstream's Content-Type, else the document's own."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared in MANIFEST_TYPES or declared.endswith("+json"):
        return declared
    try:
        value = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        value = None
    if isinstance(value, str) and value:
        return value
    return declared or OCI_MANIFEST


class ManifestService:
    def __init__(
        self, store: Store, tag_ttl: Callable[[UpstreamClient], float],
        negative_ttl: float = 10.0, metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.tag_ttl = tag_ttl
        self.negative_ttl = negative_ttl
        self.metrics = metrics
        self._missing: cachetools.TTLCache[tuple[object, ...], errors.RegistryError] = (
            cachetools.TTLCache(10_000, negative_ttl or 1))
        self._tags: dict[str, cachetools.TTLCache[tuple[str, str, AcceptKey], ManifestInfo]] = {}
        self._hot: cachetools.LRUCache[Digest, Manifest] = cachetools.LRUCache(
            HOT_BYTES, getsizeof=lambda m: len(m.data) + 200)
        self._flight = SingleFlight()
        self._generation = store.root / "tags.generation"
        self._seen_generation = -1

    # -- tags ----------------------------------------------------------------------------

    async def resolve(
        self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey,
        credential: Credential | None = None, proof: bool = False,
    ) -> ManifestInfo:
        """The tag's manifest digest, type and size for this Accept set.

        With `proof` the answer must also show that `credential` may read the repository:
        it comes from the upstream asked with that credential, or, for anonymous access, from
        an anonymous answer younger than tag_ttl (shared by every worker).
        """
        self._notice_pushes()
        anonymous = credential is ANONYMOUS or (credential is None and client.basic is None)
        if proof and not anonymous:
            assert credential is not None
            return await self._flight.do(
                ("tag", client.name, repo, tag, accept, credential),
                lambda: self._resolve_upstream(client, repo, tag, accept, credential))
        cache = self._tag_cache(client)
        key = (repo, tag, accept)
        info = cache.get(key)
        if info is not None and (not proof or info.anonymous):
            self._lookup("tag", "hit")
            return info
        missing = self._missing.get((client.name, *key))
        if missing is not None:
            self._lookup("tag", "negative")
            raise missing
        try:
            info = await self._flight.do(
                ("tag", client.name, *key, anonymous),
                lambda: self._resolve_shared(client, repo, tag, accept, credential, proof))
        except (errors.ManifestUnknown, errors.NameUnknown) as exc:
            # Remembered briefly: a storm of pulls of a missing tag is no storm upstream.
            if self.negative_ttl > 0:
                self._missing[(client.name, *key)] = exc
            raise
        except (errors.UpstreamError, errors.Unavailable, errors.TooManyRequests):
            index = self.store.index
            record = index.tag(client.name, repo, tag, accept) or index.tag(
                client.name, repo, tag, None)
            if record is None or (proof and not index.public(client.name, repo)):
                raise
            # The upstream is down or refusing us: the last answer we had beats none.
            self._lookup("tag", "stale")
            return ManifestInfo.of(record, stale=True)
        cache[key] = info
        return info

    def _lookup(self, kind: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.lookups.labels(kind, result).inc()

    def _tag_cache(
        self, client: UpstreamClient
    ) -> cachetools.TTLCache[tuple[str, str, AcceptKey], ManifestInfo]:
        cache = self._tags.get(client.name)
        if cache is None:
            cache = self._tags[client.name] = cachetools.TTLCache(100_000, self.tag_ttl(client))
        return cache

    async def _resolve_shared(
        self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey,
        credential: Credential | None, proof: bool,
    ) -> ManifestInfo:
        """One upstream HEAD per tag across all workers: lock, then share via the index."""
        index = self.store.index
        name = "tag-" + hashlib.sha256(repr((client.name, repo, tag, accept)).encode()).hexdigest()
        ttl = self.tag_ttl(client)
        for _ in range(3):
            record = index.tag(client.name, repo, tag, accept)
            if (record and time.time() - record.at < ttl
                    and record.at > index.pushed(client.name, repo, tag)
                    and (not proof or record.anonymous)):
                return ManifestInfo.of(record)
            lock = await exclusive(self.store, name, timeout=120)
            if lock is None:
                continue  # another worker just resolved it: read its record
            try:
                info = await self._resolve_upstream(client, repo, tag, accept, credential)
                index.set_tag(client.name, repo, tag, accept, str(info.digest), info.media_type,
                              info.size, anonymous=info.anonymous)
                return info
            finally:
                lock.release()
        return await self._resolve_upstream(client, repo, tag, accept, credential)

    async def _resolve_upstream(
        self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey,
        credential: Credential | None,
    ) -> ManifestInfo:
        self._lookup("tag", "miss")
        anonymous = credential is ANONYMOUS or (credential is None and client.basic is None)
        headers = {"Accept": ", ".join(accept)} if accept else {}
        path = f"/v2/{repo}/manifests/{tag}"
        what = f"manifest {repo}:{tag}"
        response = await client.send("HEAD", path, repo=repo, headers=headers,
                                     credential=credential)
        digest_header = response.headers.get("docker-content-digest")
        if response.status_code == 200 and digest_header:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_MANIFEST:
                raise errors.UpstreamError(f"upstream {client.name}: {what} is over 4 MiB")
            try:
                digest = parse_digest(digest_header)
            except errors.DigestInvalid as exc:
                raise errors.UpstreamError(
                    f"upstream {client.name} sent a bad digest for {what}") from exc
            media_type = (response.headers.get("content-type") or "").split(";")[0].strip()
            if media_type and length.isdigit():
                return ManifestInfo(digest, media_type, int(length), anonymous=anonymous)
        elif response.status_code != 200:
            raise upstream_error(response, client.name, errors.ManifestUnknown, what)
        # No usable HEAD answer: GET the manifest and learn its digest from the bytes.
        manifest = await self._download(client, repo, tag, None, headers, credential)
        return dataclasses.replace(manifest.info, anonymous=anonymous)

    # -- pushes --------------------------------------------------------------------------

    def _notice_pushes(self) -> None:
        """Drop remembered tags when any worker has pushed or deleted a manifest since.

        One stat(2) per resolution: pushes are rare, tag requests are the hot path.
        """
        try:
            generation = os.stat(self._generation).st_mtime_ns
        except FileNotFoundError:
            generation = 0
        if generation != self._seen_generation:
            self._seen_generation = generation
            for cache in self._tags.values():
                cache.clear()
            self._missing.clear()

    def pushed(self, upstream: str, repo: str, data: bytes, media_type: str,
               tag: str | None) -> ManifestInfo:
        """Keep a manifest pushed through us (the upstream accepted exactly these bytes)."""
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        info = ManifestInfo(digest, media_type, len(data))
        if self.store.size(digest) is None:
            self.store.index.set_media_type(str(digest), media_type)
            self.store.write(digest, data)
        self._hot[digest] = Manifest(info, data)
        if tag is not None:
            self.store.index.set_pushed(upstream, repo, tag)
            self.store.index.set_tag(upstream, repo, tag, None, str(digest), media_type,
                                     len(data))
        self.forget_tags()
        return info

    def deleted(self, upstream: str, repo: str, reference: Digest | str) -> None:
        """A manifest (by digest) or a tag was deleted upstream through us.

        The stored manifest stays: other repositories may hold the same bytes. What goes
        is this repository's tags resolving to it (its link is the caller's to drop).
        """
        index = self.store.index
        if isinstance(reference, Digest):
            tags = {record.tag for _, record in index.tag_records()
                    if (record.upstream, record.repo, record.digest)
                    == (upstream, repo, str(reference))}
            for tag in tags:
                index.drop_tag(upstream, repo, tag)
        else:  # older resolutions of the tag are void
            index.set_pushed(upstream, repo, reference)
        self.forget_tags()

    def forget_tags(self) -> None:
        """Tell every worker (and ourselves) to forget the tags they remember."""
        self._generation.touch()
        os.utime(self._generation, ns=(time.time_ns(), time.time_ns()))
        self._notice_pushes()

    # -- by digest -----------------------------------------------------------------------

    def cached(self, digest: Digest) -> Manifest | None:
        manifest = self._hot.get(digest)
        if manifest is not None:
            self.store.recency.touch(digest)
            self._lookup("manifest", "hit")
            return manifest
        data = self.store.read(digest)
        if data is None:
            return None
        self._lookup("manifest", "hit")
        self.store.recency.touch(digest)
        media_type = self.store.index.media_type(str(digest)) or media_type_of(data, None)
        manifest = Manifest(ManifestInfo(digest, media_type, len(data)), data)
        self._hot[digest] = manifest
        return manifest

    async def get(
        self, client: UpstreamClient, repo: str, digest: Digest,
        credential: Credential | None = None,
    ) -> Manifest:
        manifest = self.cached(digest)
        if manifest is not None:
            return manifest
        return await self._flight.do(
            ("manifest", digest), lambda: self._fetch(client, repo, digest, credential))

    async def _fetch(
        self, client: UpstreamClient, repo: str, digest: Digest, credential: Credential | None
    ) -> Manifest:
        name = f"{digest.algorithm}-{digest.hex}"
        for _ in range(3):
            manifest = self.cached(digest)
            if manifest is not None:
                return manifest
            lock = await exclusive(self.store, name, timeout=120)
            if lock is None:
                continue
            try:
                return await self._download(client, repo, str(digest), digest, {}, credential)
            finally:
                lock.release()
        return await self._download(client, repo, str(digest), digest, {}, credential)

    async def _download(
        self,
        client: UpstreamClient,
        repo: str,
        reference: str,
        expected: Digest | None,
        headers: dict[str, str],
        credential: Credential | None,
    ) -> Manifest:
        """GET a manifest, check it, store it by the digest of its exact bytes."""
        if expected is not None:
            self._lookup("manifest", "miss")
        what = f"manifest {repo}@{reference}" if expected else f"manifest {repo}:{reference}"
        response = await client.send(
            "GET", f"/v2/{repo}/manifests/{reference}", repo=repo,
            headers={"Accept": ACCEPT_ALL, **headers}, stream=True, credential=credential)
        try:
            if response.status_code != 200:
                body = await response.aread()
                raise upstream_error(response, client.name, errors.ManifestUnknown, what, body)
            buffer = bytearray()
            async for chunk in response.aiter_bytes():
                buffer += chunk
                if len(buffer) > MAX_MANIFEST:
                    raise errors.UpstreamError(
                        f"upstream {client.name}: {what} is over 4 MiB; not cached")
        finally:
            await response.aclose()
        data = bytes(buffer)
        try:
            json.loads(data)
        except ValueError:
            raise errors.UpstreamError(
                f"upstream {client.name}: {what} is not valid JSON; not cached") from None
        algorithm = expected.algorithm if expected else "sha256"
        digest = Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
        if expected is not None and digest != expected:
            raise errors.UpstreamError(
                f"upstream {client.name}: {what} does not match its digest; not cached")
        media_type = media_type_of(data, response.headers.get("content-type"))
        manifest = Manifest(ManifestInfo(digest, media_type, len(data)), data)
        if self.store.size(digest) is None:
            self.store.index.set_media_type(str(digest), media_type)
            self.store.write(digest, data)
        self._hot[digest] = manifest
        return manifest
