"""One upstream registry over HTTP.

Adds anonymous (or configured) bearer tokens on the upstream's challenge, which it learns
only from the upstream's own origin; follows redirects (`mirror.upstream.redirects`: a CDN
never gets our Authorization header); and turns transport failures into `RegistryError`s
that name the upstream. Connections are made as `mirror.upstream.transport` says.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

import httpx

from mirror import errors, ratelimit
from mirror.metrics import Metrics
from mirror.settings import Settings, Upstream
from mirror.upstream.downloader import Answer, Downloader
from mirror.upstream.redirects import MAX_REDIRECTS, REDIRECTS, follow, location, origin
from mirror.upstream.tokens import (
    Challenge,
    Credential,
    TokenCache,
    parse_challenge,
    repository_scope,
)
from mirror.upstream.transport import Transport


class _Answer(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def url(self) -> object: ...  # where the answer came from (after redirects)
    async def aclose(self) -> None: ...


_R = TypeVar("_R", bound=_Answer)


class UpstreamClient:
    def __init__(
        self, upstream: Upstream, settings: Settings, metrics: Metrics | None = None
    ) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.name = upstream.name
        self.origin = origin(upstream.url)
        # Clients' own credentials go to the default upstream unless an upstream says.
        self.client_credentials = (upstream.client_credentials
                                   if upstream.client_credentials is not None
                                   else upstream == settings.default_upstream)
        self.offline = settings.offline
        self.transport = Transport.for_upstream(
            upstream.url, upstream.connect_timeout or settings.connect_timeout,
            upstream.read_timeout or settings.read_timeout, ca_file=upstream.ca_file,
            client_cert=upstream.client_cert, client_key=upstream.client_key)
        self.http = self.transport.httpx_client()
        self.tokens = TokenCache(self.http, upstream.name, metrics,
                                 entries=settings.token_cache_entries)
        self.deadline = settings.upstream_deadline  # a whole request (body too) ends by it
        self.downloads = Downloader(upstream.name, self.transport, self.deadline)
        self.basic = (httpx.BasicAuth(upstream.username, upstream.password or "")
                      if upstream.username else None)
        # Learnt from the first 401: lets later requests carry a token at once.
        self.challenge: Challenge | None = None
        self.ratelimit = ratelimit.RateLimit.of(self.name, upstream.ratelimit_reserve,
                                                settings.ratelimit_reserve, metrics)

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.downloads.aclose()

    async def send(
        self,
        method: str,
        path: str,
        *,
        repo: str,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        credential: Credential | None = None,
        actions: str = "pull",
        content: AsyncIterator[bytes] | bytes | None = None,
        extra_scope: str = "",
    ) -> httpx.Response:
        """Send a request for `repo` (`path`: below the upstream's URL, or an absolute URL of
        the upstream), authenticating as the upstream asks.

        `credential` None: the mirror's own (configured, else anonymous) access; otherwise
        the client's. A streamed `content` cannot be sent twice, so the challenge is learnt
        first. With `stream=True` the caller owns the response and must `aclose()` it.
        """
        url = self._url(path)
        scope = " ".join(filter(None, (repository_scope(repo, actions), extra_scope)))
        once = content is not None and not isinstance(content, bytes)
        if once:
            await self.discover_challenge()

        async def attempt(request_headers: dict[str, str]) -> httpx.Response:
            return await self._send_following(
                method, url, request_headers, params, stream, content)

        if stream or once:  # the caller reads the body (and bounds it) / uploads pace it
            return await self._authenticated(attempt, headers, scope, credential, once)
        try:
            async with asyncio.timeout(self.deadline):
                return await self._authenticated(attempt, headers, scope, credential, once)
        except TimeoutError:
            raise errors.UpstreamTimeout(
                f"upstream {self.name} did not answer within {self.deadline:g} s") from None

    async def get_blob(
        self, path: str, *, repo: str, headers: dict[str, str],
        credential: Credential | None = None,
    ) -> Answer:
        """GET a blob, its body left for the fill to read (see `mirror.upstream.downloader`)."""
        url = self._url(path)
        started = time.perf_counter()

        async def attempt(request_headers: dict[str, str]) -> Answer:
            try:
                body = await self.downloads.get(url, request_headers, MAX_REDIRECTS)
            except errors.UpstreamTimeout:
                self._observe("timeout", started)
                raise
            except errors.UpstreamError:
                self._observe("error", started)
                raise
            self._observe(str(body.status_code), started)
            return body

        return await self._authenticated(
            attempt, headers, repository_scope(repo), credential, False)

    def _url(self, path: str) -> str:
        if self.offline:
            raise errors.Unavailable(f"offline mode: upstream {self.name} is not contacted")
        url = path if path.startswith(("http://", "https://")) else self.upstream.url + path
        if origin(url) != self.origin:
            raise errors.UpstreamError(f"upstream {self.name} pointed us at another host")
        return url

    async def _authenticated(
        self,
        attempt: Callable[[dict[str, str]], Awaitable[_R]],
        headers: dict[str, str] | None,
        scope: str,
        credential: Credential | None,
        once: bool,
    ) -> _R:
        """Send with our best authorization; on a challenge, learn it and send once more."""
        basic = self.basic if credential is None else credential.basic
        for tried in range(2):
            request_headers = dict(headers or {})
            auth = await self._authorization(scope, basic, credential)
            if auth:
                request_headers["Authorization"] = auth
            response = await attempt(request_headers)
            if (response.status_code != 401 or tried or once
                    or (credential and credential.bearer)):
                return response
            if origin(str(response.url)) != self.origin:
                # A redirect target (a CDN) answered: its challenge is not our upstream's,
                # and its realm must never receive our users' credentials.
                return response
            challenge = parse_challenge(response.headers.get("www-authenticate", ""))
            if challenge is None or challenge.scheme not in ("Bearer", "Basic"):
                return response
            if challenge.scheme == "Basic" and basic is None:
                return response
            await response.aclose()
            if auth and self.challenge and self.challenge.scheme == "Bearer":
                self.tokens.forget(self.challenge, scope, basic)  # refused: fetch anew
            self.challenge = Challenge(challenge.scheme, challenge.realm, challenge.service)
        raise AssertionError("unreachable")

    async def _authorization(
        self, scope: str, basic: httpx.BasicAuth | None, credential: Credential | None
    ) -> str | None:
        if credential is not None and credential.bearer:
            return f"Bearer {credential.bearer}"
        challenge = self.challenge
        if challenge is None:
            return None
        if challenge.scheme == "Basic":
            return basic._auth_header if basic else None
        token = await self.tokens.get(challenge, scope, basic)
        return f"Bearer {token}"

    async def discover_challenge(self) -> Challenge | None:
        """The upstream's auth challenge, from its `/v2/` ping if not yet known."""
        if self.challenge is None and not self.offline:
            response = await self._send_following("GET", self.upstream.url + "/v2/", {}, None,
                                                  False)
            if response.status_code == 401 and origin(str(response.url)) == self.origin:
                found = parse_challenge(response.headers.get("www-authenticate", ""))
                if found and found.scheme in ("Bearer", "Basic"):
                    self.challenge = Challenge(found.scheme, found.realm, found.service)
        return self.challenge

    async def _send_following(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        params: dict[str, str] | None,
        stream: bool,
        content: AsyncIterator[bytes] | bytes | None = None,
    ) -> httpx.Response:
        start = url
        for _ in range(MAX_REDIRECTS + 1):
            started = time.perf_counter()
            try:
                request = self.http.build_request(
                    method, url, headers=headers, params=params, content=content)
                response = await self.http.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                self._observe("timeout", started)
                raise errors.UpstreamTimeout(
                    f"upstream {self.name} ({self.upstream.url}) timed out") from exc
            except httpx.HTTPError as exc:
                self._observe("error", started)
                raise errors.UpstreamError(
                    f"upstream {self.name} ({self.upstream.url}) unreachable: "
                    f"{type(exc).__name__}: {exc}") from exc
            self._observe(str(response.status_code), started)
            self.ratelimit.observe(response.headers)
            try:
                target = location(response.headers.get_list("location"))
            except errors.UpstreamError:
                await response.aclose()
                raise
            if response.status_code not in REDIRECTS or not target:
                return response
            await response.aclose()
            if content is not None and not isinstance(content, bytes):
                return response  # a streamed body cannot follow a redirect
            url, headers = follow(start, str(response.url), target, headers)
            params = None
            if response.status_code == 303:
                method = "GET"
        raise errors.UpstreamError(f"upstream {self.name} redirected too many times")

    def _observe(self, status: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.upstream_requests.labels(self.name, status).inc()
            self.metrics.upstream_seconds.labels(self.name).observe(
                time.perf_counter() - started)
