"""HTTP routing: the OCI distribution API as clients see it, mapped onto the services."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mirror import errors
from mirror.blobs import BlobService
from mirror.manifests import ManifestInfo, ManifestService, accept_key
from mirror.ranges import parse_range
from mirror.reference import Digest, check_name, check_reference, parse_digest
from mirror.settings import DOCKER_HUB
from mirror.upstream import UpstreamClient, upstream_error

log = logging.getLogger("mirror.routes")
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
DOCKER_HUB_HOSTS = {"registry-1.docker.io", "index.docker.io", DOCKER_HUB}
Endpoint = Callable[[Request], Awaitable[Response]]


def error_response(exc: errors.RegistryError) -> Response:
    return Response(
        json.dumps(exc.body()), status_code=exc.status, media_type="application/json",
        headers={**API_VERSION, **exc.headers})


async def on_registry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.RegistryError)
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(errors.Unsupported(f"{request.method} is not supported here"))
    return error_response(errors.NotFound(f"no such endpoint: {request.url.path[:200]}"))


async def on_crash(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    response = error_response(errors.RegistryError("internal error"))
    return response


class Handlers:
    def __init__(
        self,
        clients: Mapping[str, UpstreamClient],
        manifests: ManifestService,
        blobs: BlobService,
    ) -> None:
        self.clients = clients
        self.default = next(iter(clients.values()))
        self.manifests = manifests
        self.blobs = blobs

    def routes(self) -> list[Route]:
        read = ["GET", "HEAD"]
        return [
            Route("/v2/", self.ping, methods=read),
            Route("/v2/{name:path}/manifests/{reference}", self.manifest, methods=read),
            Route("/v2/{name:path}/blobs/{digest}", self.blob, methods=read),
            Route("/v2/{name:path}/tags/list", self.tags, methods=read),
            Route("/v2/{name:path}/referrers/{digest}", self.referrers, methods=read),
        ]

    # -- which upstream, which repository ----------------------------------------------

    def target(self, request: Request) -> tuple[UpstreamClient, str]:
        """Pick the upstream (by `?ns=`, by path prefix, else the default) and the repo."""
        name: str = request.path_params["name"]
        ns = request.query_params.get("ns")
        client = self.default
        if ns is not None:
            found = self._by_registry(ns)
            if found is None:
                raise errors.NameUnknown(f"no upstream is configured for registry {ns[:100]!r}")
            client = found
        else:
            first, sep, rest = name.partition("/")
            if sep and rest and first in self.clients:
                client, name = self.clients[first], rest
        check_name(name)
        if client.upstream.library_prefix and "/" not in name:
            name = "library/" + name
        return client, name

    def _by_registry(self, ns: str) -> UpstreamClient | None:
        for client in self.clients.values():
            names = {client.name, client.upstream.host}
            if names & DOCKER_HUB_HOSTS:
                names |= DOCKER_HUB_HOSTS
            if ns in names:
                return client
        return None

    # -- endpoints -----------------------------------------------------------------------

    async def ping(self, request: Request) -> Response:
        return Response(b"{}", media_type="application/json", headers=API_VERSION)

    async def manifest(self, request: Request) -> Response:
        client, repo = self.target(request)
        reference = check_reference(request.path_params["reference"])
        head = request.method == "HEAD"
        if isinstance(reference, Digest):
            manifest = await self.manifests.get(client, repo, reference)
            return manifest_response(manifest.info, None if head else manifest.data)
        accept = accept_key(request.headers.getlist("accept"))
        info = await self.manifests.resolve(client, repo, reference, accept)
        if head:
            return manifest_response(info, None, info.stale)
        manifest = await self.manifests.get(client, repo, info.digest)
        return manifest_response(manifest.info, manifest.data, info.stale)

    async def blob(self, request: Request) -> Response:
        client, repo = self.target(request)
        digest = parse_digest(request.path_params["digest"])
        headers = {**API_VERSION, "Docker-Content-Digest": str(digest), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            size = await self.blobs.size(client, repo, digest)
            return Response(b"", headers={**headers, "Content-Length": str(size)})
        reader = await self.blobs.open(client, repo, digest)
        status, start, end = 200, 0, reader.size
        if reader.size is not None:
            try:
                span = parse_range(request.headers.get("range"), reader.size)
            except errors.RangeInvalid:
                reader.close()
                raise
            if span is not None:
                status, (start, end) = 206, span
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{reader.size}"
            assert end is not None
            headers["Content-Length"] = str(end - start)
        return StreamingResponse(reader.chunks(start, end), status_code=status, headers=headers)

    async def tags(self, request: Request) -> Response:
        client, repo = self.target(request)
        params = {k: request.query_params[k] for k in ("n", "last") if k in request.query_params}
        response = await client.send("GET", f"/v2/{repo}/tags/list", repo=repo, params=params)
        if response.status_code != 200:
            raise upstream_error(
                response, client.name, errors.NameUnknown, f"repository {repo}", response.content)
        headers = dict(API_VERSION)
        link = response.headers.get("link")
        if link:
            # Point the next page at our own path (the client may have used a prefix or `ns`).
            query = link.partition("?")[2].partition(">")[0]
            ns = request.query_params.get("ns")
            extra = f"&ns={ns}" if ns and "ns=" not in query else ""
            headers["Link"] = f'<{request.url.path}?{query}{extra}>; rel="next"'
        return Response(response.content, media_type="application/json", headers=headers)

    async def referrers(self, request: Request) -> Response:
        client, repo = self.target(request)
        digest = parse_digest(request.path_params["digest"])
        params = {k: v for k, v in request.query_params.items() if k == "artifactType"}
        response = await client.send(
            "GET", f"/v2/{repo}/referrers/{digest}", repo=repo, params=params)
        if response.status_code != 200:
            raise upstream_error(response, client.name, errors.ManifestUnknown,
                                 f"referrers of {repo}@{digest}", response.content)
        headers = dict(API_VERSION)
        if "oci-filters-applied" in response.headers:
            headers["OCI-Filters-Applied"] = response.headers["oci-filters-applied"]
        return Response(response.content, headers=headers, media_type=response.headers.get(
            "content-type", "application/vnd.oci.image.index.v1+json"))


def manifest_response(info: ManifestInfo, data: bytes | None, stale: bool = False) -> Response:
    """The same headers for GET and HEAD; `data` None means HEAD (no body)."""
    headers = {**API_VERSION, "Docker-Content-Digest": str(info.digest),
               "Content-Type": info.media_type, "Content-Length": str(info.size),
               "ETag": f'"{info.digest}"'}
    if stale:
        headers["Warning"] = '110 mirror "Response is Stale"'
    return Response(data or b"", headers=headers)
