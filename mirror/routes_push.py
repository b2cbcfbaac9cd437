"""HTTP routing of writes: uploads, manifest pushes and deletes, forwarded upstream with
the client's own credentials (a push never happens on the mirror's behalf).

What the upstream accepted is the client's answer; keeping it in the cache is best effort
(a full disk only means it is not cached). A push links nothing (see `mirror.access`); a
delete only drops the repository's link: other repositories may hold the very same blob or
manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import sqlite3
from collections.abc import Iterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mirror import errors
from mirror.access import Access
from mirror.manifests import ManifestService, media_type_of
from mirror.reference import Digest, check_name, check_reference, parse_digest
from mirror.routes import API_VERSION, Handlers
from mirror.store import DISK_FULL
from mirror.upload_bodies import ClientGone, read_manifest
from mirror.uploads import Forwarded, Uploads
from mirror.upstream import Credential, UpstreamClient, upstream_error

log = logging.getLogger("mirror.routes_push")
# RFC 6838 type/subtype, ASCII only: it goes into upstream request headers and our answers.
MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
                        r"/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


class PushHandlers:
    def __init__(self, reads: Handlers, uploads: Uploads, manifests: ManifestService,
                 access: Access) -> None:
        self.reads = reads
        self.uploads = uploads
        self.manifests = manifests
        self.access = access

    def routes(self) -> list[Route]:
        return [
            Route("/v2/{name:path}/blobs/uploads/", self.start, methods=["POST"]),
            Route("/v2/{name:path}/blobs/uploads/{session}", self.session,
                  methods=["GET", "PATCH", "PUT", "DELETE"]),
            Route("/v2/{name:path}/manifests/{reference}", self.manifest,
                  methods=["PUT", "DELETE"]),
            Route("/v2/{name:path}/blobs/{digest}", self.delete_blob, methods=["DELETE"]),
        ]

    async def _writer(
        self, request: Request, actions: str = "pull,push"
    ) -> tuple[UpstreamClient, str, str, Credential, str]:
        """Target, the name the client used, and the client's credential (required) and
        identity."""
        request.state.actions = actions
        client, repo = self.reads.target(request)
        caller = await self.reads.caller(request, client)
        if caller.credential is None:
            raise errors.Unauthorized(f"pushing to {client.name} needs credentials")
        return client, repo, request.path_params["name"], caller.credential, caller.identity

    async def start(self, request: Request) -> Response:
        client, repo, name, credential, identity = await self._writer(request)
        query = request.query_params
        params = {k: str(parse_digest(query[k])) for k in ("digest", "mount") if k in query}
        if "mount" in params and "from" in query:
            params["from"] = check_name(client.upstream.repository(query["from"]))
        result = await self.uploads.start(client, repo, name, credential, identity, params,
                                          request.stream(), body_length(request))
        return answer(result)

    async def session(self, request: Request) -> Response:
        client, repo, name, credential, identity = await self._writer(request)
        session = await self.uploads.get(client, request.path_params["session"], repo,
                                         credential, identity)
        length = body_length(request)
        if request.method == "PATCH":
            result = await self.uploads.patch(client, session, name, credential,
                                              request.stream(), length,
                                              request.headers.get("content-range"))
        elif request.method == "PUT":
            digest = parse_digest(request.query_params.get("digest", ""))
            result = await self.uploads.finish(client, session, name, credential, digest,
                                               request.stream(), length)
        elif request.method == "GET":
            result = await self.uploads.status(client, session, name, credential)
        else:
            result = await self.uploads.cancel(client, session, credential)
        return answer(result)

    async def manifest(self, request: Request) -> Response:
        actions = "pull,push" if request.method == "PUT" else "pull,delete"
        client, repo, name, credential, _ = await self._writer(request, actions)
        reference = check_reference(request.path_params["reference"])
        path = f"/v2/{repo}/manifests/{reference}"
        if request.method == "DELETE":
            response = await client.send("DELETE", path, repo=repo, credential=credential,
                                         actions=actions)
            if response.status_code not in (200, 202):
                raise upstream_error(response, client.name, errors.ManifestUnknown,
                                     f"manifest {repo}@{reference}", response.content)
            with best_effort(f"the deletion of {repo}@{reference}"):
                await self.manifests.deleted(client.name, repo, reference)
                if isinstance(reference, Digest):  # only this repository's link goes
                    await self.access.unlink(client, repo, str(reference))
            return Response(status_code=202, headers=API_VERSION)
        try:
            data = await read_manifest(request.stream(), content_length(request),
                                       self.uploads.idle)
        except ClientGone:
            log.warning("client went away mid-body: manifest push to %s:%s", repo, reference)
            raise errors.ManifestInvalid("client went away mid-upload") from None
        media_type = pushed_media_type(data, request.headers.get("content-type"))
        if isinstance(reference, Digest) and hashlib.new(
                reference.algorithm, data).hexdigest() != reference.hex:
            raise errors.DigestInvalid(f"manifest does not match {reference}")
        response = await client.send(
            "PUT", path, repo=repo, credential=credential, actions=actions, content=data,
            headers={"Content-Type": media_type})
        if response.status_code != 201:
            raise upstream_error(response, client.name, errors.ManifestUnknown,
                                 f"manifest {repo}:{reference}", response.content)
        tag = None if isinstance(reference, Digest) else reference
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        with best_effort(f"pushed manifest {repo}@{digest}"):
            await self.manifests.pushed(client.name, repo, data, media_type, tag)
        return Response(status_code=201, headers={
            **API_VERSION, "Location": f"/v2/{name}/manifests/{digest}",
            "Docker-Content-Digest": str(digest)})

    async def delete_blob(self, request: Request) -> Response:
        client, repo, _, credential, _ = await self._writer(request, "pull,delete")
        digest = parse_digest(request.path_params["digest"])
        response = await client.send("DELETE", f"/v2/{repo}/blobs/{digest}", repo=repo,
                                     credential=credential, actions="pull,delete")
        if response.status_code not in (200, 202):
            raise upstream_error(response, client.name, errors.BlobUnknown, f"blob {digest}",
                                 response.content)
        # Only this repository's claim goes: the content may be other repositories' too.
        with best_effort(f"the deletion of {repo}@{digest}"):
            await self.access.unlink(client, repo, str(digest))
        return Response(status_code=202, headers=API_VERSION)


@contextlib.contextmanager
def best_effort(what: str) -> Iterator[None]:
    """Cache bookkeeping after the upstream said yes: a full disk must not turn that yes
    into an error for the client (the metadata store skips such writes itself; this is for
    whatever else writes to the disk)."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as exc:
        if not disk_full(exc):
            raise
        log.warning("cache disk full: %s not recorded", what)


def disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of room (a file's ENOSPC, or SQLite's own word)."""
    if isinstance(exc, sqlite3.OperationalError):
        return "full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def pushed_media_type(data: bytes, content_type: str | None) -> str:
    """The media type to push a manifest with: its Content-Type if that is one, else the
    document's own; refused (400) if neither is a valid media type."""
    declared = (content_type or "").split(";")[0].strip()
    media_type = media_type_of(data, content_type if MEDIA_TYPE.fullmatch(declared) else None)
    if not MEDIA_TYPE.fullmatch(media_type):
        raise errors.ManifestInvalid(f"invalid manifest media type {media_type[:100]!r}")
    return media_type


def content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise errors.SizeInvalid(f"bad Content-Length {value[:30]!r}")
    return int(value)


def body_length(request: Request) -> int | None:
    """The body's declared length; None for a chunked body, 0 when there is none."""
    length = content_length(request)
    if length is None and "transfer-encoding" not in request.headers:
        return 0
    return length


def answer(result: Forwarded) -> Response:
    return Response(result.body, status_code=result.status,
                    headers={**API_VERSION, **result.headers})
