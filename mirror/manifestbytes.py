"""Manifest bytes by digest: fetched once per digest and upstream (across workers),
verified, stored and served exactly as received; the most used kept in memory.

`ManifestService` (`mirror.manifests`) builds tag resolution on top of this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import cachetools
from prometheus_client import Counter

from mirror import errors, oci
from mirror.flight import SingleFlight, exclusive
from mirror.mediatypes import ACCEPT_ALL, MAX_MANIFEST, media_type_of, shared
from mirror.metadata import Metadata, TagRecord
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.store import Store
from mirror.upstream import Credential, UpstreamClient, upstream_error

HOT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    digest: Digest
    media_type: str
    size: int
    stale: str = ""  # from the cache alone, and why (STALE_*); "": a fresh answer

    @classmethod
    def of(cls, record: TagRecord, stale: str = "") -> ManifestInfo:
        return cls.compact(parse_digest(record.digest), record.media_type, record.size, stale)

    @classmethod
    def compact(cls, digest: Digest, media_type: str, size: int,
                stale: str = "") -> ManifestInfo:
        """An instance whose algorithm and media type are shared strings (it may be one of
        the tag cache's many entries)."""
        algorithm = shared(digest.algorithm)
        if algorithm is not digest.algorithm:
            digest = Digest(algorithm, digest.hex)
        return cls(digest, shared(media_type), size, stale)


@dataclass(frozen=True, slots=True)
class Manifest:
    info: ManifestInfo
    data: bytes


class ManifestBytes:
    def __init__(self, store: Store, metadata: Metadata, metrics: Metrics | None = None,
                 hot_bytes: int = HOT_BYTES) -> None:
        self.store = store
        self.metadata = metadata
        self.metrics = metrics
        self._hot: cachetools.LRUCache[Digest, Manifest] = cachetools.LRUCache(
            hot_bytes, getsizeof=lambda m: len(m.data) + 200)
        self._flight = SingleFlight()
        # Bound children: `labels()` per lookup costs more than the increment.
        self._lookups: dict[tuple[str, str], Counter] = {}

    def _lookup(self, kind: str, result: str) -> None:
        if self.metrics is not None:
            child = self._lookups.get((kind, result))
            if child is None:  # kinds and results are literals: a handful of entries
                child = self._lookups[(kind, result)] = self.metrics.lookups.labels(kind,
                                                                                    result)
            child.inc()

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
        return await self._keep(client.name, manifest)

    async def _keep(self, holder: str, manifest: Manifest) -> Manifest:
        """Store verified manifest bytes that `holder` delivered (or accepted). The media
        type kept with them is one per digest, served through every upstream: the
        document's own when it names one, else the first learnt (another upstream's, or a
        pusher's, word never changes it). Returns the manifest as it is kept."""
        info = manifest.info
        kept = declared_type(manifest.data) or await self.metadata.media_type(str(info.digest))
        if kept and kept != info.media_type:
            info = replace(info, media_type=kept)
            manifest = Manifest(info, manifest.data)
        await self.metadata.add_manifest(str(info.digest), info.media_type,
                                         oci.named_digests(manifest.data))
        if await self.store.committed_size(info.digest) is None:
            await self.store.write(info.digest, manifest.data, holder)
        else:
            await self.store.add_holder(holder, info.digest)
        self._hot[info.digest] = manifest
        return manifest


def declared_type(data: bytes) -> str:
    """The media type a manifest names itself (its `mediaType`), or ""."""
    try:
        value = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) and value.isascii() and value.isprintable() \
        else ""
