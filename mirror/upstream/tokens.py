"""Bearer token auth towards upstreams (Docker registry token spec).

A challenge `WWW-Authenticate: Bearer realm=...,service=...,scope=...` names where to get a
token; tokens are cached per (realm, service, scope, account) until shortly before expiry.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

import cachetools
import httpx

from mirror.errors import Unauthorized, UpstreamError, UpstreamTimeout
from mirror.flight import SingleFlight
from mirror.metrics import Metrics

# Refresh this long before a token expires, so it never dies in flight.
EXPIRY_MARGIN = 10.0
DEFAULT_EXPIRES_IN = 60.0
_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    scheme: str
    realm: str = ""
    service: str = ""
    scope: str = ""

    def header(self) -> str:
        params = [f'realm="{self.realm}"', f'service="{self.service}"']
        if self.scope:
            params.append(f'scope="{self.scope}"')
        return f"{self.scheme} " + ",".join(params)


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _PARAM.finditer(rest)}
    return Challenge(scheme.capitalize(), params.get("realm", ""), params.get("service", ""),
                     params.get("scope", ""))


def repository_scope(repo: str, actions: str = "pull") -> str:
    return f"repository:{repo}:{actions}"


@dataclass(frozen=True)
class Credential:
    """How to authenticate upstream on a client's behalf (kept in memory only).

    `bearer`: the client's own upstream token, forwarded as is; `basic`: the client's
    username and password, exchanged for tokens at the upstream's realm; neither: anonymous,
    without even the mirror's configured credentials (to learn what anyone may read).
    """

    bearer: str | None = None
    basic: httpx.BasicAuth | None = None


ANONYMOUS = Credential()


class TokenCache:
    """Fetches and caches tokens; one fetch at a time per key in this process."""

    def __init__(
        self, client: httpx.AsyncClient, upstream_name: str, metrics: Metrics | None = None,
        entries: int = 10_000,
    ) -> None:
        self._client = client
        self._name = upstream_name
        self._metrics = metrics
        # key -> (token, deadline); bounded: each distinct scope (repository) adds one.
        self._tokens: cachetools.LRUCache[tuple[str, ...], tuple[str, float]] = (
            cachetools.LRUCache(entries))
        self._flight = SingleFlight()
        self.fetched = 0  # tokens fetched, for tests and debugging

    async def get(
        self, challenge: Challenge, scope: str, auth: httpx.BasicAuth | None = None,
        account: str | None = None,
    ) -> str:
        """A token for `scope` (several scopes: space-separated)."""
        token, _ = await self.get_with_lifetime(challenge, scope, auth, account)
        return token

    async def get_with_lifetime(
        self, challenge: Challenge, scope: str, auth: httpx.BasicAuth | None = None,
        account: str | None = None,
    ) -> tuple[str, float]:
        """A token and the seconds it stays good for."""
        key = self._key(challenge, scope, auth)
        entry = self._tokens.get(key)
        now = time.monotonic()
        if entry and entry[1] > now:
            return entry[0], entry[1] - now

        async def fetch() -> tuple[str, float]:
            token, expires_in = await self._fetch(challenge, scope, auth, account)
            lifetime = max(expires_in - EXPIRY_MARGIN, 1.0)
            self._tokens[key] = (token, time.monotonic() + lifetime)
            return token, lifetime

        return await self._flight.do(key, fetch)

    def forget(self, challenge: Challenge, scope: str, auth: httpx.BasicAuth | None) -> None:
        """Drop a token the upstream refused (rotated keys, revoked), so the next get fetches."""
        self._tokens.pop(self._key(challenge, scope, auth), None)

    def _key(self, challenge: Challenge, scope: str, auth: object) -> tuple[str, ...]:
        account = getattr(auth, "_auth_header", "") if auth else ""
        # Keyed by a hash: the cache holds no password.
        digest = hashlib.sha256(str(account).encode()).hexdigest() if account else ""
        return (challenge.realm, challenge.service, scope, digest)

    async def _fetch(
        self, challenge: Challenge, scope: str, auth: httpx.BasicAuth | None,
        account: str | None = None,
    ) -> tuple[str, float]:
        params: list[tuple[str, str | int | float | bool | None]] = []
        if challenge.service:
            params.append(("service", challenge.service))
        params += [("scope", s) for s in scope.split()]
        if account:
            params.append(("account", account))
        try:
            response = await self._client.get(challenge.realm, params=params, auth=auth)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"token service of upstream {self._name} timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"token service of upstream {self._name} unreachable: {exc}") from exc
        if response.status_code in (401, 403):
            raise Unauthorized(
                f"upstream {self._name} refused the credentials for {scope or 'login'}")
        if response.status_code != 200:
            raise UpstreamError(
                f"token service of upstream {self._name} answered {response.status_code}")
        try:
            body = response.json()
            token = body.get("token") or body["access_token"]
            expires_in = float(body.get("expires_in") or DEFAULT_EXPIRES_IN)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError(
                f"token service of upstream {self._name} sent no token") from exc
        self.fetched += 1
        if self._metrics is not None:
            self._metrics.tokens.labels(self._name).inc()
        return str(token), expires_in
