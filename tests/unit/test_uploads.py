"""The pieces of the push path that need no server: header parsing, body checks, whom a
session belongs to, and where upload URLs may point."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.requests import ClientDisconnect

from mirror import errors
from mirror.uploads import ClientGone, client_body


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
