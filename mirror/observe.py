"""Watching the mirror: request metrics and the access log (an ASGI middleware), and the
`/metrics`, `/healthz` and `/readyz` endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mirror.audit import AuditLog, entry_of
from mirror.errors import StreamAborted
from mirror.logs import field, timestamp
from mirror.metrics import Metrics
from mirror.store import Store
from mirror.upstream import UpstreamClient

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("mirror.observe")
MAX_CHILDREN = 1024  # bound metric children kept per middleware


class AccessLog:
    """One line per request, written in batches: the logging module costs ~30 % of the
    requests a cached manifest can be served at. Lines go out within FLUSH seconds."""

    FLUSH = 0.2

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd
        self.lines: list[str] = []
        self._scheduled = False
        self._second = -1  # the time stamp is formatted once a second, not once a line
        self._stamp = ""

    def timestamp(self) -> str:
        now = time.time()
        if int(now) != self._second:
            self._second, self._stamp = int(now), timestamp(now)
        return self._stamp

    def write(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) >= 512:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self.FLUSH, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self.lines:
            return
        data = ("\n".join(self.lines) + "\n").encode("utf-8", "replace")
        self.lines.clear()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except BlockingIOError:  # a full pipe: drop rather than stall the server
            log.warning("access log dropped %d bytes", len(data))
        except OSError:
            pass


class Observe:
    """Counts and times every request, and writes one access-log line for it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access: AccessLog,
                 log_format: str = "plain", audit: AuditLog | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.log_format = log_format
        self.access = access
        self.audit = audit
        # Bound children by (route, method, status): `labels()` costs more than the update.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        sent = 0
        headers: list[tuple[bytes, bytes]] = []

        async def counting_send(message: Message) -> None:
            nonlocal status, sent, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers") or []
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.zerocopysend":  # mirror.zerocopy
                sent += message["count"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except StreamAborted as exc:
            # The body was promised and cannot be completed (a fill failed): the connection
            # is cut, which is the client's signal. One line says why; no traceback.
            log.warning("cut %s %s after %d bytes: %s", scope["method"],
                        field(scope.get("path", "")), sent, exc)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            label = route.path.replace(":path", "") if route is not None else "unmatched"
            count, seconds = self._metrics(label, scope["method"], status)
            count.inc()
            seconds.observe(elapsed)
            if self.log_format != "off":
                self._log(scope, status, sent, elapsed)
            if self.audit is not None:
                entry = entry_of(scope, status, sent, headers)
                if entry is not None:
                    self.audit.add(entry)

    def _metrics(self, label: str, method: str, status: int) -> tuple[Counter, Histogram]:
        key = (label, method, status)
        children = self._children.get(key)
        if children is None:
            children = (self.metrics.requests.labels(label, method, str(status)),
                        self.metrics.request_seconds.labels(label))
            if len(self._children) < MAX_CHILDREN:  # the method is the client's: bounded
                self._children[key] = children
        return children

    def _log(self, scope: Scope, status: int, sent: int, elapsed: float) -> None:
        state = scope.get("state") or {}
        target = state.get("target")
        upstream = target[0].name if target else "-"
        cache = state.get("cache", "-")
        # The path as the client sent it (still percent-encoded), with the query.
        raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace")
        path = raw.decode("latin-1")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        client = (scope.get("client") or ("-",))[0]
        now = self.access.timestamp()
        if self.log_format == "json":  # json.dumps escapes control characters itself
            self.access.write(json.dumps({
                "time": now, "client": client, "method": scope["method"], "path": path,
                "status": status, "bytes": sent, "duration": round(elapsed, 6),
                "cache": cache, "upstream": upstream}))
        else:
            self.access.write(
                f'{now} {field(str(client))} "{field(scope["method"])} {field(path)}" {status} '
                f"{sent} {elapsed:.4f} cache={field(str(cache))} upstream={field(upstream)}")


class Health:
    def __init__(self, metrics: Metrics, store: Store, upstream: UpstreamClient,
                 offline: bool) -> None:
        self.metrics = metrics
        self.store = store
        self.upstream = upstream
        self.offline = offline
        self._reachable: tuple[float, bool] = (0.0, False)

    def routes(self, with_metrics: bool = True) -> list[Route]:
        routes = [Route("/healthz", self.healthz), Route("/readyz", self.readyz)]
        if with_metrics:
            routes.append(Route("/metrics", self.scrape))
        return routes

    async def scrape(self, request: Request) -> Response:
        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        checks: dict[str, bool | str] = {
            "cache_writable": self._writable(),
            "upstream": "offline" if self.offline else await self._upstream(),
            "metadata": await self.store.metadata.ping()}
        if self.store.remote is not None:
            checks["object_store"] = await self.store.remote.ping()
        ready = all(v is True or v == "offline" for v in checks.values())
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    def _writable(self) -> bool:
        probe = self.store.tmp / f"ready.{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            return False
        return True

    async def _upstream(self) -> bool:
        """Any HTTP answer from the default upstream's `/v2/` (checked at most every 5 s)."""
        checked, reachable = self._reachable
        if time.monotonic() - checked < 5:
            return reachable
        try:
            response = await self.upstream.http.get(self.upstream.upstream.url + "/v2/",
                                                    timeout=3)
            reachable = response.status_code < 500
        except Exception:
            reachable = False
        self._reachable = (time.monotonic(), reachable)
        return reachable
