"""The mirror's side of the token protocol: challenges it sends, and its token endpoint.

Clients authenticate to the mirror as to any registry. Our challenge's realm is our own
`/token`; its `service` names the upstream. Without credentials the endpoint hands out an
anonymous token (good for public content). With credentials (Basic on GET, or the OAuth2
password form containerd POSTs) it exchanges them at the upstream's realm and returns the
upstream's token, which the client then sends with every request and we forward. Nothing
the client gave is stored beyond the in-memory token cache.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime

import httpx

from mirror import errors
from mirror.access import ANONYMOUS_TOKEN, basic_auth
from mirror.tokens import Challenge
from mirror.upstream import UpstreamClient

ANONYMOUS_LIFETIME = 3600


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
    def __init__(self, clients: Mapping[str, UpstreamClient]) -> None:
        self.clients = clients
        self.default = next(iter(clients.values()))

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
        challenge = await client.discover_challenge()
        if challenge is None or challenge.scheme != "Bearer":
            # The upstream takes no tokens: nothing to exchange credentials for.
            return self._answer(ANONYMOUS_TOKEN, ANONYMOUS_LIFETIME)
        scope = " ".join(upstream_scopes(client, scopes))
        token, lifetime = await client.tokens.get_with_lifetime(challenge, scope, basic, account)
        return self._answer(token, lifetime)

    @staticmethod
    def _answer(token: str, lifetime: float) -> dict[str, object]:
        issued = datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"token": token, "access_token": token, "expires_in": int(lifetime),
                "issued_at": issued}


def credentials_from_form(form: Mapping[str, str]) -> httpx.BasicAuth | None:
    """The OAuth2 password grant (containerd): username and password in the form."""
    grant = form.get("grant_type", "")
    if grant == "password" and form.get("username"):
        return httpx.BasicAuth(form["username"], form.get("password", ""))
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
