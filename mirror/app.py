"""The app factory: builds every part from `Settings`; no state lives at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from mirror import cluster, errors, services
from mirror.audit import AuditLog
from mirror.evict import Evictor
from mirror.metrics import Metrics
from mirror.observe import AccessLog, Health, Observe
from mirror.routes import Handlers
from mirror.routes_admin import AdminHandlers
from mirror.routes_internal import InternalHandlers
from mirror.routes_listing import ListingHandlers
from mirror.routes_push import PushHandlers
from mirror.scrub import Scrubber
from mirror.settings import RESOLVED_ENV, Settings
from mirror.ui import Browser, PullCounter
from mirror.uploads import Uploads

log = logging.getLogger("mirror")


def create_app(settings: Settings) -> Starlette:
    metrics = Metrics()
    parts = services.build(settings, metrics)  # the parts `mirror seed` uses too
    store, clients, fills = parts.store, parts.clients, parts.fills
    removed = store.cleanup_partials()
    if removed:
        log.info("removed %d partial downloads left by an earlier run", removed)
    handlers = Handlers(clients, parts.manifests, parts.blobs, parts.access, parts.identities,
                        settings.public_url, metrics, redirect=settings.redirect)
    uploads = Uploads(store, settings.upload_timeout, settings.max_layer_size, metrics,
                      idle=settings.read_timeout)
    access_log = AccessLog()
    audit = AuditLog(settings.audit_log, metrics) if settings.audit_log else None
    health = Health(metrics, store, next(iter(clients.values())), settings.offline)
    pushes = PushHandlers(handlers, uploads, parts.manifests, parts.access)

    internal: list[Route] = []
    if store.remote is not None:  # replicas share the object store: and their downloads
        host, port = settings.host_port
        address = cluster.advertised(host, port, settings.redis_url, bool(settings.tls_cert))
        fills.cluster = cluster.Cluster(parts.metadata, address, settings.fill_lease,
                                        parts.metadata.secret)
        internal = InternalHandlers(fills, fills.cluster).routes()

    evictor = Evictor(store, settings.max_cache_size, metrics=metrics,
                      local_budget=settings.hot_cache_size if store.remote else None)
    store.on_commit = evictor.committed
    scrubber = Scrubber(store, settings.scrub_rate)
    admin: list[Route] = []
    if settings.admin_token:
        admin = AdminHandlers(settings.admin_token, parts, evictor, metrics).routes()
    browser = Browser(parts, metrics, lambda: evictor.budget) if settings.ui else None

    async def prune_grants() -> None:
        """Grants of single tokens are no use once expired: drop them (bounded table)."""
        while True:
            await asyncio.sleep(max(settings.access_ttl, 10.0))
            try:
                await parts.metadata.prune_grants(time.time() - settings.access_ttl)
            except Exception:
                log.exception("pruning expired grants failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await parts.metadata.open()
        if audit is not None:
            audit.start()
            _on_sighup(audit.reopen)  # logrotate: rename, then SIGHUP
        background = [asyncio.create_task(store.recency.run(), name="recency"),
                      asyncio.create_task(evictor.run(), name="evict"),
                      asyncio.create_task(scrubber.run(), name="scrub"),
                      asyncio.create_task(prune_grants(), name="grants"),
                      asyncio.create_task(uploads.run(clients), name="uploads")]
        if browser is not None:
            background.append(asyncio.create_task(browser.run(), name="ui"))
        yield
        access_log.flush()
        if audit is not None:
            _on_sighup(None)
            audit.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        uploads.close()
        await parts.aclose()

    app = Starlette(
        # The pull routes first: every cached read is matched against the routes before
        # its own. For GET and HEAD no other route's path matches theirs (and for other
        # methods a later route's full match still wins), so the order decides nothing.
        routes=handlers.routes() + health.routes(with_metrics=not settings.metrics_listen)
        + internal + admin + ListingHandlers(handlers).routes() + pushes.routes()
        + (browser.routes() if browser is not None else []),
        exception_handlers={
            errors.RegistryError: handlers.on_registry_error,
            HTTPException: handlers.on_http_error,
            Exception: handlers.on_crash,
        },
        lifespan=lifespan,
    )
    if browser is not None:
        app.add_middleware(PullCounter, pulls=browser.pulls)
    app.add_middleware(Observe, metrics=metrics, access=access_log,
                       log_format=settings.access_format, audit=audit)
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.services = parts
    app.state.store = store
    app.state.fills = fills
    app.state.evictor = evictor
    app.state.scrubber = scrubber
    app.state.clients = clients
    return app


def _on_sighup(handler: Callable[[], None] | None) -> None:
    """Run `handler` on SIGHUP in this process (None: no longer). Only the main thread's
    loop can take signals: elsewhere (an app in a test's thread) there is no SIGHUP."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        if handler is None:
            loop.remove_signal_handler(signal.SIGHUP)
        else:
            loop.add_signal_handler(signal.SIGHUP, handler)


def app_from_env() -> Starlette:
    """Entry point for uvicorn workers: settings arrive resolved, as JSON, in the env.
    (Logging is set up by uvicorn, from `mirror.logs.logging_config`.)"""
    return create_app(Settings.from_json(os.environ[RESOLVED_ENV]))
