"""The parts that serve content, built from `Settings`: shared by the app and by `mirror seed`,
so seeding fills the cache through the very code (and cross-process locks) the server uses."""

from __future__ import annotations

from dataclasses import dataclass

from mirror.blobs import BlobService
from mirror.fills import Fills
from mirror.manifests import ManifestService
from mirror.metrics import Metrics
from mirror.settings import Settings
from mirror.store import Store
from mirror.upstream import UpstreamClient


@dataclass
class Services:
    settings: Settings
    store: Store
    clients: dict[str, UpstreamClient]
    fills: Fills
    manifests: ManifestService
    blobs: BlobService

    async def aclose(self) -> None:
        await self.fills.aclose()
        for client in self.clients.values():
            await client.aclose()
        self.store.close()


def build(settings: Settings, metrics: Metrics | None = None) -> Services:
    store = Store(settings.cache_dir)
    clients = {u.name: UpstreamClient(u, settings, metrics) for u in settings.upstreams}

    def tag_ttl(client: UpstreamClient) -> float:
        ttl = client.upstream.tag_ttl
        return settings.tag_ttl if ttl is None else ttl

    fills = Fills(store, wait_timeout=settings.connect_timeout + settings.read_timeout,
                  metrics=metrics)
    manifests = ManifestService(store, tag_ttl, settings.negative_ttl, metrics)
    return Services(settings, store, clients, fills, manifests, BlobService(store, fills))
