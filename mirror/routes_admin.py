"""The HTTP admin API: `mirror cache refresh|pin|unpin|rm` while serving, and the cache's
numbers. Only there when `admin_token` is set; every request must present it as a Bearer
token (compared in constant time), else 401.

    POST   /admin/refresh  {"ref": "docker.io/library/alpine:3.20"}
    POST   /admin/pin      {"ref": ...}
    POST   /admin/unpin    {"ref": ...}
    DELETE /admin/cache    {"ref": ...}
    GET    /admin/stats
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mirror import cacheops, errors
from mirror.evict import Evictor
from mirror.imageref import ImageRef, RefError
from mirror.metrics import Metrics
from mirror.services import Services

MAX_BODY = 64 * 1024
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mirror-admin"'}
NO_STORE = {"Cache-Control": "no-store"}


class AdminHandlers:
    def __init__(self, token: str, services: Services, evictor: Evictor,
                 metrics: Metrics) -> None:
        self.token = token.encode()
        self.services = services
        self.evictor = evictor
        self.metrics = metrics

    def routes(self) -> list[Route]:
        return [
            Route("/admin/refresh", self.refresh, methods=["POST"]),
            Route("/admin/pin", self.pin, methods=["POST"]),
            Route("/admin/unpin", self.unpin, methods=["POST"]),
            Route("/admin/cache", self.forget, methods=["DELETE"]),
            Route("/admin/stats", self.stats, methods=["GET"]),
        ]

    def _authorize(self, request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip().encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.token):
            raise errors.Unauthorized("the admin API needs the admin token",
                                      headers=dict(CHALLENGE))

    async def _ref(self, request: Request) -> ImageRef:
        """Authorize, then read `{"ref": "..."}` (bounded) and parse the reference."""
        self._authorize(request)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise errors.SizeInvalid("request body too large")
        try:
            text = json.loads(body).get("ref")
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str) or not text:
            raise errors.Unsupported('expected a JSON body {"ref": "IMAGE"}').answered(400, None)
        try:
            return await cacheops.parse_ref(self.services.metadata,
                                            self.services.settings.upstreams, text)
        except RefError as exc:
            raise errors.NameInvalid(str(exc)) from None

    async def refresh(self, request: Request) -> Response:
        ref = await self._ref(request)
        try:
            dropped = await cacheops.refresh(self.services.metadata, ref)
        except RefError as exc:
            raise errors.TagInvalid(str(exc)) from None
        await self.services.manifests.forget_tags()  # this worker at once; others by generation
        return _answer({"ref": str(ref), "dropped": dropped})

    async def pin(self, request: Request) -> Response:
        ref = await self._ref(request)
        try:
            pinned = await cacheops.pin(self.services.store, ref)
        except cacheops.NotCached as exc:
            raise errors.ManifestUnknown(str(exc)) from None
        return _answer({"ref": str(ref), "pinned": pinned})

    async def unpin(self, request: Request) -> Response:
        ref = await self._ref(request)
        try:
            released = await cacheops.unpin(self.services.store, ref)
        except cacheops.NotCached as exc:
            raise errors.ManifestUnknown(str(exc)) from None
        return _answer({"ref": str(ref), "unpinned": released})

    async def forget(self, request: Request) -> Response:
        ref = await self._ref(request)
        try:
            removed, freed = await cacheops.forget(self.services.store, ref)
        except cacheops.NotCached as exc:
            raise errors.ManifestUnknown(str(exc)) from None
        await self.services.manifests.forget_tags()
        return _answer({"ref": str(ref), "removed": removed, "freed_bytes": freed})

    async def stats(self, request: Request) -> Response:
        self._authorize(request)
        total, entries = await self.services.metadata.totals()
        lookups: dict[str, dict[str, int]] = {}
        for labels, value in self.metrics.samples("mirror_cache_lookups_total"):
            lookups.setdefault(labels["kind"], {})[labels["result"]] = int(value)
        fills = sum(v for _, v in self.metrics.samples("mirror_fills_in_progress"))
        limits: dict[str, dict[str, int]] = {name: {} for name in self.services.clients}
        for key in ("limit", "remaining"):  # the last values any worker saw
            for labels, value in self.metrics.samples(f"mirror_upstream_ratelimit_{key}"):
                limits.setdefault(labels["upstream"], {})[key] = int(value)
        return _answer({
            "content": {"bytes": total, "entries": entries},
            "budget": self.evictor.budget or self.services.settings.max_cache_size,
            "fills_in_progress": int(fills),
            "lookups": lookups,
            "ratelimits": limits,
        })


def _answer(body: dict[str, Any]) -> Response:
    return JSONResponse(body, headers=NO_STORE)
