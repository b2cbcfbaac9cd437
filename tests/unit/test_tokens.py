"""Bearer challenges and the token cache, against an in-memory token service."""

from __future__ import annotations

import asyncio
import json
import types
from collections.abc import Callable, Coroutine

import httpx
import pytest

from mirror.errors import Unauthorized, UpstreamError, UpstreamTimeout
from mirror.upstream import Challenge, TokenCache, parse_challenge, repository_scope, tokens

REALM = "https://auth.example/token"
CHALLENGE = Challenge("Bearer", REALM, "registry.example")
Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]

# -- parse_challenge ------------------------------------------------------------------------


def test_parse_quoted_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull"'
    )
    assert parse_challenge(header) == Challenge(
        "Bearer", "https://auth.docker.io/token", "registry.docker.io",
        "repository:library/nginx:pull")


def test_parse_unquoted_challenge_with_spaces() -> None:
    header = "bearer  realm=https://auth.example/token?x=1 , service=reg.example"
    assert parse_challenge(header) == Challenge(
        "Bearer", "https://auth.example/token?x=1", "reg.example", "")


def test_comma_inside_quotes_stays_in_the_value() -> None:
    header = 'Bearer realm="https://a/t",scope="repository:a/b:pull,push",service="s"'
    challenge = parse_challenge(header)
    assert challenge is not None
    assert challenge.scope == "repository:a/b:pull,push"
    assert challenge.service == "s"
    assert challenge.realm == "https://a/t"


def test_param_names_are_case_insensitive_and_unknown_ones_ignored() -> None:
    header = 'BEARER Realm="https://a/t", Service="s", error="insufficient_scope"'
    assert parse_challenge(header) == Challenge("Bearer", "https://a/t", "s", "")


def test_basic_challenge() -> None:
    assert parse_challenge('Basic realm="Registry Realm"') == Challenge("Basic", "Registry Realm")


@pytest.mark.parametrize("header", ["", "   "])
def test_empty_challenge(header: str) -> None:
    assert parse_challenge(header) is None


def test_scheme_only() -> None:
    assert parse_challenge("Bearer") == Challenge("Bearer")


def test_challenge_header_round_trips() -> None:
    challenge = Challenge("Bearer", "https://a/t", "s", "repository:a/b:pull,push")
    assert parse_challenge(challenge.header()) == challenge


def test_repository_scope() -> None:
    assert repository_scope("library/nginx") == "repository:library/nginx:pull"
    assert repository_scope("a/b", "pull,push") == "repository:a/b:pull,push"


# -- TokenCache -----------------------------------------------------------------------------


class TokenService:
    """Counts requests; answers `{"token": "tok<N>", ...}` unless told otherwise."""

    def __init__(self, body: object = None, status: int = 200, delay: float = 0.01) -> None:
        self.requests: list[httpx.Request] = []
        self.body = body
        self.status = status
        self.delay = delay

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        await asyncio.sleep(self.delay)  # let concurrent callers pile up
        body = self.body
        if body is None:
            body = {"token": f"tok{len(self.requests)}", "expires_in": 300}
        if isinstance(body, bytes):
            return httpx.Response(self.status, content=body)
        return httpx.Response(self.status, json=body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Fake time for `mirror.upstream.tokens` only (the event loop keeps its real clock)."""
    fake = Clock()
    monkeypatch.setattr(tokens, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


def _cache(service: Handler) -> TokenCache:
    return TokenCache(httpx.AsyncClient(transport=httpx.MockTransport(service)), "reg")


def test_concurrent_gets_share_one_fetch() -> None:
    service = TokenService()
    cache = _cache(service)

    async def run() -> list[str]:
        return await asyncio.gather(*(cache.get(CHALLENGE, "repository:a/b:pull")
                                      for _ in range(10)))

    results = asyncio.run(run())
    assert results == ["tok1"] * 10
    assert len(service.requests) == 1
    assert cache.fetched == 1
    request = service.requests[0]
    assert request.url.copy_with(query=None) == REALM
    assert dict(request.url.params) == {
        "service": "registry.example", "scope": "repository:a/b:pull"}


def test_concurrent_failure_reaches_every_caller() -> None:
    service = TokenService(status=500)
    cache = _cache(service)

    async def run() -> list[object]:
        return await asyncio.gather(
            *(cache.get(CHALLENGE, "repository:a/b:pull") for _ in range(10)),
            return_exceptions=True)

    results = asyncio.run(run())
    assert len(service.requests) == 1
    assert all(isinstance(r, UpstreamError) for r in results)
    assert not cache._flight._pending


def test_cached_until_shortly_before_expiry(clock: Clock) -> None:
    service = TokenService(body=None)
    cache = _cache(service)
    scope = "repository:a/b:pull"

    async def run() -> None:
        assert await cache.get(CHALLENGE, scope) == "tok1"
        clock.now += 300 - tokens.EXPIRY_MARGIN - 1
        assert await cache.get(CHALLENGE, scope) == "tok1"
        clock.now += 2  # within the margin before expires_in: refresh
        assert await cache.get(CHALLENGE, scope) == "tok2"
        assert await cache.get(CHALLENGE, scope) == "tok2"

    asyncio.run(run())
    assert len(service.requests) == 2


def test_missing_expires_in_defaults(clock: Clock) -> None:
    service = TokenService(body={"token": "abc"})
    cache = _cache(service)

    async def run() -> None:
        await cache.get(CHALLENGE, "s")
        clock.now += tokens.DEFAULT_EXPIRES_IN - tokens.EXPIRY_MARGIN - 1
        await cache.get(CHALLENGE, "s")
        assert len(service.requests) == 1
        clock.now += 2
        await cache.get(CHALLENGE, "s")
        assert len(service.requests) == 2

    asyncio.run(run())


def test_tiny_expires_in_still_caches_briefly(clock: Clock) -> None:
    service = TokenService(body={"token": "abc", "expires_in": 3})
    cache = _cache(service)

    async def run() -> None:
        await cache.get(CHALLENGE, "s")
        clock.now += 0.5
        await cache.get(CHALLENGE, "s")
        assert len(service.requests) == 1
        clock.now += 1
        await cache.get(CHALLENGE, "s")
        assert len(service.requests) == 2

    asyncio.run(run())


def test_separate_tokens_per_scope() -> None:
    service = TokenService()
    cache = _cache(service)

    async def run() -> list[str]:
        return [
            await cache.get(CHALLENGE, "repository:a/b:pull"),
            await cache.get(CHALLENGE, "repository:c/d:pull"),
            await cache.get(CHALLENGE, "repository:a/b:pull"),
            await cache.get(Challenge("Bearer", REALM, "other"), "repository:a/b:pull"),
        ]

    assert asyncio.run(run()) == ["tok1", "tok2", "tok1", "tok3"]
    assert [r.url.params["scope"] for r in service.requests] == [
        "repository:a/b:pull", "repository:c/d:pull", "repository:a/b:pull"]


def test_separate_tokens_per_account() -> None:
    service = TokenService()
    cache = _cache(service)
    alice = httpx.BasicAuth("alice", "pw")

    async def run() -> list[str]:
        return [
            await cache.get(CHALLENGE, "s"),
            await cache.get(CHALLENGE, "s", alice),
            await cache.get(CHALLENGE, "s", httpx.BasicAuth("alice", "pw")),
            await cache.get(CHALLENGE, "s", httpx.BasicAuth("bob", "pw")),
        ]

    assert asyncio.run(run()) == ["tok1", "tok2", "tok2", "tok3"]
    assert "authorization" not in service.requests[0].headers
    assert service.requests[1].headers["authorization"] == alice._auth_header


def test_no_scope_and_no_service_params() -> None:
    service = TokenService()
    cache = _cache(service)
    asyncio.run(cache.get(Challenge("Bearer", REALM), ""))
    assert dict(service.requests[0].url.params) == {}


def test_access_token_accepted() -> None:
    service = TokenService(body={"access_token": "oauth", "expires_in": 100})
    assert asyncio.run(_cache(service).get(CHALLENGE, "s")) == "oauth"


def test_token_preferred_over_access_token() -> None:
    service = TokenService(body={"token": "t", "access_token": "a"})
    assert asyncio.run(_cache(service).get(CHALLENGE, "s")) == "t"


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_unauthorized(status: int) -> None:
    service = TokenService(status=status, body={"details": "no"})
    with pytest.raises(Unauthorized) as info:
        asyncio.run(_cache(service).get(CHALLENGE, "repository:a/b:pull"))
    assert "reg" in info.value.message
    assert info.value.status == 401


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, {"token": "x"}),
        (404, {"token": "x"}),
        (200, b"not json"),
        (200, b""),
        (200, {"expires_in": 10}),
        (200, []),
        (200, "a string"),
        (200, {"token": "x", "expires_in": "soon"}),
    ],
)
def test_bad_answers_are_upstream_errors(status: int, body: object) -> None:
    service = TokenService(status=status, body=body)
    cache = _cache(service)
    with pytest.raises(UpstreamError) as info:
        asyncio.run(cache.get(CHALLENGE, "s"))
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    assert "reg" in info.value.message
    assert cache.fetched == 0


def test_failure_is_not_cached() -> None:
    answers = [httpx.Response(500), httpx.Response(200, json={"token": "ok"})]

    async def service(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    cache = _cache(service)

    async def run() -> str:
        with pytest.raises(UpstreamError):
            await cache.get(CHALLENGE, "s")
        return await cache.get(CHALLENGE, "s")

    assert asyncio.run(run()) == "ok"


def test_transport_errors() -> None:
    async def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(UpstreamError) as info:
        asyncio.run(_cache(unreachable).get(CHALLENGE, "s"))
    assert type(info.value) is UpstreamError
    assert "reg" in info.value.message
    with pytest.raises(UpstreamTimeout) as timeout:
        asyncio.run(_cache(slow).get(CHALLENGE, "s"))
    assert timeout.value.status == 504


def test_token_json_shape_sent_by_docker_hub() -> None:
    body = json.dumps({"token": "t", "access_token": "t", "expires_in": 300,
                       "issued_at": "2024-01-01T00:00:00Z"}).encode()
    service = TokenService(body=body)
    assert asyncio.run(_cache(service).get(CHALLENGE, "s")) == "t"
