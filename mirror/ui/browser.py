"""The cache browser, built from the app's parts: what the app factory hooks in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.routing import Route

from mirror.metrics import Metrics
from mirror.services import Services
from mirror.ui.glance import Glance
from mirror.ui.images import Images
from mirror.ui.pages import Pages
from mirror.ui.pulls import PullBatch
from mirror.ui.visitors import Visitors
from mirror.ui.web import Web


class Browser:
    def __init__(self, parts: Services, metrics: Metrics,
                 budget: Callable[[], int | None]) -> None:
        """`budget`: the cache's byte budget as the evictor knows it (None: not yet)."""
        settings = parts.settings
        self.pulls = PullBatch(parts.metadata)
        self.glance = Glance(metrics, parts.store, parts.fills, budget, settings.workers)
        visitors = Visitors(parts.clients, parts.access, parts.identities,
                            settings.access_ttl)
        self.pages = Pages(parts.clients, parts.store, visitors,
                           Images(parts.store, parts.metadata), self.glance, Web(),
                           settings.public_url)

    def routes(self) -> list[Route]:
        return self.pages.routes()

    async def run(self) -> None:
        """Background work: writing pull counts, and each day's snapshot of the counters."""
        await asyncio.gather(self.pulls.run(), self.glance.today.run())
