"""Who visits the cache browser, and what they may see. Every decision goes through
`mirror.access`, with the registry's own rules:

- A visitor is anonymous, or signed in with HTTP Basic (`/ui/login` asks for it): their
  credentials map to the same identity as a pull with them (`Identities.of_basic`), at each
  upstream that takes client credentials; at the others they are anonymous. Credentials
  are checked at the upstream's realm, as `docker login` checks them, once per identity and
  process every `VERIFIED_TTL` seconds (refusals too: a wrong password is not sent again
  and again), and never stored.
- A repository is shown when the visitor's identity has a grant for it, of any age, or an
  anonymous probe proved it public (as `/v2/_catalog` lists names). For a signed-in visitor
  a repository it has not proven yet is proven as a pull would: an upstream HEAD of one of
  its digests with the visitor's credentials (`Access.authorize_digest`), which records the
  grant (or revokes one on a 401 or 403). Anonymous visitors cause no upstream request.
- An image by digest is shown only when the digest is linked to the repository (rule 2 of
  `mirror.access`), or that HEAD proves it: naming a digest unlocks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import cachetools
import httpx
from starlette.requests import Request

from mirror import errors
from mirror.access import Access
from mirror.auth import TokenEndpoint, credentials_from_header
from mirror.identity import ANONYMOUS_CALLER, Caller, Identities, auth_user
from mirror.reference import parse_digest
from mirror.upstream import UpstreamClient

VERIFIED_TTL = 300.0  # seconds a login's check (accepted or refused) counts in a process
MEMO_ENTRIES = 10_000
PROBES = 8  # upstream HEADs one listing page may make for a signed-in visitor, at most
PROBE_TIMEOUT = 10.0  # seconds a listing waits for them; unfinished ones show nothing
SCAN = 2_000  # repositories one listing page looks at, at most


@dataclass(slots=True)
class Visitor:
    user: str = ""  # the account name of a signed-in visitor
    refused: bool = False  # sent credentials that the upstream refused
    callers: dict[str, Caller] = field(default_factory=dict)  # by upstream; else anonymous

    @property
    def signed_in(self) -> bool:
        return bool(self.user) and not self.refused

    def caller(self, client: UpstreamClient) -> Caller:
        return self.callers.get(client.name, ANONYMOUS_CALLER)


@dataclass(frozen=True, slots=True)
class Listing:
    names: list[str]
    after: str | None  # where the next page starts; None: this was the last


def prefix_start(prefix: str) -> str:
    """An `after` for `iter_repos` from which every name starting with `prefix` comes (the
    greatest string below `prefix` that no repository name can be)."""
    if not prefix:
        return ""
    return prefix[:-1] + chr(ord(prefix[-1]) - 1) + "\U0010ffff" if prefix[-1] > "\0" \
        else prefix[:-1]


class Visitors:
    def __init__(self, clients: Mapping[str, UpstreamClient], access: Access,
                 identities: Identities, access_ttl: float) -> None:
        self.clients = clients
        self.access = access
        self.identities = identities
        self.tokens = TokenEndpoint(clients, identities)
        self._verified: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            MEMO_ENTRIES, VERIFIED_TTL)
        # Probes the upstream refused, per visitor: not asked again for a while (the
        # visitor's own answer: nobody else's counts, and nothing is inferred from it).
        self._refused: cachetools.TTLCache[tuple[str, str, str], bool] = cachetools.TTLCache(
            MEMO_ENTRIES, max(access_ttl, 10.0))

    # -- who -------------------------------------------------------------------------------

    @property
    def login_client(self) -> UpstreamClient | None:
        """The upstream that checks logins: the first that takes client credentials."""
        return next((c for c in self.clients.values() if c.client_credentials), None)

    async def visitor(self, request: Request) -> Visitor:
        header = request.headers.get("authorization")
        visitor = Visitor()
        if not header:
            return visitor
        identities = await self.identities.ready()
        try:
            basic = credentials_from_header(header)
        except errors.Unauthorized:
            visitor.refused = True
            return visitor
        if basic is not None:
            login = self.login_client
            if login is None:  # no upstream takes credentials: every visitor is anonymous
                return visitor
            visitor.user = auth_user(basic)
            if await self.check_login(login, header) == "refused":
                visitor.refused = True
                return visitor
        for client in self.clients.values():
            with contextlib.suppress(errors.Unauthorized):  # not for this upstream
                caller = identities.caller(header, client.name)
                self.access.check_binding(client, caller)
                visitor.callers[client.name] = caller
                visitor.user = visitor.user or caller.user
        return visitor

    async def check_login(self, client: UpstreamClient, header: str) -> str:
        """"ok", "refused" or "unreachable": Basic credentials checked at `client`'s realm
        (exchanged for a token there, as `docker login` through us does)."""
        identities = await self.identities.ready()
        basic = credentials_from_header(header)
        if basic is None:
            return "refused"
        identity = identities.of_basic(client.name, basic)
        known = self._verified.get(identity)
        if known is not None:  # these very credentials were checked a moment ago
            return "ok" if known else "refused"
        try:
            await self.tokens.issue(client.name, [], basic)
        except (errors.Unauthorized, errors.Denied):
            self._verified[identity] = False
            return "refused"
        except (errors.RegistryError, httpx.HTTPError):  # an outage, or a broken realm
            return "unreachable"
        self._verified[identity] = True
        return "ok"

    # -- what ------------------------------------------------------------------------------

    async def listed(self, client: UpstreamClient, repo: str, caller: Caller) -> bool:
        """Proven readable by the caller, or public (as the catalog lists names)."""
        if await self.access.granted(client, repo, caller, lasting=True):
            return True
        return caller.identity != ANONYMOUS_CALLER.identity and await self.access.granted(
            client, repo, ANONYMOUS_CALLER, lasting=True)

    async def current(self, client: UpstreamClient, repo: str, caller: Caller) -> bool:
        """Access as a pull has it now: proven within access_ttl (offline: any age), by
        the caller or by an anonymous probe."""
        if await self.access.granted(client, repo, caller):
            return True
        return caller.identity != ANONYMOUS_CALLER.identity and await self.access.granted(
            client, repo, ANONYMOUS_CALLER)

    async def prove(self, client: UpstreamClient, repo: str, caller: Caller,
                    digest: str) -> bool:
        """The visitor's access to `digest` under `repo`, asked as a pull asks (an anonymous
        visitor's with no credential at all)."""
        key = (client.name, repo, caller.identity)
        if client.offline or key in self._refused:
            return False
        try:
            await self.access.authorize_digest(client, repo, caller, parse_digest(digest),
                                               "manifests")
        except errors.RegistryError:  # refused, unknown, or the upstream is out
            self._refused[key] = True
            return False
        return True

    async def may_see_repo(self, client: UpstreamClient, repo: str, caller: Caller,
                           digest: str | None) -> bool:
        """The repository's page (its tags and what they hold): access as a pull needs it,
        not a listing's names-only grant of any age; `digest` one of its images, for a
        proof when the grant is stale."""
        if await self.current(client, repo, caller):
            return True
        return digest is not None and await self.prove(client, repo, caller, digest)

    async def may_see_image(self, client: UpstreamClient, repo: str, caller: Caller,
                            digest: str) -> bool:
        if (await self.current(client, repo, caller)
                and await self.access.metadata.linked(client.name, repo, digest)):
            return True
        return await self.prove(client, repo, caller, digest)

    async def repositories(self, client: UpstreamClient, caller: Caller, prefix: str,
                           after: str, limit: int) -> Listing:
        """Up to `limit` cached repositories whose names start with `prefix`, after
        `after`, that the caller may see; the walk is bounded (`SCAN`, `PROBES`)."""
        start = max(after, prefix_start(prefix))
        metadata = self.access.metadata
        entries: list[tuple[str, bool]] = []  # (name, shown without a probe)
        last, exhausted, scanned, probes = "", True, 0, 0
        probe = not caller.anonymous and not client.offline
        repos = metadata.iter_repos(client.name, start)
        try:
            async for repo in repos:
                if not repo.startswith(prefix):
                    break
                last, scanned = repo, scanned + 1
                if await self.listed(client, repo, caller):
                    entries.append((repo, True))
                elif probe and probes < PROBES \
                        and (client.name, repo, caller.identity) not in self._refused:
                    entries.append((repo, False))
                    probes += 1
                if len(entries) > limit or scanned >= SCAN:
                    exhausted = False
                    break
        finally:
            await _close(repos)
        shown = await self._prove_all(client, caller, entries)
        if len(shown) > limit:
            return Listing(shown[:limit], shown[limit - 1])
        return Listing(shown, None if exhausted else last)

    async def _prove_all(self, client: UpstreamClient, caller: Caller,
                         entries: list[tuple[str, bool]]) -> list[str]:
        unproven = [name for name, known in entries if not known]
        proven: set[str] = set()
        if unproven:
            async def one(name: str) -> None:
                tags = await self.access.metadata.repo_tags(client.name, name, limit=1)
                if tags and await self.prove(client, name, caller, tags[0].digest):
                    proven.add(name)

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(one(n) for n in unproven)),
                                       PROBE_TIMEOUT)
        return [name for name, known in entries if known or name in proven]


async def _close(items: AsyncIterator[str]) -> None:
    """Finish a listing left early (a generator's pages, its cursor)."""
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()
