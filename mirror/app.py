"""The app factory: builds every part from `Settings`; no state lives at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from mirror import errors, services
from mirror.access import Access
from mirror.evict import Evictor
from mirror.metrics import Metrics
from mirror.observe import AccessLog, Health, Observe
from mirror.routes import Handlers
from mirror.routes_push import PushHandlers
from mirror.settings import RESOLVED_ENV, Settings
from mirror.uploads import Uploads

log = logging.getLogger("mirror")


def create_app(settings: Settings) -> Starlette:
    metrics = Metrics()
    parts = services.build(settings, metrics)  # the parts `mirror seed` uses too
    store, clients, fills, manifests = parts.store, parts.clients, parts.fills, parts.manifests
    removed = store.cleanup_partials()
    if removed:
        log.info("removed %d partial downloads left by an earlier run", removed)
    access = Access(store.index)
    handlers = Handlers(clients, manifests, parts.blobs, access, settings.public_url, metrics)
    uploads = Uploads(store.root / "uploads", store, settings.upload_timeout,
                      settings.max_layer_size, metrics, idle=settings.read_timeout)
    access_log = AccessLog()
    health = Health(metrics, store, next(iter(clients.values())), settings.offline)
    pushes = PushHandlers(handlers, uploads, manifests, access)

    evictor = Evictor(store, settings.max_cache_size, metrics=metrics)
    store.on_commit = evictor.committed

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        background = [asyncio.create_task(store.recency.run(), name="recency"),
                      asyncio.create_task(evictor.run(), name="evict"),
                      asyncio.create_task(uploads.run(clients), name="uploads")]
        yield
        access_log.flush()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        uploads.close()
        await parts.aclose()

    app = Starlette(
        routes=health.routes(with_metrics=not settings.metrics_listen)
        + pushes.routes() + handlers.routes(),
        exception_handlers={
            errors.RegistryError: handlers.on_registry_error,
            HTTPException: handlers.on_http_error,
            Exception: handlers.on_crash,
        },
        lifespan=lifespan,
    )
    app.add_middleware(Observe, metrics=metrics, access=access_log,
                       log_format=settings.access_log)
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.store = store
    app.state.fills = fills
    app.state.evictor = evictor
    app.state.clients = clients
    return app


def app_from_env() -> Starlette:
    """Entry point for uvicorn workers: settings arrive resolved, as JSON, in the env."""
    settings = Settings.from_json(os.environ[RESOLVED_ENV])
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)-8s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request
    return create_app(settings)
