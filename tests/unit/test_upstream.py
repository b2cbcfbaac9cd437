"""UpstreamClient.send (challenge, token, redirects, transport errors) and upstream_error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from mirror import errors
from mirror.settings import Settings, Upstream
from mirror.upstream import MAX_REDIRECTS, UpstreamClient, upstream_error

REGISTRY = "https://registry.example"
REALM = "https://auth.example/token"
UPSTREAM = Upstream("reg", REGISTRY)


class FakeRegistry:
    """A token-auth registry, its token service and a CDN, all in memory."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.tokens_issued = 0
        self.unauthorized = 0
        # path -> (status, headers) for authorised requests; default 200 "ok"
        self.routes: dict[str, tuple[int, dict[str, str]]] = {}

    def requests_to(self, host: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == host]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        host = request.url.host
        if host == "auth.example":
            self.tokens_issued += 1
            scope = request.url.params.get("scope", "")
            return httpx.Response(200, json={"token": f"T{self.tokens_issued}:{scope}"})
        if host == "cdn.example":
            return httpx.Response(200, content=b"from cdn")
        assert host == "registry.example"
        auth = request.headers.get("authorization", "")
        repo = request.url.path.split("/")[2] + "/" + request.url.path.split("/")[3]
        if not auth.startswith("Bearer T") or not auth.endswith(f"repository:{repo}:pull"):
            self.unauthorized += 1
            challenge = (f'Bearer realm="{REALM}",service="registry.example",'
                         f'scope="repository:{repo}:pull"')
            return httpx.Response(
                401, headers={"WWW-Authenticate": challenge},
                json={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
        status, headers = self.routes.get(request.url.path, (200, {}))
        return httpx.Response(status, headers=headers, content=b"ok")


def make_client(
    handler: Callable[[httpx.Request], httpx.Response], upstream: Upstream = UPSTREAM
) -> UpstreamClient:
    client = UpstreamClient(upstream, Settings(upstreams=(upstream,)))
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=False)
    client.http = http
    client.tokens._client = http
    return client


def test_challenge_then_anonymous_token_then_retry() -> None:
    registry = FakeRegistry()
    client = make_client(registry)

    async def run() -> httpx.Response:
        return await client.send("GET", "/v2/lib/x/manifests/latest", repo="lib/x",
                                 headers={"Accept": "application/json"})

    response = asyncio.run(run())
    assert response.status_code == 200
    assert response.content == b"ok"
    first, token, retry = registry.requests
    assert str(first.url) == f"{REGISTRY}/v2/lib/x/manifests/latest"
    assert "authorization" not in first.headers
    assert token.url.copy_with(query=None) == REALM
    assert dict(token.url.params) == {
        "service": "registry.example", "scope": "repository:lib/x:pull"}
    assert "authorization" not in token.headers  # anonymous
    assert retry.headers["authorization"] == "Bearer T1:repository:lib/x:pull"
    assert retry.headers["accept"] == "application/json"
    assert client.challenge is not None
    assert client.challenge.realm == REALM


def test_later_requests_carry_the_token_at_once() -> None:
    registry = FakeRegistry()
    client = make_client(registry)

    async def run() -> list[int]:
        statuses = []
        for path in ("/v2/lib/x/manifests/latest", "/v2/lib/x/manifests/1.0",
                     "/v2/lib/x/blobs/sha256:00"):
            response = await client.send("GET", path, repo="lib/x")
            statuses.append(response.status_code)
        return statuses

    assert asyncio.run(run()) == [200, 200, 200]
    assert registry.unauthorized == 1
    assert registry.tokens_issued == 1
    assert len(registry.requests) == 5


def test_another_repo_gets_its_own_token_without_a_401() -> None:
    registry = FakeRegistry()
    client = make_client(registry)

    async def run() -> None:
        await client.send("GET", "/v2/lib/x/manifests/latest", repo="lib/x")
        response = await client.send("GET", "/v2/lib/y/manifests/latest", repo="lib/y")
        assert response.status_code == 200

    asyncio.run(run())
    assert registry.unauthorized == 1
    assert registry.tokens_issued == 2
    assert registry.requests[-2].url.params["scope"] == "repository:lib/y:pull"


def test_second_401_is_returned_not_retried_forever() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.url.host == "auth.example":
            return httpx.Response(200, json={"token": "useless"})
        return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})

    client = make_client(handler)
    response = asyncio.run(client.send("GET", "/v2/a/b/manifests/x", repo="a/b"))
    assert response.status_code == 401
    assert len(calls) == 3


@pytest.mark.parametrize("header", [None, "", 'Negotiate realm="x"', 'Basic realm="x"'])
def test_401_without_usable_challenge_is_returned(header: str | None) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        headers = {"WWW-Authenticate": header} if header is not None else {}
        return httpx.Response(401, headers=headers)

    client = make_client(handler)
    response = asyncio.run(client.send("GET", "/v2/a/b/manifests/x", repo="a/b"))
    assert response.status_code == 401
    assert len(calls) == 1


def test_basic_challenge_with_configured_credentials() -> None:
    calls: list[httpx.Request] = []
    expected = httpx.BasicAuth("alice", "secret")._auth_header

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.headers.get("authorization") == expected:
            return httpx.Response(200)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    upstream = Upstream("reg", REGISTRY, username="alice", password="secret")
    client = make_client(handler, upstream)
    response = asyncio.run(client.send("GET", "/v2/a/b/manifests/x", repo="a/b"))
    assert response.status_code == 200
    assert len(calls) == 2


def test_configured_credentials_go_to_the_token_service() -> None:
    registry = FakeRegistry()
    upstream = Upstream("reg", REGISTRY, username="alice", password="secret")
    client = make_client(registry, upstream)
    asyncio.run(client.send("GET", "/v2/lib/x/manifests/latest", repo="lib/x"))
    (token,) = registry.requests_to("auth.example")
    assert token.headers["authorization"] == httpx.BasicAuth("alice", "secret")._auth_header
    # ... and never to the registry itself.
    for request in registry.requests_to("registry.example"):
        assert not request.headers.get("authorization", "").startswith("Basic")


def test_token_service_refusal_is_unauthorized() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return httpx.Response(401)
        return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})

    client = make_client(handler)
    with pytest.raises(errors.Unauthorized):
        asyncio.run(client.send("GET", "/v2/a/b/manifests/x", repo="a/b"))


# -- redirects ------------------------------------------------------------------------------


def test_redirect_to_another_host_drops_authorization() -> None:
    registry = FakeRegistry()
    registry.routes["/v2/lib/x/blobs/sha256:00"] = (
        307, {"Location": "https://cdn.example/blob?sig=abc"})
    client = make_client(registry)

    response = asyncio.run(client.send("GET", "/v2/lib/x/blobs/sha256:00", repo="lib/x"))
    assert response.status_code == 200
    assert response.content == b"from cdn"
    (cdn,) = registry.requests_to("cdn.example")
    assert "authorization" not in cdn.headers
    assert cdn.url.params["sig"] == "abc"
    authorised = registry.requests_to("registry.example")[-1]
    assert authorised.headers["authorization"].startswith("Bearer ")


def test_redirect_on_the_same_host_keeps_authorization() -> None:
    registry = FakeRegistry()
    registry.routes["/v2/lib/x/blobs/sha256:00"] = (307, {"Location": "/v2/lib/x/blobs/moved"})
    client = make_client(registry)

    response = asyncio.run(client.send("GET", "/v2/lib/x/blobs/sha256:00", repo="lib/x"))
    assert response.status_code == 200
    assert response.content == b"ok"
    last = registry.requests[-1]
    assert last.url.path == "/v2/lib/x/blobs/moved"
    assert last.headers["authorization"].startswith("Bearer ")
    assert registry.unauthorized == 1


def test_redirect_drops_params_and_303_becomes_get() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "cdn.example":
            return httpx.Response(200)
        return httpx.Response(303, headers={"Location": "https://cdn.example/x"})

    client = make_client(handler)
    response = asyncio.run(client.send("HEAD", "/v2/a/b/blobs/x", repo="a/b", params={"n": "1"}))
    assert response.status_code == 200
    assert seen[0].method == "HEAD"
    assert seen[0].url.params["n"] == "1"
    assert seen[1].method == "GET"
    assert "n" not in seen[1].url.params


def test_redirect_without_location_is_returned() -> None:
    client = make_client(lambda request: httpx.Response(302))
    assert asyncio.run(client.send("GET", "/v2/a/b/blobs/x", repo="a/b")).status_code == 302


def test_too_many_redirects() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(302, headers={"Location": f"/loop/{len(calls)}"})

    client = make_client(handler)
    with pytest.raises(errors.UpstreamError) as info:
        asyncio.run(client.send("GET", "/v2/a/b/blobs/x", repo="a/b"))
    assert "reg" in info.value.message
    assert len(calls) == MAX_REDIRECTS + 1


def test_streamed_response_can_be_read() -> None:
    client = make_client(lambda request: httpx.Response(200, content=b"x" * 1000))

    async def run() -> bytes:
        response = await client.send("GET", "/v2/a/b/blobs/x", repo="a/b", stream=True)
        try:
            return await response.aread()
        finally:
            await response.aclose()

    assert asyncio.run(run()) == b"x" * 1000


# -- transport failures ---------------------------------------------------------------------


def test_connection_error_names_the_upstream() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = make_client(handler)
    with pytest.raises(errors.UpstreamError) as info:
        asyncio.run(client.send("GET", "/v2/a/b/manifests/x", repo="a/b"))
    assert type(info.value) is errors.UpstreamError
    assert info.value.status == 502
    assert "reg" in info.value.message
    assert REGISTRY in info.value.message
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize("exc", [httpx.ReadTimeout, httpx.ConnectTimeout, httpx.PoolTimeout])
def test_timeout_is_upstream_timeout(exc: type[httpx.TimeoutException]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("too slow", request=request)

    client = make_client(handler)
    with pytest.raises(errors.UpstreamTimeout) as info:
        asyncio.run(client.send("GET", "/v2/a/b/manifests/x", repo="a/b"))
    assert info.value.status == 504
    assert info.value.code in errors.SPEC_CODES
    assert "reg" in info.value.message


def test_client_timeouts_come_from_settings() -> None:
    settings = Settings(upstreams=(UPSTREAM,), connect_timeout=3.0, read_timeout=7.0)
    client = UpstreamClient(UPSTREAM, settings)
    timeout = client.http.timeout
    assert (timeout.connect, timeout.read, timeout.pool) == (3.0, 7.0, 3.0)
    assert client.basic is None
    asyncio.run(client.aclose())


# -- upstream_error -------------------------------------------------------------------------


def _body(code: str, message: str = "") -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def test_404_with_blob_unknown_body() -> None:
    error = upstream_error(httpx.Response(404), "reg", errors.ManifestUnknown, "blob x",
                           _body("BLOB_UNKNOWN", "blob unknown to registry"))
    assert type(error) is errors.BlobUnknown
    assert error.message == "blob unknown to registry"
    assert error.status == 404


def test_404_without_body_uses_the_callers_class() -> None:
    error = upstream_error(httpx.Response(404), "reg", errors.ManifestUnknown, "manifest a:b")
    assert type(error) is errors.ManifestUnknown
    assert "manifest a:b" in error.message
    assert "reg" in error.message


@pytest.mark.parametrize(
    "body", [b"not json", b"{}", b'{"errors": []}', _body("DENIED"), _body("WHATEVER")])
def test_404_with_odd_body_uses_the_callers_class(body: bytes) -> None:
    error = upstream_error(httpx.Response(404), "reg", errors.BlobUnknown, "blob x", body)
    assert type(error) is errors.BlobUnknown
    assert error.status == 404


def test_429_keeps_retry_after() -> None:
    response = httpx.Response(429, headers={"Retry-After": "30"})
    error = upstream_error(response, "reg", errors.BlobUnknown, "blob x",
                           _body("TOOMANYREQUESTS"))
    assert type(error) is errors.TooManyRequests
    assert error.status == 429
    assert error.headers == {"Retry-After": "30"}
    plain = upstream_error(httpx.Response(429), "reg", errors.BlobUnknown, "blob x")
    assert type(plain) is errors.TooManyRequests
    assert plain.headers == {}


@pytest.mark.parametrize(
    ("status", "cls"), [(401, errors.Unauthorized), (403, errors.Denied)])
def test_auth_statuses(status: int, cls: type[errors.RegistryError]) -> None:
    error = upstream_error(httpx.Response(status), "reg", errors.BlobUnknown, "blob x",
                           _body("NAME_UNKNOWN"))
    assert type(error) is cls
    assert error.status == status
    assert "reg" in error.message


def test_4xx_with_known_code_passes_it_on() -> None:
    error = upstream_error(httpx.Response(400), "reg", errors.ManifestUnknown, "manifest",
                           _body("MANIFEST_INVALID", "bad manifest"))
    assert type(error) is errors.ManifestInvalid
    assert error.message == "bad manifest"


def test_an_unavailable_upstream_is_passed_on_as_503_with_retry_after() -> None:
    error = upstream_error(httpx.Response(503, headers={"Retry-After": "7"}), "reg",
                           errors.BlobUnknown, "blob x", b"")
    assert type(error) is errors.Unavailable
    assert error.status == 503
    assert error.headers == {"Retry-After": "7"}
    assert "reg" in error.message


@pytest.mark.parametrize("status", [500, 502, 504])
def test_other_5xx_are_upstream_errors(status: int) -> None:
    error = upstream_error(httpx.Response(status), "reg", errors.BlobUnknown, "blob x",
                           b"oops")
    assert type(error) is errors.UpstreamError
    assert error.status == 502
    assert str(status) in error.message
    assert "reg" in error.message


@pytest.mark.parametrize(("status", "asked", "code"), [
    (400, errors.ManifestUnknown, "MANIFEST_INVALID"), (418, errors.BlobUnknown, "BLOB_UNKNOWN"),
    (409, errors.NameUnknown, "NAME_INVALID")])
def test_other_4xx_are_passed_on_with_their_status(
    status: int, asked: type[errors.RegistryError], code: str
) -> None:
    """An upstream's answer is the answer, the same whether the cache is cold or warm."""
    error = upstream_error(httpx.Response(status), "reg", asked, "x", b"oops")
    assert (error.status, error.code) == (status, code)
    assert code in errors.SPEC_CODES and "reg" in error.message


def test_500_with_a_registry_code_is_still_an_upstream_error() -> None:
    error = upstream_error(httpx.Response(500), "reg", errors.BlobUnknown, "blob x",
                           _body("BLOB_UNKNOWN"))
    assert type(error) is errors.UpstreamError


# -- findings -------------------------------------------------------------------------------


def test_rejected_cached_token_is_replaced_on_the_retry() -> None:
    # BUG (mirror/upstream.py, UpstreamClient.send): after a 401 answered to a request that
    # already carried a cached token, the retry asks TokenCache.get again, which returns the
    # very same (rejected) token, so the client gets the 401 until the token's expiry.
    issued: list[str] = []
    rejected: set[str] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            issued.append(f"T{len(issued) + 1}")
            return httpx.Response(200, json={"token": issued[-1], "expires_in": 300})
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth.removeprefix("Bearer ") in rejected:
            return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})
        return httpx.Response(200)

    client = make_client(handler)

    async def run() -> int:
        first = await client.send("GET", "/v2/a/b/manifests/x", repo="a/b")
        assert first.status_code == 200
        rejected.add("T1")  # e.g. the upstream rotated its signing key
        second = await client.send("GET", "/v2/a/b/manifests/x", repo="a/b")
        return second.status_code

    status = asyncio.run(run())
    assert issued[-1] != "T1", "the retry after a 401 reused the rejected cached token"
    assert status == 200


def test_https_to_http_redirect_drops_authorization() -> None:
    # BUG (mirror/upstream.py, _send_following): only the netloc is compared, so a redirect
    # from https://registry.example to http://registry.example keeps the Authorization header
    # (a bearer token, or Basic credentials) and sends it in clear text.
    registry = FakeRegistry()
    registry.routes["/v2/lib/x/blobs/sha256:00"] = (
        307, {"Location": "http://registry.example/v2/lib/x/blobs/plain"})
    client = make_client(registry)
    asyncio.run(client.send("GET", "/v2/lib/x/blobs/sha256:00", repo="lib/x"))
    last = registry.requests[-1]
    assert last.url.scheme == "http"
    assert "authorization" not in last.headers, "credentials sent over plain http"
