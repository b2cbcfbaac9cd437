"""The mirror's side of the token protocol: the challenges it sends, and its token endpoint.

Clients authenticate to the mirror as to any registry. Our challenge's realm is our own
`/token` (under `public_url` when set: the Host header is never trusted for it); its
`service` names the upstream. Without credentials the endpoint hands out an anonymous token
(good for public content). With credentials (Basic on GET, or the OAuth2 password form
containerd POSTs) it exchanges them at that upstream's realm (learnt from the upstream's own
origin) and returns a token of ours bound to that upstream (`mirror.identity`). Client
credentials go only to upstreams that take them (`client_credentials`), and are never stored.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from urllib.parse import parse_qsl

import httpx

from mirror import errors
from mirror.identity import ANONYMOUS_TOKEN, Identities, auth_user, basic_auth
from mirror.upstream import Challenge, UpstreamClient

ANONYMOUS_LIFETIME = 3600
OFFLINE_LIFETIME = 3600  # a token minted offline: no upstream said how long
MAX_FORM = 64 * 1024


def challenge_header(
    realm: str, client: UpstreamClient, scope: str = "", upstream_repo: str = ""
) -> str:
    """The WWW-Authenticate we answer with: ours, or (passthrough) the upstream's."""
    upstream = client.challenge
    if client.upstream.auth_passthrough and upstream is not None:
        scope = f"repository:{upstream_repo}:pull" if upstream_repo else ""
        return Challenge(upstream.scheme, upstream.realm, upstream.service, scope).header()
    return Challenge("Bearer", realm, client.name, scope).header()


def upstream_scopes(client: UpstreamClient, scopes: list[str]) -> list[str]:
    """Client-side scopes (maybe with our `<upstream>/` prefix) in the upstream's names."""
    out = []
    for scope in scopes:
        kind, sep, rest = scope.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if kind != "repository" or not sep or not sep2:
            out.append(scope)
            continue
        out.append(f"repository:{client.upstream.repository(name)}:{actions}")
    return out


class TokenEndpoint:
    def __init__(self, clients: Mapping[str, UpstreamClient], identities: Identities) -> None:
        self.clients = clients
        self.default = next(iter(clients.values()))
        self.identities = identities

    async def issue(
        self,
        service: str | None,
        scopes: list[str],
        basic: httpx.BasicAuth | None,
        account: str | None = None,
    ) -> dict[str, object]:
        client = self.clients.get(service or "", self.default)
        if basic is None:
            return self._answer(ANONYMOUS_TOKEN, ANONYMOUS_LIFETIME)
        if not client.client_credentials:
            raise errors.Unauthorized(
                f"upstream {client.name} does not take client credentials through this "
                "mirror; pull anonymously")
        identities = await self.identities.ready()
        identity = identities.of_basic(client.name, basic)
        user = auth_user(basic)
        if client.offline:
            token = identities.mint(client.name, identity, user, "", OFFLINE_LIFETIME,
                                         offline=True)
            return self._answer(token, OFFLINE_LIFETIME)
        challenge = await client.discover_challenge()
        upstream_token, basic_header, lifetime = "", "", float(ANONYMOUS_LIFETIME)
        if challenge is not None and challenge.scheme == "Bearer":
            scope = " ".join(upstream_scopes(client, scopes))
            upstream_token, lifetime = await client.tokens.get_with_lifetime(
                challenge, scope, basic, account)
        elif challenge is not None and challenge.scheme == "Basic":
            basic_header = basic._auth_header  # the upstream takes Basic: pass it on
        token = identities.mint(client.name, identity, user, upstream_token, lifetime,
                                     basic=basic_header)
        return self._answer(token, lifetime)

    @staticmethod
    def _answer(token: str, lifetime: float) -> dict[str, object]:
        issued = datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"token": token, "access_token": token, "expires_in": int(lifetime),
                "issued_at": issued}


async def read_form(body: AsyncIterator[bytes]) -> dict[str, str]:
    """A token request's form, refused past MAX_FORM bytes without reading further."""
    data = bytearray()
    async for chunk in body:
        data += chunk
        if len(data) > MAX_FORM:
            raise errors.SizeInvalid("token request form too large")
    return dict(parse_qsl(data.decode(errors="replace")))


def credentials_from_form(form: Mapping[str, str]) -> httpx.BasicAuth | None:
    """The OAuth2 password grant (containerd): username and password in the form."""
    grant = form.get("grant_type", "")
    if grant == "password" and form.get("username"):
        user, password = form["username"], form.get("password", "")
        if ":" in user or not (user.isprintable() and password.isprintable()):
            raise errors.Unauthorized("malformed credentials")
        return httpx.BasicAuth(user, password)
    if grant in ("", "password"):
        return None
    raise errors.Unsupported(f"grant_type {grant[:40]!r} is not supported; use password")


def credentials_from_header(authorization: str | None) -> httpx.BasicAuth | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    return basic_auth(value.strip())
