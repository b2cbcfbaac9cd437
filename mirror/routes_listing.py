"""HTTP routing of listings: the catalog of cached repositories, a repository's tags and a
manifest's referrers. Tags and referrers are the upstream's answer, asked with the caller's
own credential (nothing of them is cached); the catalog lists what the caller may read and
the repository policy (`mirror.policy`) serves."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mirror import errors
from mirror.identity import ANONYMOUS_CALLER, Caller
from mirror.reference import parse_digest
from mirror.routes import API_VERSION, Handlers
from mirror.upstream import UpstreamClient, upstream_error

CATALOG_PAGE, CATALOG_MAX = 100, 1000  # repositories a catalog page lists by default, at most
CATALOG_SCAN = 10_000  # repositories one catalog page looks at, at most


class ListingHandlers:
    def __init__(self, reads: Handlers) -> None:
        self.reads = reads

    def routes(self) -> list[Route]:
        read = ["GET", "HEAD"]
        return [
            Route("/v2/_catalog", self.catalog, methods=read),
            Route("/v2/{name:path}/tags/list", self.tags, methods=read),
            Route("/v2/{name:path}/referrers/{digest}", self.referrers, methods=read),
        ]

    async def catalog(self, request: Request) -> Response:
        """The cached repositories the caller may read (access it, or an anonymous probe,
        proved, of any age: names only), in lexical order with `n`/`last` pagination; `?ns=`
        picks one upstream."""
        query = request.query_params
        n_text = query.get("n", str(CATALOG_PAGE))
        if not (n_text.isascii() and n_text.isdigit()):
            raise errors.Unsupported(f"n must be a number, not {n_text[:20]!r}")
        n, last = min(int(n_text), CATALOG_MAX), query.get("last", "")
        reads = self.reads
        clients = [reads.client_for(request)] if "ns" in query else list(reads.clients.values())
        names: list[str] = []
        for client in clients:
            try:
                caller = await self.reads.caller(request, client)
            except errors.Unauthorized:
                continue  # a credential bound to another upstream reads nothing here
            names += await self._readable(client, caller, last, n + 1, bare="ns" in query)
        names.sort()
        page, more = names[:n], len(names) > n
        headers = dict(API_VERSION)
        if more and page:
            ns = f"&ns={query['ns']}" if "ns" in query else ""
            headers["Link"] = f'</v2/_catalog?n={n}&last={page[-1]}{ns}>; rel="next"'
        return JSONResponse({"repositories": page}, headers=headers)

    async def _readable(self, client: UpstreamClient, caller: Caller, last: str, wanted: int,
                        bare: bool) -> list[str]:
        """Up to `wanted` names of `client`'s cached repositories after `last` that `caller`
        may read, as clients name them (other upstreams' under their prefix). The walk is
        bounded: a caller who may read little sees a shorter page, not a slower one."""
        prefix = "" if bare or client is self.reads.default else client.name + "/"
        if last and prefix and not last.startswith(prefix):
            after = "" if last < prefix else "\uffff"
        else:
            after = last.removeprefix(prefix)
        found: list[str] = []
        scanned = 0
        async for repo in self.reads.access.metadata.iter_repos(client.name, after):
            scanned += 1
            access = self.reads.access
            if self.reads.permits(client, repo) and (
                    await access.granted(client, repo, caller, lasting=True)
                    or await access.granted(client, repo, ANONYMOUS_CALLER, lasting=True)):
                found.append(prefix + repo)
            if len(found) >= wanted or scanned >= CATALOG_SCAN:
                break
        return found

    async def tags(self, request: Request) -> Response:
        client, repo = self.reads.target(request)
        caller = await self.reads.caller(request, client)
        credential = self.reads.access.probe_credential(client, caller)
        params = {k: request.query_params[k] for k in ("n", "last") if k in request.query_params}
        response = await client.send("GET", f"/v2/{repo}/tags/list", repo=repo, params=params,
                                     credential=credential)
        if response.status_code != 200:
            raise upstream_error(
                response, client.name, errors.NameUnknown, f"repository {repo}", response.content)
        headers = dict(API_VERSION)
        body = response.content
        try:  # the name as the client asked for it (with our prefix, if it used one)
            doc = json.loads(body)
            if isinstance(doc, dict) and "name" in doc:
                doc["name"] = request.path_params["name"]
                body = json.dumps(doc).encode()
        except ValueError:
            pass
        link = response.headers.get("link")
        if link:
            # Point the next page at our own path (the client may have used a prefix or `ns`).
            query = link.partition("?")[2].partition(">")[0]
            ns = request.query_params.get("ns")
            extra = f"&ns={ns}" if ns and "ns=" not in query else ""
            headers["Link"] = f'<{request.url.path}?{query}{extra}>; rel="next"'
        return Response(body, media_type="application/json", headers=headers)

    async def referrers(self, request: Request) -> Response:
        client, repo = self.reads.target(request)
        caller = await self.reads.caller(request, client)
        credential = self.reads.access.probe_credential(client, caller)
        digest = parse_digest(request.path_params["digest"])
        params = {k: v for k, v in request.query_params.items() if k == "artifactType"}
        response = await client.send(
            "GET", f"/v2/{repo}/referrers/{digest}", repo=repo, params=params,
            credential=credential)
        if response.status_code != 200:
            raise upstream_error(response, client.name, errors.ManifestUnknown,
                                 f"referrers of {repo}@{digest}", response.content)
        headers = dict(API_VERSION)
        if "oci-filters-applied" in response.headers:
            headers["OCI-Filters-Applied"] = response.headers["oci-filters-applied"]
        return Response(response.content, headers=headers, media_type=response.headers.get(
            "content-type", "application/vnd.oci.image.index.v1+json"))
