"""The pieces of the push path that need no server: header parsing, body checks, and
where upload URLs may point."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.requests import ClientDisconnect

from mirror import errors
from mirror.settings import Settings, Upstream
from mirror.upload_bodies import ClientGone, client_body
from mirror.uploads import parse_content_range
from mirror.upstream import UpstreamClient


@pytest.mark.parametrize(("value", "span"), [
    ("0-0", (0, 0)), ("0-1048575", (0, 1048575)), ("5-9", (5, 9)),
    ("bytes 5-9/*", (5, 9)), (" 5-9 ", (5, 9)),
])
def test_content_ranges(value: str, span: tuple[int, int]) -> None:
    assert parse_content_range(value) == span


@pytest.mark.parametrize("value", [
    "\xb2-10", "0-\xb3", "\u0661-\u0662", "x", "", "-1-5", "5-2", "5-", "-5", "1-2-3",
    "9" * 19 + "-" + "9" * 19, "0-10;x",
])
def test_malformed_content_ranges_are_range_invalid(value: str) -> None:
    with pytest.raises(errors.RangeInvalid) as info:
        parse_content_range(value)
    assert info.value.status == 416


async def chunks(*parts: bytes, then: BaseException | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if then is not None:
        raise then


async def drain(body: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in body])


def test_a_body_is_checked_against_its_declared_length() -> None:
    def read(declared: int | None, *parts: bytes) -> bytes:
        return asyncio.run(drain(client_body(chunks(*parts), declared, 5,
                                             errors.ManifestInvalid)))

    assert read(6, b"abc", b"def") == b"abcdef"
    assert read(None, b"abc", b"", b"def") == b"abcdef"
    for declared, parts in ((5, (b"abc", b"def")), (7, (b"abc", b"def"))):
        with pytest.raises(errors.SizeInvalid):
            read(declared, *parts)


def test_a_client_hanging_up_or_going_silent_mid_body() -> None:
    with pytest.raises(ClientGone):
        asyncio.run(drain(client_body(chunks(b"ab", then=ClientDisconnect()), 10, 5,
                                      errors.ManifestInvalid)))

    async def silent() -> AsyncIterator[bytes]:
        yield b"ab"
        await asyncio.sleep(10)

    with pytest.raises(errors.ManifestInvalid) as info:
        asyncio.run(drain(client_body(silent(), 10, 0.05, errors.ManifestInvalid)))
    assert "after 2 of 10 bytes" in info.value.message


@pytest.mark.parametrize("url", [
    "http://evil.example/v2/a/blobs/uploads/1", "https://registry.example/v2/a/blobs/uploads/1",
    "http://registry.example:8080/v2/a/blobs/uploads/1",
    "http://registry.example@evil.example/v2/a/blobs/uploads/1",
])
def test_absolute_upload_urls_off_the_upstreams_origin_are_never_contacted(url: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202)

    upstream = Upstream("reg", "http://registry.example")
    client = UpstreamClient(upstream, Settings(upstreams=(upstream,)))
    client.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))

    async def send() -> None:
        try:
            await client.send("PATCH", url, repo="a", content=b"x", actions="pull,push")
        finally:
            await client.http.aclose()

    with pytest.raises(errors.UpstreamError, match="another host"):
        asyncio.run(send())
    assert seen == []
