"""The mirror in this process (httpx's ASGITransport against the app, lifespan included), with
clients that log in as registry clients do. ASGITransport buffers bodies: fine for logic
tests; streaming needs a real server (`support.procs.MirrorProc`)."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette

from mirror.app import create_app
from mirror.settings import Settings

PASSWORDS = {"alice": "alicepw", "bob": "bobpw", "mallory": "wrong"}
ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Caller:
    """One registry client of the mirror: a user (logged in through our realm) or anonymous."""

    http: httpx.AsyncClient
    user: str | None = None
    service: str = ""
    tokens: dict[str, str] = field(default_factory=dict)  # service -> our token

    async def login(self, service: str | None = None) -> str | None:
        service = service or self.service
        if self.user is None:
            return None
        if service not in self.tokens:
            response = await self.http.get("/token", params={"service": service},
                                           headers={"Authorization": basic(
                                               self.user, PASSWORDS[self.user])})
            if response.status_code != 200:
                return None
            self.tokens[service] = response.json()["token"]
        return self.tokens[service]

    async def request(self, method: str, path: str, *, service: str | None = None,
                      **kwargs: Any) -> httpx.Response:
        headers = {"Accept": ACCEPT, **kwargs.pop("headers", {})}
        token = await self.login(service)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.http.request(method, path, headers=headers, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)


@dataclass
class Mirror:
    app: Starlette
    http: httpx.AsyncClient
    settings: Settings

    def caller(self, user: str | None = None, service: str | None = None) -> Caller:
        return Caller(self.http, user, service or self.settings.default_upstream.name)


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Mirror]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test",
                                     timeout=30) as http:
            yield Mirror(app, http, settings)
