"""A small scriptable upstream registry (starlette on uvicorn in a thread) for the cases a
real registry will not produce on demand: corrupt bytes, CDN redirects, slow or failing
answers. Loopback only."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from support.procs import free_port

TOKEN = "fake-token"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeUpstream:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # ref -> (type, data)
    corrupt: set[str] = field(default_factory=set)  # digests served with one byte flipped
    chunk_delay: float = 0.0  # seconds between 64 KiB chunks of a blob body
    redirect_blobs: bool = False  # 307 blob GETs to a "CDN" on another host name
    unsized: set[str] = field(default_factory=set)  # digests sent chunked, with no length
    require_token: bool = True
    status_override: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    # Docker Hub's pull budget: (limit, remaining), sent on manifest answers as RateLimit-*
    # headers; a manifest GET spends one pull, a HEAD none. None: no such headers.
    ratelimit: tuple[int, int] | None = None
    ratelimit_window: int = 21600
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}"  # another host, the same server
        app = Starlette(routes=[
            Route("/v2/", self._ping),
            Route("/token", self._token),
            Route("/v2/{name:path}/blobs/{digest}", self._blob, methods=["GET", "HEAD"]),
            Route("/v2/{name:path}/manifests/{ref}", self._manifest, methods=["GET", "HEAD"]),
            Route("/cdn/{digest}", self._cdn, methods=["GET"]),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def count(self, method: str, contains: str) -> int:
        """Requests that were answered (not refused for want of a token)."""
        return sum(1 for s in self.seen if s.method == method and contains in s.path
                   and (not self.require_token or "authorization" in s.headers))

    def __enter__(self) -> FakeUpstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    # -- endpoints -----------------------------------------------------------------------

    def _record(self, request: Request) -> Response | None:
        self.seen.append(Seen(request.method, request.url.path, dict(request.headers)))
        override = self.status_override.get(request.url.path)
        if override:
            status, headers = override
            return JSONResponse({"errors": [{"code": "TOOMANYREQUESTS" if status == 429
                                             else "UNKNOWN", "message": "scripted"}]},
                                status_code=status, headers=headers)
        if self.require_token and request.headers.get("authorization") != f"Bearer {TOKEN}":
            realm = f"{self.url}/token"
            return JSONResponse(
                {"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]},
                status_code=401,
                headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'})
        return None

    async def _ping(self, request: Request) -> Response:
        return self._record(request) or JSONResponse({})

    async def _token(self, request: Request) -> Response:
        self.seen.append(Seen(request.method, request.url.path, dict(request.headers)))
        return JSONResponse({"token": TOKEN, "expires_in": 300})

    async def _blob(self, request: Request) -> Response:
        refused = self._record(request)
        if refused:
            return refused
        digest = request.path_params["digest"]
        if digest not in self.blobs:
            return JSONResponse({"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]}, 404)
        if self.redirect_blobs and request.method == "GET":
            return Response(status_code=307, headers={"Location": f"{self.cdn_url}/cdn/{digest}"})
        return self._body(request, digest)

    async def _cdn(self, request: Request) -> Response:
        self.seen.append(Seen(request.method, request.url.path, dict(request.headers)))
        return self._body(request, request.path_params["digest"])

    def _body(self, request: Request, digest: str) -> Response:
        data = self.blobs[digest]
        if digest in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        headers = {"Content-Length": str(len(data)), "Docker-Content-Digest": digest}
        if digest in self.unsized:
            del headers["Content-Length"]  # a streamed answer without one goes chunked
        if request.method == "HEAD":
            if digest in self.unsized:
                return StreamingResponse(iter(()), headers=headers)
            return Response(b"", headers=headers)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 65536):
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                yield data[start:start + 65536]

        return StreamingResponse(chunks(), headers=headers,
                                 media_type="application/octet-stream")

    async def _manifest(self, request: Request) -> Response:
        refused = self._record(request)
        if refused:
            return refused
        ref = request.path_params["ref"]
        found = self.manifests.get(ref) or next(
            (m for m in self.manifests.values()
             if "sha256:" + hashlib.sha256(m[1]).hexdigest() == ref), None)
        if found is None:
            return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]}, 404)
        media_type, data = found
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        headers = {"Docker-Content-Digest": digest, "Content-Type": media_type,
                   "Content-Length": str(len(data)), **self._ratelimit(request.method)}
        return Response(b"" if request.method == "HEAD" else data, headers=headers)

    def _ratelimit(self, method: str) -> dict[str, str]:
        if self.ratelimit is None:
            return {}
        limit, remaining = self.ratelimit
        if method == "GET":
            remaining = max(remaining - 1, 0)
            self.ratelimit = (limit, remaining)
        window = self.ratelimit_window
        return {"RateLimit-Limit": f"{limit};w={window}",
                "RateLimit-Remaining": f"{remaining};w={window}"}
