"""HTTP routing: the OCI distribution API as clients see it, mapped onto the services.

Each read goes: which upstream and repository (`target`), who asks (`mirror.identity`), may
they (`mirror.access`: every cached read asks it), then the manifest or blob service.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mirror import errors, policy
from mirror.access import OUTAGE, Access
from mirror.auth import (
    MAX_FORM,
    TokenEndpoint,
    challenge_header,
    credentials_from_form,
    credentials_from_header,
    read_form,
)
from mirror.blobs import BlobService
from mirror.identity import Caller, Identities
from mirror.manifests import (
    STALE_DELETED,
    STALE_RESERVE,
    STALE_UNREACHABLE,
    ManifestInfo,
    ManifestService,
    accept_key,
)
from mirror.metadata import AcceptKey, MetadataError
from mirror.metrics import Metrics
from mirror.ranges import parse_range
from mirror.reference import Digest, check_name, check_reference, parse_digest
from mirror.settings import DOCKER_HUB
from mirror.upstream import UpstreamClient
from mirror.zerocopy import BlobResponse

log = logging.getLogger("mirror.routes")
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
DOCKER_HUB_HOSTS = {"registry-1.docker.io", "index.docker.io", DOCKER_HUB}
STALE_WARNING = ('299 - "served from the cache: the upstream could not be reached, so this '
                 'tag may have moved since"')
RESERVE_WARNING = ('299 - "served from the cache: the upstream\'s rate limit is nearly used '
                   'up, so this tag was not checked and may have moved since"')
DELETED_WARNING = '299 - "served from the cache: the upstream no longer has this tag"'
WARNINGS = {STALE_UNREACHABLE: STALE_WARNING, STALE_RESERVE: RESERVE_WARNING,
            STALE_DELETED: DELETED_WARNING}


def error_response(exc: errors.RegistryError) -> Response:
    return Response(
        json.dumps(exc.body()), status_code=exc.status, media_type="application/json",
        headers={**API_VERSION, **exc.headers})


class Handlers:
    def __init__(
        self,
        clients: Mapping[str, UpstreamClient],
        manifests: ManifestService,
        blobs: BlobService,
        access: Access,
        identities: Identities,
        public_url: str = "",
        metrics: Metrics | None = None,
        redirect: bool = False,
    ) -> None:
        self.metrics = metrics
        self.redirect = redirect  # cached blob GETs: a 307 to the object store
        self.clients = clients
        self.default = next(iter(clients.values()))
        self.manifests = manifests
        self.blobs = blobs
        self.access = access
        self.identities = identities
        self.tokens = TokenEndpoint(clients, identities)
        self.public_url = public_url.rstrip("/")
        # Compiled once per upstream; checked in `target`, which every request naming a
        # repository goes through.
        self.policies = policy.policies(c.upstream for c in clients.values())

    def routes(self) -> list[Route]:
        read = ["GET", "HEAD"]
        return [
            Route("/v2/", self.ping, methods=read),
            Route("/token", self.token, methods=["GET", "POST"]),
            Route("/v2/{name:path}/manifests/{reference}", self.manifest, methods=read),
            Route("/v2/{name:path}/blobs/{digest}", self.blob, methods=read),
        ]

    # -- which upstream, which repository, who asks ------------------------------------

    def target(self, request: Request) -> tuple[UpstreamClient, str]:
        """Pick the upstream (by `?ns=`, by path prefix, else the default) and the repo."""
        name: str = request.path_params["name"]
        client = self.client_for(request)
        if request.query_params.get("ns") is None:
            first, sep, rest = name.partition("/")
            if sep and rest and first in self.clients:
                client, name = self.clients[first], rest
        check_name(name)
        if client.upstream.library_prefix and "/" not in name:
            name = "library/" + name
        request.state.target = (client, name)  # for the challenge of a 401 (and the logs)
        self.policies[client.name].check(name)  # before any cache is looked at
        return client, name

    def permits(self, client: UpstreamClient, repo: str) -> bool:
        return self.policies[client.name].permits(repo)

    def client_for(self, request: Request) -> UpstreamClient:
        ns = request.query_params.get("ns")
        if ns is None:
            return self.default
        for client in self.clients.values():
            names = {client.name, client.upstream.host}
            if names & DOCKER_HUB_HOSTS:
                names |= DOCKER_HUB_HOSTS
            if ns in names:
                return client
        raise errors.NameUnknown(f"no upstream is configured for registry {ns[:100]!r}")

    async def caller(self, request: Request, client: UpstreamClient) -> Caller:
        """Who asks, with a credential bound to `client`'s upstream (or refused)."""
        identities = await self.identities.ready()
        caller = identities.caller(request.headers.get("authorization"), client.name)
        self.access.check_binding(client, caller)
        request.state.user = caller.user or ("anonymous" if caller.anonymous else "")
        return caller

    async def _note_user(self, request: Request) -> None:
        """Who was refused, for the audit log: the policy refuses before `caller` runs."""
        if getattr(request.state, "user", None) is not None:
            return
        client, _ = getattr(request.state, "target", (self.default, ""))
        try:
            identities = await self.identities.ready()
            caller = identities.caller(request.headers.get("authorization"), client.name)
        except errors.RegistryError:
            return
        request.state.user = caller.user or ("anonymous" if caller.anonymous else "")

    def realm(self, request: Request) -> str:
        # Behind a proxy `public_url` must be set: the Host header is the client's to forge.
        base = self.public_url or f"{request.url.scheme}://{request.url.netloc}"
        return base + "/token"

    async def on_registry_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.RegistryError)
        if isinstance(exc, policy.Refused):
            await self._note_user(request)
        if isinstance(exc, errors.Unobtainable):  # its code names what was asked for
            path = request.url.path
            exc.for_kind("manifests" if "/manifests/" in path else "blobs"
                         if "/blobs/" in path and "/uploads/" not in path else "")
        if self.metrics is not None:
            self.metrics.errors.labels(exc.code).inc()
            if exc.status in (401, 403) and "name" in request.path_params:
                # (not the bare /v2/ ping every client starts with)
                self.metrics.denials.labels(exc.code.lower()).inc()
            if exc.status == 401:
                self.metrics.challenges.inc()
        if exc.status == 401 and "WWW-Authenticate" not in exc.headers:
            client, repo = getattr(request.state, "target", (self.default, ""))
            shown = request.path_params.get("name", "")
            actions = getattr(request.state, "actions", "pull")
            scope = f"repository:{shown}:{actions}" if shown else ""
            exc.headers["WWW-Authenticate"] = challenge_header(
                self.realm(request), client, scope, repo)
        return error_response(exc)

    async def on_http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error: errors.RegistryError = errors.NotFound(
            f"no such endpoint: {request.url.path[:200]}")
        if exc.status_code == 405:
            error = errors.Unsupported(f"{request.method} is not supported here")
        return await self.on_registry_error(request, error)

    async def on_crash(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, MetadataError):
            log.error("metadata store failed on %s %s: %s", request.method,
                      request.url.path[:200], exc)
            return await self.on_registry_error(
                request, errors.Unavailable("the mirror's metadata store is unavailable"))
        log.exception("internal error on %s %s", request.method, request.url.path[:200])
        return await self.on_registry_error(request, errors.RegistryError("internal error"))

    # -- auth ----------------------------------------------------------------------------

    async def ping(self, request: Request) -> Response:
        client = self.client_for(request)
        request.state.target = (client, "")
        if request.headers.get("authorization"):
            await self.caller(request, client)  # a bad or foreign credential gets a challenge
            return Response(b"{}", media_type="application/json", headers=API_VERSION)
        # Docker learns how to authenticate only from this answer.
        if client.upstream.auth_passthrough:
            await client.discover_challenge()
        raise errors.Unauthorized("authentication required")

    async def token(self, request: Request) -> Response:
        query = request.query_params
        basic = credentials_from_header(request.headers.get("authorization"))
        scopes = query.getlist("scope")
        service, account = query.get("service"), query.get("account")
        if request.method == "POST":
            length = request.headers.get("content-length", "")
            if length.isascii() and length.isdigit() and int(length) > MAX_FORM:
                raise errors.SizeInvalid("token request form too large")
            form = await read_form(request.stream())
            basic = credentials_from_form(form) or basic
            scopes = form.get("scope", "").split() or scopes
            service = form.get("service", service)
        answer = await self.tokens.issue(service, scopes, basic, account)
        return JSONResponse(answer, headers={"Cache-Control": "no-store"})

    # -- reads ---------------------------------------------------------------------------

    async def manifest(self, request: Request) -> Response:
        client, repo = self.target(request)
        caller = await self.caller(request, client)
        reference = check_reference(request.path_params["reference"])
        head = request.method == "HEAD"
        stale = ""
        if isinstance(reference, Digest):
            digest = reference
        else:
            accept = accept_key(request.headers.getlist("accept"))
            known = self.manifests.remembers(client, repo, reference, accept)
            info = await self._resolve(client, repo, caller, reference, accept)
            await self.access.link(client, repo, [str(info.digest)])
            if head:
                request.state.cache = "stale" if info.stale else "hit" if known else "miss"
                return manifest_response(info, None, info.stale)
            digest, stale = info.digest, info.stale
        decision = await self.access.authorize_digest(client, repo, caller, digest,
                                                      "manifests")
        # Looked up first only to say where the bytes came from (`get` looks there too).
        manifest = await self.manifests.cached(digest) if decision.cached else None
        request.state.cache = "stale" if stale else "hit" if manifest else "miss"
        if manifest is None:
            manifest = await self.manifests.get(client, repo, digest, caller.credential,
                                                cached=decision.cached)
        await self.access.link_manifest(client, repo, digest, manifest.data,
                                        manifest.info.media_type)
        return manifest_response(manifest.info, None if head else manifest.data, stale)

    async def _resolve(self, client: UpstreamClient, repo: str, caller: Caller, tag: str,
                       accept: AcceptKey) -> ManifestInfo:
        """A tag's resolution for `caller`: from the caches once its access is proven, else
        from the upstream asked with its own credential (which is what proves it)."""
        for _ in range(3):
            if await self.access.granted(client, repo, caller):
                try:
                    return await self.manifests.resolve(client, repo, tag, accept,
                                                        caller.credential)
                except (errors.Unauthorized, errors.Denied) as exc:
                    raise await self.access.refused(client, repo, caller, exc) from None
            if client.offline:
                raise self.access.unproven(client, repo, caller)
            try:
                info = await self.manifests.resolve_fresh(
                    client, repo, tag, accept, self.access.probe_credential(client, caller),
                    caller.identity, self.access.proof(client, repo, caller))
            except (errors.ManifestUnknown, errors.NameUnknown):
                # A 404 proves nothing (no grant); a tag deleted upstream is still served,
                # when asked to, to callers who proved their access before.
                if client.upstream.serve_deleted and await self.access.granted(
                        client, repo, caller, lasting=True):
                    kept = await self.manifests.deleted_tag(client, repo, tag, accept)
                    if kept is not None:
                        return kept
                raise
            except OUTAGE:
                if await self.access.granted(client, repo, caller, lasting=True):
                    return await self.manifests.resolve(client, repo, tag, accept,
                                                        caller.credential)
                raise
            except errors.RegistryError as exc:
                raise await self.access.refused(client, repo, caller, exc) from None
            if info is not None:  # (its proof is recorded)
                return info
            # Another worker asked for this caller just now: its grant is there to use.
        raise errors.UpstreamError(f"could not resolve {repo}:{tag} on {client.name}")

    async def blob(self, request: Request) -> Response:
        client, repo = self.target(request)
        caller = await self.caller(request, client)
        digest = parse_digest(request.path_params["digest"])
        decision = await self.access.authorize_digest(client, repo, caller, digest, "blobs")
        headers = {**API_VERSION, "Docker-Content-Digest": str(digest), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            size = await self.blobs.size(client, repo, digest, caller.credential,
                                         cached=decision.cached, known=decision.size)
            return Response(b"", headers={**headers, "Content-Length": str(size)})
        if self.redirect and decision.cached and "range" not in request.headers:
            # Authorized above: only now may the caller learn where the bytes are.
            location = await self.blobs.location(digest)
            if location is not None:
                request.state.cache = "redirect"
                return Response(status_code=307, headers={**API_VERSION, "Location": location,
                                                          "Docker-Content-Digest": str(digest)})
        reader = await self.blobs.open(client, repo, digest, caller.credential,
                                       cached=decision.cached, expected=decision.size)
        request.state.cache = "hit" if reader.source == "cache" else "miss"
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
        return BlobResponse(reader, start, end, status_code=status, headers=headers,
                            sent=self._counter(reader.source))

    def _counter(self, source: str) -> Callable[[int], None] | None:
        """Counts blob bytes as they go out, by where they came from."""
        return None if self.metrics is None else self.metrics.served_bytes.labels(source).inc

def manifest_response(info: ManifestInfo, data: bytes | None, stale: str = "") -> Response:
    """The same headers for GET and HEAD; `data` None means HEAD (no body); `stale` why
    the answer is the cache's alone (`mirror.manifests.STALE_*`), if it is."""
    headers = {**API_VERSION, "Docker-Content-Digest": str(info.digest),
               "Content-Type": info.media_type, "Content-Length": str(info.size),
               "ETag": f'"{info.digest}"'}
    if stale:
        # The spec's form (code 299, agent "-"), which clients show to the user.
        headers["Warning"] = WARNINGS.get(stale, STALE_WARNING)
    return Response(data or b"", headers=headers)
