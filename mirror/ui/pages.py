"""The cache browser's pages:

    /ui/                              upstreams and their repositories (search: ?q=PREFIX),
                                      the mirror at a glance, most pulled, downloads
    /ui/<upstream>/                   one upstream's repositories, by page
    /ui/<upstream>/<repository>       its cached tags, by page
    /ui/<upstream>/<repository>:<tag> an image, by tag or by digest: `:` and `@` cannot
    /ui/<upstream>/<repository>@<digest>   occur in repository names, so a path is never
                                      ambiguous
    /ui/login                         HTTP Basic sign-in
    /ui/-/downloads.json              downloads in progress (the overview polls it)
    /ui/-/static/<file>               the stylesheet and the script

Every page reads the metadata through its interface, a page at a time (keyset cursors:
`after`), so it costs the same with a million tags. What a visitor may see is
`mirror.ui.visitors`' to decide; a page writes nothing a pull would not record.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from mirror import errors
from mirror.metadata import Metadata, MetadataError, PullCount, TagRecord
from mirror.reference import check_name, check_tag, parse_digest
from mirror.store import Store
from mirror.ui.glance import Glance
from mirror.ui.images import Images
from mirror.ui.visitors import Visitor, Visitors
from mirror.ui.web import HEADERS, Web, human_bytes
from mirror.upstream import UpstreamClient

log = logging.getLogger("mirror.ui")

OVERVIEW_REPOS = 10  # repositories per upstream on the overview
PAGE, MAX_PAGE = 50, 200  # rows of a listing page: by default, at most (?n=)
POPULAR, POPULAR_SCAN = 10, 200  # most pulled images shown; pull counts looked at for them
MAX_QUERY = 128
CHALLENGE = {"WWW-Authenticate": 'Basic realm="mirror"'}

Handler = Callable[[Request], Awaitable[Response]]


class NotShown(Exception):
    """Not cached, or not for this visitor: one answer for both (404), which tells nothing
    about whether it exists."""


@dataclass(frozen=True, slots=True)
class Section:
    """An upstream on the overview, or on its own page."""

    name: str
    default: bool
    repositories: list[str]
    after: str | None  # where its next page starts


@dataclass(frozen=True, slots=True)
class Row:
    record: TagRecord
    platforms: tuple[str, ...]
    size: int | None
    complete: bool
    used: float | None
    pulls: int


def query(request: Request, name: str, limit: int = MAX_QUERY) -> str:
    """A text parameter: printable, at most `limit` characters."""
    text = request.query_params.get(name, "")[:limit]
    return text if text.isprintable() else ""


def page_size(request: Request) -> int:
    text = request.query_params.get("n", "")
    return min(max(int(text), 1), MAX_PAGE) if text.isascii() and text.isdigit() else PAGE


def safe_next(target: str) -> str:
    """Where to go after signing in: one of our pages, never another site."""
    parts = urlsplit(target)
    if (parts.scheme or parts.netloc or not target.startswith("/ui/")
            or "\\" in target or not target.isprintable()):
        return "/ui/"
    return target


class Pages:
    def __init__(self, clients: Mapping[str, UpstreamClient], store: Store,
                 visitors: Visitors, images: Images, glance: Glance, web: Web,
                 public_url: str = "") -> None:
        self.clients = clients
        self.default = next(iter(clients.values()))
        self.store = store
        self.metadata: Metadata = store.metadata
        self.visitors = visitors
        self.images = images
        self.glance = glance
        self.web = web
        self.public_url = public_url.rstrip("/")

    def routes(self) -> list[Route]:
        read = ["GET", "HEAD"]
        return [
            Route("/ui", self.home, methods=read),
            Route("/ui/", self._guard(self.overview), methods=read),
            Route("/ui/login", self._guard(self.login), methods=read),
            Route("/ui/-/static/{name}", self.asset, methods=read),
            Route("/ui/-/downloads.json", self._guard(self.downloads), methods=read),
            Route("/ui/{upstream}/{rest:path}", self._guard(self.browse), methods=read),
        ]

    # -- answers ---------------------------------------------------------------------------

    def _guard(self, handler: Handler) -> Handler:
        """HTML answers for what goes wrong; the registry's error bodies are for clients."""

        @functools.wraps(handler)
        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (NotShown, errors.NameInvalid, errors.TagInvalid, errors.DigestInvalid):
                return await self._error(request, 404, "Not found",
                                         "Nothing is cached here that you may see.")
            except MetadataError as exc:
                log.error("cache browser: metadata store failed on %s: %s",
                          request.url.path[:200], exc)
                return await self._error(request, 503, "Unavailable",
                                         "The mirror's metadata store cannot be read now.")

        return guarded

    async def _error(self, request: Request, status: int, title: str, message: str,
                     headers: Mapping[str, str] | None = None) -> Response:
        try:
            visitor = await self.visitors.visitor(request)
        except Exception:  # the error page itself must not fail
            visitor = Visitor()
        return self.web.page(request, "error.html", {
            "visitor": visitor, "title": title, "message": message, "status": status,
            "next": request.url.path}, status=status, headers=headers)

    def _context(self, request: Request, visitor: Visitor, **values: Any) -> dict[str, Any]:
        return {"visitor": visitor, "next": request.url.path, **values}

    # -- the overview ----------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/ui/", status_code=308, headers=HEADERS)

    async def overview(self, request: Request) -> Response:
        visitor = await self.visitors.visitor(request)
        q = query(request, "q").strip().lower()
        sections = []
        for client, prefix in self._searched(q):
            listing = await self.visitors.repositories(client, visitor.caller(client), prefix,
                                                       "", OVERVIEW_REPOS)
            sections.append(Section(client.name, client is self.default, listing.names,
                                    listing.after))
        return self.web.page(request, "overview.html", self._context(
            request, visitor, q=q, sections=sections, glance=await self.glance.snapshot(),
            popular=await self._popular(visitor)))

    def _searched(self, q: str) -> list[tuple[UpstreamClient, str]]:
        """The upstreams a search covers: one, if it starts with an upstream's name."""
        for client in self.clients.values():
            if q.startswith(client.name + "/"):
                return [(client, q[len(client.name) + 1:])]
        return [(client, q) for client in self.clients.values()]

    async def _popular(self, visitor: Visitor) -> list[PullCount]:
        shown: list[PullCount] = []
        seen: dict[tuple[str, str], bool] = {}
        for record in await self.metadata.most_pulled(POPULAR_SCAN):
            client = self.clients.get(record.upstream)
            if client is None:
                continue
            key = (record.upstream, record.repo)
            if key not in seen:
                seen[key] = await self.visitors.listed(client, record.repo,
                                                       visitor.caller(client))
            if seen[key]:
                shown.append(record)
                if len(shown) >= POPULAR:
                    break
        return shown

    async def downloads(self, request: Request) -> Response:
        return self.web.json({"downloads": [
            {"upstream": d.upstream, "written": d.written, "size": d.size,
             "share": d.share, "written_text": human_bytes(d.written),
             "size_text": human_bytes(d.size)}
            for d in self.glance.downloads()]})

    async def asset(self, request: Request) -> Response:
        found = self.web.asset(request.path_params["name"])
        if found is None:
            return await self._error(request, 404, "Not found", "No such file.")
        return found

    # -- sign-in ---------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        """Ask for Basic credentials until the upstream accepts them, then go on."""
        client = self.visitors.login_client
        if client is None:
            return await self._error(request, 404, "Signing in is off",
                                     "No upstream of this mirror takes client credentials.")
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return await self._challenge(request, "Sign in with your account at "
                                         f"{client.name}.")
        try:
            outcome = await self.visitors.check_login(client, header)
        except errors.Unauthorized:
            outcome = "refused"
        if outcome == "refused":
            return await self._challenge(request, f"{client.name} refused these credentials.")
        if outcome == "unreachable":
            return await self._error(request, 503, "Cannot sign in now",
                                     f"{client.name} could not check your credentials.")
        target = safe_next(request.query_params.get("next", "/ui/"))
        return RedirectResponse(target, status_code=303, headers=HEADERS)

    async def _challenge(self, request: Request, message: str) -> Response:
        return self.web.page(request, "error.html", {
            "visitor": Visitor(), "title": "Sign in", "message": message, "status": 401,
            "next": "/ui/"}, status=401, headers=CHALLENGE)

    # -- an upstream, a repository, an image -------------------------------------------------

    async def browse(self, request: Request) -> Response:
        client = self.clients.get(request.path_params["upstream"])
        if client is None:
            raise NotShown
        visitor = await self.visitors.visitor(request)
        rest: str = request.path_params["rest"].rstrip("/")
        if not rest:
            return await self.upstream(request, visitor, client)
        name, at, digest = rest.partition("@")
        head, colon, tag = name.rpartition(":")
        if colon and "/" in tag:  # a colon in a path component is no tag separator
            head, colon, tag = "", "", name
        repo = self._repo(client, head if colon else name)
        if at:
            return await self.image(request, visitor, client, repo, None, digest)
        if colon:
            return await self.image(request, visitor, client, repo, check_tag(tag), None)
        return await self.repository(request, visitor, client, repo)

    @staticmethod
    def _repo(client: UpstreamClient, name: str) -> str:
        check_name(name)
        return "library/" + name if client.upstream.library_prefix and "/" not in name \
            else name

    async def upstream(self, request: Request, visitor: Visitor,
                       client: UpstreamClient) -> Response:
        q = query(request, "q").strip().lower()
        after = query(request, "after", 300)
        listing = await self.visitors.repositories(client, visitor.caller(client), q, after,
                                                   page_size(request))
        section = Section(client.name, client is self.default, listing.names, listing.after)
        return self.web.page(request, "upstream.html", self._context(
            request, visitor, q=q, after=after, section=section, n=page_size(request)))

    async def repository(self, request: Request, visitor: Visitor, client: UpstreamClient,
                         repo: str) -> Response:
        after, n = query(request, "after"), page_size(request)
        records = await self.metadata.repo_tags(client.name, repo, after, limit=n + 1)
        hint = records[0].digest if records else None
        if hint is None and after:
            first = await self.metadata.repo_tags(client.name, repo, limit=1)
            hint = first[0].digest if first else None
        caller = visitor.caller(client)
        if not await self.visitors.may_see_repo(client, repo, caller, hint):
            raise NotShown
        more, records = len(records) > n, records[:n]
        summaries = await self.images.summaries([(r.digest, r.media_type) for r in records],
                                                 client.name)
        used = await self.images.last_used(r.digest for r in records)
        pulls = await self.metadata.pulls(client.name, repo, [r.tag for r in records])
        rows = [Row(r, s.platforms, s.size, s.complete, used.get(r.digest), pulls.get(r.tag, 0))
                for r, s in zip(records, summaries, strict=True)]
        return self.web.page(request, "repository.html", self._context(
            request, visitor, upstream=client.name, repo=repo, rows=rows, after=after, n=n,
            next_after=records[-1].tag if more and records else None))

    async def image(self, request: Request, visitor: Visitor, client: UpstreamClient,
                    repo: str, tag: str | None, digest: str | None) -> Response:
        caller = visitor.caller(client)
        record: TagRecord | None = None
        if tag is not None:
            record = await self.metadata.tag(client.name, repo, tag, None)
            if record is None or not await self.visitors.may_see_repo(
                    client, repo, caller, record.digest):
                raise NotShown
            digest, media_type = record.digest, record.media_type
        else:
            assert digest is not None
            digest = str(parse_digest(digest))
            if not await self.visitors.may_see_image(client, repo, caller, digest):
                raise NotShown
            media_type = await self.metadata.media_type(digest) or ""
        details = await self.images.details(digest, media_type, client.name)
        reference = f":{tag}" if tag is not None else f"@{digest}"
        tags = [tag] if tag is not None else await self.metadata.tags_naming(
            client.name, repo, digest)
        pulls = (await self.metadata.pulls(client.name, repo, [tag])).get(tag, 0) \
            if tag is not None else None
        return self.web.page(request, "image.html", self._context(
            request, visitor, upstream=client.name, repo=repo, tag=tag, record=record,
            reference=reference, image=details, tags=tags[:50], pulls=pulls,
            commands=self.pull_commands(request, client, repo, reference)))

    def pull_commands(self, request: Request, client: UpstreamClient, repo: str,
                      reference: str) -> list[tuple[str, str]]:
        """How to pull the image through this mirror: docker addresses the mirror as a
        registry (the default upstream's images without a prefix, the others' with their
        `<upstream>/` prefix); podman as its registries.conf mirror does, with the prefix."""
        base = urlsplit(self.public_url) if self.public_url else None
        host = base.netloc if base is not None else request.url.netloc
        scheme = base.scheme if base is not None else request.url.scheme
        name = repo if client is self.default else f"{client.name}/{repo}"
        tls = " --tls-verify=false" if scheme == "http" else ""
        return [("docker", f"docker pull {host}/{name}{reference}"),
                ("podman", f"podman pull{tls} {host}/{client.name}/{repo}{reference}")]
