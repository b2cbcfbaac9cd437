"""A small registry that takes pushes (starlette on uvicorn in a thread, loopback only), for
the push cases a real registry will not produce on demand: a Location on another host, a
garbled Range, an upload session that must be seen cancelled.

Users authenticate with Basic at `/token` and get the token `token-<user>`; every registry
request needs one. Blobs are stored once and linked per repository, as distribution does.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from support.procs import free_port

USERS = {"alice": "alicepw", "bob": "bobpw"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    user: str | None
    status: int


@dataclass
class PushUpstream:
    blobs: dict[str, bytes] = field(default_factory=dict)
    links: set[tuple[str, str]] = field(default_factory=set)  # (repo, digest)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    uploads: dict[str, bytearray] = field(default_factory=dict)
    # Scripted hostility: the Location sent for new sessions and after each PATCH (format
    # string with {name}, {id}), and a Range to send instead of the true one.
    upload_location: str = "/v2/{name}/blobs/uploads/{id}"
    patch_range: str | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.other_host = f"http://localhost:{self.port}"  # another origin, the same server
        app = Starlette(routes=[
            Route("/v2/", self._ping),
            Route("/token", self._token),
            Route("/v2/{name:path}/blobs/uploads/", self._start, methods=["POST"]),
            Route("/v2/{name:path}/blobs/uploads/{id}", self._upload,
                  methods=["GET", "PATCH", "PUT", "DELETE"]),
            Route("/v2/{name:path}/blobs/{digest}", self._blob,
                  methods=["GET", "HEAD", "DELETE"]),
            Route("/v2/{name:path}/manifests/{ref}", self._manifest,
                  methods=["GET", "HEAD", "PUT", "DELETE"]),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> PushUpstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("fake push upstream did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        self.links.add((repo, digest))
        return digest

    def count(self, method: str, contains: str = "") -> int:
        return sum(1 for s in self.seen if s.method == method and contains in s.path)

    # -- plumbing --------------------------------------------------------------------------

    def _user(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return auth.removeprefix("Bearer token-") if auth.startswith("Bearer token-") else None

    def _answer(self, request: Request, response: Response) -> Response:
        self.seen.append(Seen(request.method, request.url.path, self._user(request),
                              response.status_code))
        return response

    def _refused(self, request: Request) -> Response | None:
        if self._user(request) in USERS:
            return None
        return self._answer(request, JSONResponse(
            {"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]}, 401,
            headers={"WWW-Authenticate": f'Bearer realm="{self.url}/token",service="fake"'}))

    @staticmethod
    def _error(code: str, status: int) -> JSONResponse:
        return JSONResponse({"errors": [{"code": code, "message": code.lower()}]}, status)

    def _location(self, name: str, upload: str) -> str:
        return self.upload_location.format(name=name, id=upload, url=self.url,
                                           other=self.other_host)

    # -- endpoints -------------------------------------------------------------------------

    async def _ping(self, request: Request) -> Response:
        return self._refused(request) or self._answer(request, JSONResponse({}))

    async def _token(self, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        user, _, password = base64.b64decode(auth.removeprefix("Basic ") or "Og==").decode(
        ).partition(":")
        if USERS.get(user) != password:
            return self._answer(request, self._error("UNAUTHORIZED", 401))
        return self._answer(request, JSONResponse({"token": f"token-{user}",
                                                   "expires_in": 300}))

    async def _start(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused:
            return refused
        name = request.path_params["name"]
        mount, source = request.query_params.get("mount"), request.query_params.get("from")
        if mount and (source, mount) in self.links:
            self.links.add((name, mount))
            return self._answer(request, Response(status_code=201, headers={
                "Location": f"/v2/{name}/blobs/{mount}", "Docker-Content-Digest": mount}))
        upload = str(uuid.uuid4())
        self.uploads[upload] = bytearray()
        return self._answer(request, Response(status_code=202, headers={
            "Location": self._location(name, upload), "Range": "0-0",
            "Docker-Upload-UUID": upload}))

    async def _upload(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused:
            return refused
        name, upload = request.path_params["name"], request.path_params["id"]
        data = self.uploads.get(upload)
        if data is None:
            return self._answer(request, self._error("BLOB_UPLOAD_UNKNOWN", 404))
        if request.method == "DELETE":
            del self.uploads[upload]
            return self._answer(request, Response(status_code=204))
        if request.method in ("PATCH", "PUT"):
            async for chunk in request.stream():
                data += chunk
        headers = {"Location": self._location(name, upload), "Docker-Upload-UUID": upload,
                   "Range": self.patch_range or f"0-{max(len(data) - 1, 0)}"}
        if request.method == "GET":
            return self._answer(request, Response(status_code=204, headers=headers))
        if request.method == "PATCH":
            return self._answer(request, Response(status_code=202, headers=headers))
        digest = request.query_params.get("digest", "")
        if sha256(bytes(data)) != digest:
            return self._answer(request, self._error("DIGEST_INVALID", 400))
        del self.uploads[upload]
        self.blobs[digest] = bytes(data)
        self.links.add((name, digest))
        return self._answer(request, Response(status_code=201, headers={
            "Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest}))

    async def _blob(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused:
            return refused
        name, digest = request.path_params["name"], request.path_params["digest"]
        if (name, digest) not in self.links:
            return self._answer(request, self._error("BLOB_UNKNOWN", 404))
        if request.method == "DELETE":
            self.links.discard((name, digest))
            return self._answer(request, Response(status_code=202))
        data = self.blobs[digest]
        headers = {"Content-Length": str(len(data)), "Docker-Content-Digest": digest,
                   "Content-Type": "application/octet-stream"}
        body = b"" if request.method == "HEAD" else data
        return self._answer(request, Response(body, headers=headers))

    async def _manifest(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused:
            return refused
        name, ref = request.path_params["name"], request.path_params["ref"]
        if request.method == "PUT":
            data = await request.body()
            media_type = request.headers.get("content-type", "")
            digest = sha256(data)
            self.manifests[(name, ref)] = self.manifests[(name, digest)] = (media_type, data)
            return self._answer(request, Response(status_code=201, headers={
                "Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest}))
        found = self.manifests.get((name, ref))
        if found is None:
            return self._answer(request, self._error("MANIFEST_UNKNOWN", 404))
        if request.method == "DELETE":
            for key in [k for k, v in self.manifests.items() if k[0] == name and v == found]:
                del self.manifests[key]
            return self._answer(request, Response(status_code=202))
        media_type, data = found
        headers = {"Docker-Content-Digest": sha256(data), "Content-Type": media_type,
                   "Content-Length": str(len(data))}
        body = b"" if request.method == "HEAD" else data
        return self._answer(request, Response(body, headers=headers))
