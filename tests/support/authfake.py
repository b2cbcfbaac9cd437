"""An upstream registry with token auth and per-repository access rules, scriptable into
hostile behaviour (HEAD 200 for any blob, a CDN that challenges, pushes accepted unchecked),
served by uvicorn in a thread on loopback. For access-model tests; the real registry
(`support.registry`) covers the same rules against distribution itself.

Access is checked before existence, as registries do: a caller without access to a
repository gets 401 whether or not the repository or the tag exists.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
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

USERS = {"alice": "alicepw", "bob": "bobpw"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    readers: set[str] = field(default_factory=set)  # who may read a private repository
    writers: set[str] = field(default_factory=lambda: {"alice", "bob"})
    tags: dict[str, str] = field(default_factory=dict)  # tag -> manifest digest
    content: set[str] = field(default_factory=set)  # digests the repository holds


@dataclass
class Seen:
    method: str
    path: str
    user: str | None  # None: anonymous (or no token)
    authorization: str = ""


@dataclass
class Image:
    repo: str
    tag: str
    digest: str  # the manifest's
    manifest: bytes
    config: str
    layers: list[str]

    @property
    def blobs(self) -> list[str]:
        return [self.config, *self.layers]


class AuthUpstream:
    def __init__(self, service: str = "fake") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}"  # another origin, the same server
        self.service = service
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[str, bytes]] = {}
        self.tokens: dict[str, str | None] = {}  # token -> user (None: anonymous)
        self.seen: list[Seen] = []
        self.down = False  # answer 503 to everything but the token endpoint
        self.head_any_blob = False  # hostile: HEAD 200 for any blob of any repository
        self.cdn_challenges = False  # blob GETs go to a "CDN" that answers 401 + its realm
        self.no_auth = False  # no tokens at all: anyone reads and writes everything
        self.endless: set[str] = set()  # blobs whose GET streams on without a length
        self.drip = 0.0  # seconds between 1 KiB chunks of those endless bodies
        self.sent = 0  # bytes of endless bodies sent so far
        self._count = itertools.count()
        app = Starlette(routes=[
            Route("/v2/", self._ping),
            Route("/token", self._token, methods=["GET", "POST"]),
            Route("/cdn/{digest}", self._cdn),
            Route("/cdn-realm", self._token, methods=["GET", "POST"]),
            Route("/v2/{name:path}/manifests/{ref}", self._manifest,
                  methods=["GET", "HEAD", "PUT", "DELETE"]),
            Route("/v2/{name:path}/blobs/uploads/", self._upload, methods=["POST"]),
            Route("/v2/{name:path}/blobs/{digest}", self._blob,
                  methods=["GET", "HEAD", "DELETE"]),
            Route("/v2/{name:path}/tags/list", self._tags),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> AuthUpstream:
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

    # -- content ---------------------------------------------------------------------------

    def repo(self, name: str, private: bool = False, readers: set[str] | None = None) -> Repo:
        repo = self.repos.setdefault(name, Repo())
        repo.private = private or repo.private
        repo.readers |= readers or set()
        return repo

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        self.repo(repo).content.add(digest)
        return digest

    def add_image(self, repo: str, tag: str, layers: list[bytes], *, private: bool = False,
                  readers: set[str] | None = None, extra: dict[str, object] | None = None,
                  ) -> Image:
        self.repo(repo, private, readers)
        config = self.add_blob(repo, json.dumps({"os": "linux", "architecture": "amd64",
                                                 "repo": repo, "tag": tag}).encode())
        digests = [self.add_blob(repo, data) for data in layers]
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                          "digest": config, "size": len(self.blobs[config])},
               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                           "digest": d, "size": len(self.blobs[d])} for d in digests],
               **(extra or {})}
        data = json.dumps(doc).encode()
        digest = self.put_manifest(repo, tag, data)
        return Image(repo, tag, digest, data, config, digests)

    def put_manifest(self, repo: str, tag: str | None, data: bytes,
                     media_type: str = OCI_MANIFEST) -> str:
        digest = digest_of(data)
        self.manifests[digest] = (media_type, data)
        self.repo(repo).content.add(digest)
        if tag is not None:
            self.repo(repo).tags[tag] = digest
        return digest

    def count(self, method: str, contains: str) -> int:
        return sum(1 for s in self.seen if s.method == method and contains in s.path)

    # -- auth ------------------------------------------------------------------------------

    def _challenge(self, scope: str = "", error: str = "") -> dict[str, str]:
        value = f'Bearer realm="{self.url}/token",service="{self.service}"'
        if scope:
            value += f',scope="{scope}"'
        if error:
            value += f',error="{error}"'
        return {"WWW-Authenticate": value}

    def _user(self, request: Request) -> tuple[bool, str | None]:
        """(authenticated, user): a valid token, anonymous or not."""
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            return False, None
        token = header[7:]
        if token not in self.tokens:
            return False, None
        return True, self.tokens[token]

    def _may(self, user: str | None, name: str, action: str) -> bool:
        repo = self.repos.get(name)
        if action == "pull":
            return repo is None or not repo.private or (user is not None and user in
                                                        repo.readers)
        return user is not None and (repo is None or user in repo.writers)

    def _gate(self, request: Request, name: str, action: str) -> Response | None:
        """The answer for a caller who may not do `action` on `name`, else None."""
        authenticated, user = self._user(request)
        self.seen.append(Seen(request.method, request.url.path, user,
                              request.headers.get("authorization", "")))
        if self.down:
            return JSONResponse({"errors": [{"code": "UNAVAILABLE", "message": "down"}]}, 503)
        if self.no_auth:
            return None
        scope = f"repository:{name}:{action}"
        if not authenticated:
            return JSONResponse({"errors": [{"code": "UNAUTHORIZED", "message": "token"}]},
                                401, headers=self._challenge(scope))
        if not self._may(user, name, action):
            return JSONResponse(
                {"errors": [{"code": "UNAUTHORIZED", "message": "no access"}]}, 401,
                headers=self._challenge(scope, "insufficient_scope"))
        return None

    async def _ping(self, request: Request) -> Response:
        if self.no_auth or self._user(request)[0]:
            return JSONResponse({})
        return JSONResponse({"errors": [{"code": "UNAUTHORIZED", "message": "token"}]}, 401,
                            headers=self._challenge())

    async def _token(self, request: Request) -> Response:
        header = request.headers.get("authorization", "")
        self.seen.append(Seen(request.method, request.url.path, None, header))
        user: str | None = None
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if USERS.get(name) != password:
                return JSONResponse({"details": "bad credentials"}, 401)
            user = name
        token = f"t-{user or 'anonymous'}-{next(self._count)}"
        self.tokens[token] = user
        return JSONResponse({"token": token, "expires_in": 300})

    # -- the API ---------------------------------------------------------------------------

    async def _manifest(self, request: Request) -> Response:
        name, ref = request.path_params["name"], request.path_params["ref"]
        action = "push" if request.method == "PUT" else "delete" \
            if request.method == "DELETE" else "pull"
        refused = self._gate(request, name, action)
        if refused:
            return refused
        repo = self.repos.get(name)
        if request.method == "PUT":
            data = await request.body()
            digest = self.put_manifest(name, None if ref.startswith("sha256:") else ref, data,
                                       request.headers.get("content-type", OCI_MANIFEST))
            return Response(status_code=201, headers={"Docker-Content-Digest": digest})
        digest = (repo.tags.get(ref) if repo else None) if not ref.startswith("sha256:") \
            else ref
        if repo is None or digest is None or digest not in repo.content \
                or digest not in self.manifests:
            return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]},
                                404)
        if request.method == "DELETE":
            repo.content.discard(digest)
            return Response(status_code=202)
        media_type, data = self.manifests[digest]
        headers = {"Docker-Content-Digest": digest, "Content-Type": media_type,
                   "Content-Length": str(len(data))}
        return Response(b"" if request.method == "HEAD" else data, headers=headers)

    async def _blob(self, request: Request) -> Response:
        name, digest = request.path_params["name"], request.path_params["digest"]
        refused = self._gate(request, name, "delete" if request.method == "DELETE" else "pull")
        if refused:
            return refused
        repo = self.repos.get(name)
        held = repo is not None and digest in repo.content and digest in self.blobs
        if request.method == "HEAD" and digest in self.endless:
            response = Response(b"", headers={"Docker-Content-Digest": digest})
            response.raw_headers = [(k, v) for k, v in response.raw_headers
                                    if k != b"content-length"]  # length unknown
            return response
        if request.method == "HEAD" and self.head_any_blob:
            size = len(self.blobs.get(digest, b"x" * 1000))
            return Response(b"", headers={"Content-Length": str(size),
                                          "Docker-Content-Digest": digest})
        if not held:
            return JSONResponse({"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]}, 404)
        assert repo is not None
        if request.method == "DELETE":
            repo.content.discard(digest)
            return Response(status_code=202)
        if request.method == "GET" and digest in self.endless:
            return StreamingResponse(self._endless(request),
                                     media_type="application/octet-stream")
        if request.method == "GET" and self.cdn_challenges:
            return Response(status_code=307, headers={"Location": f"{self.cdn_url}/cdn/{digest}"})
        data = self.blobs[digest]
        headers = {"Content-Length": str(len(data)), "Docker-Content-Digest": digest}
        return Response(b"" if request.method == "HEAD" else data, headers=headers,
                        media_type="application/octet-stream")

    async def _endless(self, request: Request) -> AsyncIterator[bytes]:
        chunk = b"\0" * (1024 if self.drip else 256 * 1024)
        for _ in range(1 << 20):  # bounded: 256 GiB at most, far past any test's limit
            if self.drip:
                await asyncio.sleep(self.drip)
            if await request.is_disconnected():
                return
            self.sent += len(chunk)
            yield chunk

    async def _cdn(self, request: Request) -> Response:
        """A CDN in front of the blobs that answers with a challenge of its own."""
        self.seen.append(Seen(request.method, request.url.path, None,
                              request.headers.get("authorization", "")))
        return JSONResponse({"errors": [{"code": "UNAUTHORIZED", "message": "cdn"}]}, 401,
                            headers={"WWW-Authenticate":
                                     f'Bearer realm="{self.cdn_url}/cdn-realm",service="cdn"'})

    async def _upload(self, request: Request) -> Response:
        name = request.path_params["name"]
        refused = self._gate(request, name, "push")
        if refused:
            return refused
        digest = request.query_params.get("digest")
        if digest is None:
            return JSONResponse({"errors": [{"code": "UNSUPPORTED", "message": "monolithic only"}]},
                                405)
        data = await request.body()
        if digest_of(data) != digest:
            return JSONResponse({"errors": [{"code": "DIGEST_INVALID", "message": "no"}]}, 400)
        self.add_blob(name, data)
        return Response(status_code=201, headers={"Docker-Content-Digest": digest,
                                                  "Location": f"/v2/{name}/blobs/{digest}"})

    async def _tags(self, request: Request) -> Response:
        name = request.path_params["name"]
        refused = self._gate(request, name, "pull")
        if refused:
            return refused
        repo = self.repos.get(name)
        if repo is None:
            return JSONResponse({"errors": [{"code": "NAME_UNKNOWN", "message": "no"}]}, 404)
        return JSONResponse({"name": name, "tags": sorted(repo.tags)})
