"""The parts that serve content, built from `Settings`: shared by the app and by `mirror seed`,
so seeding fills the cache through the very code (and cross-process locks) the server uses."""

from __future__ import annotations

from dataclasses import dataclass

from mirror import metadata as metadata_module
from mirror import objectstore
from mirror.access import Access
from mirror.blobs import BlobService
from mirror.fills import Fills
from mirror.identity import Identities
from mirror.manifests import ManifestService
from mirror.metadata import Metadata
from mirror.metrics import Metrics
from mirror.settings import Settings
from mirror.store import Store
from mirror.upstream import UpstreamClient


@dataclass
class Services:
    settings: Settings
    metadata: Metadata
    store: Store
    clients: dict[str, UpstreamClient]
    fills: Fills
    manifests: ManifestService
    blobs: BlobService
    access: Access
    identities: Identities

    async def aclose(self) -> None:
        await self.fills.aclose()
        if self.fills.cluster is not None:
            await self.fills.cluster.aclose()
        for client in self.clients.values():
            await client.aclose()
        await self.store.close()
        await self.metadata.close()


def build(settings: Settings, metrics: Metrics | None = None) -> Services:
    metadata = metadata_module.create(settings.cache_dir, settings.redis_url)
    if isinstance(metadata, metadata_module.SqliteMetadata):
        metadata.open_sync()  # migrations run here, before any request
    remote = objectstore.from_settings(settings.storage, settings.storage_options)
    store = Store(settings.cache_dir, metadata, remote,
                  keep_local=remote is None or settings.hot_cache_size > 0)
    clients = {u.name: UpstreamClient(u, settings, metrics) for u in settings.upstreams}

    def tag_ttl(client: UpstreamClient) -> float:
        ttl = client.upstream.tag_ttl
        return settings.tag_ttl if ttl is None else ttl

    fills = Fills(store, wait_timeout=settings.connect_timeout + settings.read_timeout,
                  metrics=metrics, max_size=settings.max_layer_size,
                  deadline=settings.upstream_deadline)
    manifests = ManifestService(
        store, metadata, tag_ttl, settings.negative_ttl, metrics,
        tag_entries=settings.tag_cache_entries,
        negative_entries=settings.negative_cache_entries,
        hot_bytes=settings.manifest_cache_bytes)
    access = Access(metadata, settings.access_ttl, memo=settings.link_cache_entries,
                    recheck=settings.access_recheck, holds=store.holds)
    return Services(settings, metadata, store, clients, fills, manifests,
                    BlobService(store, fills), access, Identities(metadata.secret))
