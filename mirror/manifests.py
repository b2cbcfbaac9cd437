"""Manifests: tag resolution, fetch-once-by-digest, and byte-exact storage.

A tag is resolved upstream with a HEAD carrying the client's Accept set (a HEAD does not count
against Docker Hub's pull limit); the answer is kept for `tag_ttl`, in memory and in the
metadata store (so other workers share it). Manifest bytes are fetched once per digest,
verified, stored and served exactly as received.

Who may read what is not decided here (`mirror.access`): `resolve` serves callers whose
access is proven, from the caches; `resolve_fresh` asks the upstream with the caller's own
credential, which is how access gets proven.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import cachetools

from mirror import errors, oci
from mirror.flight import SingleFlight, exclusive
from mirror.metadata import AcceptKey, Metadata, TagRecord
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.store import Store
from mirror.upstream import Credential, UpstreamClient, upstream_error

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

    @classmethod
    def of(cls, record: TagRecord, stale: bool = False) -> ManifestInfo:
        return cls(parse_digest(record.digest), record.media_type, record.size, stale)


@dataclass(frozen=True, slots=True)
class Manifest:
    info: ManifestInfo
    data: bytes


def media_type_of(data: bytes, content_type: str | None) -> str:
    """The manifest's media type: the upstream's Content-Type, else the document's own."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if not declared.isascii() or not declared.isprintable():
        declared = ""
    if declared in MANIFEST_TYPES or declared.endswith("+json"):
        return declared
    try:
        value = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        value = None
    if isinstance(value, str) and value and value.isascii() and value.isprintable():
        return value
    return declared or OCI_MANIFEST


class ManifestService:
    def __init__(
        self, store: Store, metadata: Metadata, tag_ttl: Callable[[UpstreamClient], float],
        negative_ttl: float = 10.0, metrics: Metrics | None = None, *,
        tag_entries: int = 100_000, negative_entries: int = 10_000,
        hot_bytes: int = HOT_BYTES,
    ) -> None:
        self.store = store
        self.metadata = metadata
        self.tag_ttl = tag_ttl
        self.negative_ttl = negative_ttl
        self.metrics = metrics
        self.tag_entries = tag_entries
        self._missing: cachetools.TTLCache[tuple[object, ...], errors.RegistryError] = (
            cachetools.TTLCache(negative_entries, negative_ttl or 1))
        self._tags: dict[str, cachetools.TTLCache[tuple[str, str, AcceptKey], ManifestInfo]] = {}
        self._hot: cachetools.LRUCache[Digest, Manifest] = cachetools.LRUCache(
            hot_bytes, getsizeof=lambda m: len(m.data) + 200)
        self._flight = SingleFlight()
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
            # Remembered briefly: a storm of pulls of a missing tag is no storm upstream.
            if self.negative_ttl > 0:
                self._missing[(client.name, *key)] = exc
            raise
        except (errors.UpstreamError, errors.Unavailable, errors.TooManyRequests):
            record = await self.metadata.tag(client.name, repo, tag, accept) \
                or await self.metadata.tag(client.name, repo, tag, None)
            if record is None:
                raise
            # The upstream is down or refusing us: the last answer we had beats none.
            self._lookup("tag", "stale")
            return ManifestInfo.of(record, stale=True)
        cache[key] = info
        return info

    async def resolve_fresh(
        self, client: UpstreamClient, repo: str, tag: str, accept: AcceptKey,
        credential: Credential | None, identity: str,
    ) -> ManifestInfo | None:
        """Ask the upstream with `credential` (no cache answers: this is how a caller's
        access is proven); the answer is kept for everyone. None: another worker was just
        asking for the same caller; look at what it proved.

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
                return await self._resolve_upstream(client, repo, tag, accept, credential)
            finally:
                lock.release()

        try:
            info = await self._flight.do(("fresh", *key), ask)
        except (errors.ManifestUnknown, errors.NameUnknown) as exc:
            if self.negative_ttl > 0:
                self._missing[key] = exc
            raise
        if info is not None:
            await self._remember(client, repo, tag, accept, info)
        return info

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

    def _lookup(self, kind: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.lookups.labels(kind, result).inc()

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
                return ManifestInfo(digest, media_type, int(length))
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

    # -- by digest -----------------------------------------------------------------------

    async def cached(self, digest: Digest) -> Manifest | None:
        manifest = self._hot.get(digest)
        if manifest is not None:
            self.store.recency.touch(digest)
            self._lookup("manifest", "hit")
            return manifest
        data = await self.store.read(digest)
        if data is None:
            return None
        self._lookup("manifest", "hit")
        self.store.recency.touch(digest)
        media_type = await self.metadata.media_type(str(digest)) or media_type_of(data, None)
        manifest = Manifest(ManifestInfo(digest, media_type, len(data)), data)
        self._hot[digest] = manifest
        return manifest

    async def get(
        self, client: UpstreamClient, repo: str, digest: Digest,
        credential: Credential | None = None, cached: bool = True,
    ) -> Manifest:
        """The manifest's bytes: from the cache when its upstream holds them (`cached`, or
        found so since), else fetched from `client`'s upstream and verified."""
        if cached:
            manifest = await self.cached(digest)
            if manifest is not None:
                return manifest
        return await self._flight.do(
            ("manifest", client.name, digest),
            lambda: self._fetch(client, repo, digest, credential))

    async def _fetch(
        self, client: UpstreamClient, repo: str, digest: Digest, credential: Credential | None,
    ) -> Manifest:
        """One download per digest and upstream across workers; bytes another upstream
        delivered are never taken for this one's (see `mirror.access`)."""
        name = f"{digest.algorithm}-{digest.hex}"
        for _ in range(3):
            if await self.store.holds(client.name, digest):
                manifest = await self.cached(digest)
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
        await self._keep(client.name, manifest)
        return manifest

    async def _keep(self, holder: str, manifest: Manifest) -> None:
        """Store verified manifest bytes that `holder` delivered (or accepted)."""
        info = manifest.info
        await self.metadata.add_manifest(str(info.digest), info.media_type,
                                         oci.named_digests(manifest.data))
        if await self.store.committed_size(info.digest) is None:
            await self.store.write(info.digest, manifest.data, holder)
        else:
            await self.store.add_holder(holder, info.digest)
        self._hot[info.digest] = manifest
