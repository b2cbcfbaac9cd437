"""The app factory: builds every part from `Settings`; no state lives at import time."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from mirror import errors
from mirror.access import Access
from mirror.blobs import BlobService
from mirror.fills import Fills
from mirror.manifests import ManifestService
from mirror.routes import Handlers, on_crash, on_http_error
from mirror.settings import RESOLVED_ENV, Settings
from mirror.store import Store
from mirror.upstream import UpstreamClient

log = logging.getLogger("mirror")


def create_app(settings: Settings) -> Starlette:
    store = Store(settings.cache_dir)
    removed = store.cleanup_partials()
    if removed:
        log.info("removed %d partial downloads left by an earlier run", removed)
    clients = {u.name: UpstreamClient(u, settings) for u in settings.upstreams}

    def tag_ttl(client: UpstreamClient) -> float:
        ttl = client.upstream.tag_ttl
        return settings.tag_ttl if ttl is None else ttl

    fills = Fills(store, wait_timeout=settings.connect_timeout + settings.read_timeout)
    handlers = Handlers(clients, ManifestService(store, tag_ttl), BlobService(store, fills),
                        Access(store.index), settings.public_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await fills.aclose()
        for client in clients.values():
            await client.aclose()
        store.close()

    app = Starlette(
        routes=handlers.routes(),
        exception_handlers={
            errors.RegistryError: handlers.on_registry_error,
            HTTPException: on_http_error,
            Exception: on_crash,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.fills = fills
    app.state.clients = clients
    return app


def app_from_env() -> Starlette:
    """Entry point for uvicorn workers: settings arrive resolved, as JSON, in the env."""
    settings = Settings.from_json(os.environ[RESOLVED_ENV])
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)-8s %(name)s: %(message)s")
    return create_app(settings)
