"""Fills in a cluster (`mirror.cluster`): which other replica's download a read may follow.
The claims live in the SQLite metadata store here, as the same records Redis keeps."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from mirror.cluster import Claim, Cluster, PeerReader
from mirror.fills import Fills
from mirror.metadata import SqliteMetadata
from mirror.reference import Digest
from mirror.store import Store


class Followed(Exception):
    pass


def body(data: bytes) -> httpx.Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield data

    return httpx.Response(200, headers={"content-length": str(len(data))}, content=chunks())


def test_a_read_not_from_the_cache_never_follows_another_upstreams_download(
    store: Store, metadata: SqliteMetadata
) -> None:
    """Rule 1 of `mirror.access` across replicas: a read through an upstream that does not
    hold the digest (`cached` False) follows only a download from that same upstream; a
    download another replica runs from another upstream is not its bytes to serve."""
    data = os.urandom(4096)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())

    async def secret() -> bytes:
        return b"k" * 32

    async def scenario() -> None:
        other = Cluster(metadata, "http://other.invalid:1", 30.0, secret)
        claim = await other.claim(digest, "fake")  # another replica fetches it from fake
        assert isinstance(claim, Claim)
        fills = Fills(store)
        fills.cluster = Cluster(metadata, "http://me.invalid:1", 30.0, secret)
        followed: list[str] = []

        async def follow(owner: str, wanted: Digest) -> PeerReader:
            followed.append(owner)
            raise Followed

        fills.cluster.follow = follow  # type: ignore[method-assign,assignment]
        fetched: list[str] = []

        def fetch_from(upstream: str) -> Callable[[int], Awaitable[httpx.Response]]:
            async def fetch(offset: int = 0) -> httpx.Response:
                fetched.append(upstream)
                return body(data)
            return fetch

        # The same upstream's download is shared, as before.
        with pytest.raises(Followed):
            await fills.open(digest, fetch_from("fake"), "fake", cached=False)
        assert followed == ["http://other.invalid:1"] and not fetched
        # Another upstream's is not: this read gets a download of its own.
        reader = await fills.open(digest, fetch_from("evil"), "evil", cached=False)
        got = b"".join([bytes(c) async for c in reader.chunks(0, None)])
        assert got == data and fetched == ["evil"] and len(followed) == 1
        await claim.release()
        await fills.aclose()

    asyncio.run(scenario())
