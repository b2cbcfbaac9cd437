"""A full disk during a fill: the in-memory relay, and `Fills` falling back to it."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from mirror import errors, relay
from mirror.fills import Fills
from mirror.identity import Identities
from mirror.manifests import accept_key
from mirror.reference import Digest
from mirror.relay import NoFollowers, Relay
from mirror.store import Store

KiB = 1024


@dataclass(eq=False)
class Follower:
    pos: int = 0
    dropped: bool = False


def test_the_relay_keeps_only_what_a_reader_still_needs() -> None:
    async def scenario() -> None:
        slow, fast = Follower(), Follower()
        followers = {slow, fast}
        r = Relay(100, followers, limit=3 * KiB, stall=5)
        for i in range(3):
            await r.put(bytes([i]) * KiB)
        assert r.end == 100 + 3 * KiB and r.held == 3 * KiB
        assert r.read(fast, 100 + KiB + 5, 10) == bytes([1]) * 10
        fast.pos = 100 + 3 * KiB
        r.moved()
        assert r.held == 3 * KiB  # the slow reader has not started: all is kept for it
        slow.pos = 100 + 2 * KiB
        r.moved()
        assert r.base == 100 + 2 * KiB and r.held == KiB
        with pytest.raises(errors.StreamAborted):
            r.read(slow, 100, 1)  # behind what is held

    asyncio.run(scenario())


def test_the_download_waits_for_the_slowest_reader_then_drops_it() -> None:
    async def scenario() -> None:
        slow, fast = Follower(), Follower()
        r = Relay(0, {slow, fast}, limit=2 * KiB, stall=0.3)
        await r.put(b"a" * KiB)
        await r.put(b"b" * KiB)
        await r.put(b"c" * KiB)  # at the limit: still fits (checked before appending)
        put = asyncio.create_task(r.put(b"d" * KiB))
        await asyncio.sleep(0.1)
        assert not put.done()  # backpressure
        slow.pos = fast.pos = KiB
        r.moved()
        await asyncio.sleep(0.05)
        assert put.done()
        fast.pos = 4 * KiB
        r.moved()
        started = asyncio.get_running_loop().time()
        await r.put(b"e" * KiB)  # the slow reader never moves: dropped after the stall
        assert asyncio.get_running_loop().time() - started >= 0.3
        assert slow.dropped and not fast.dropped
        with pytest.raises(errors.StreamAborted):
            r.read(slow, KiB, 1)

    asyncio.run(scenario())


def test_with_no_reader_left_the_relay_stops_the_download(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay, "ORPHAN_WAIT", 0.1)

    async def scenario() -> None:
        r = Relay(0, set(), limit=KiB)
        with pytest.raises(NoFollowers):
            await r.put(b"x")

    asyncio.run(scenario())


# -- Fills on a disk that fills up ------------------------------------------------------------


@pytest.fixture
def disk_room(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Partials (`*.part`) may take `room["bytes"]` bytes in all; then writes say ENOSPC."""
    room = {"bytes": 0}
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".part"):
            if room["bytes"] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = data[:room["bytes"]]
            room["bytes"] -= len(data)
        return real_write(fd, data)

    def writev(fd: int, buffers: list[bytes]) -> int:
        return write(fd, b"".join(buffers))

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "writev", writev)
    return room


def upstream_response(data: bytes, chunk: int = 64 * KiB) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), chunk):
            await asyncio.sleep(0)
            yield data[start:start + chunk]

    return httpx.Response(200, headers={"content-length": str(len(data))}, content=body())


@pytest.mark.parametrize("room", [0, 3 * 1024 * KiB + 123])
def test_a_fill_that_hits_a_full_disk_relays_every_byte_and_caches_nothing(
    store: Store, disk_room: dict[str, int], room: int
) -> None:
    disk_room["bytes"] = room
    data = os.urandom(12 * 1024 * KiB + 5)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    fetched = 0

    async def fetch(offset: int = 0) -> httpx.Response:
        nonlocal fetched
        fetched += 1
        return upstream_response(data)

    async def scenario() -> list[bytes]:
        fills = Fills(store)
        readers = [await fills.open(digest, fetch) for _ in range(3)]

        async def read(reader_index: int) -> bytes:
            parts = []
            async for chunk in readers[reader_index].chunks(0, None):
                parts.append(chunk)
                if reader_index == 0:
                    await asyncio.sleep(0.001)  # a slower reader
            return b"".join(parts)

        got = await asyncio.gather(*(read(i) for i in range(3)))
        await fills.aclose()
        return got

    for body in asyncio.run(scenario()):
        assert body == data
    assert fetched == 1  # one download, shared by the three readers
    assert not store.has(digest)
    assert list(store.tmp.iterdir()) == []  # partial and size file gone
    assert list(store.locks.iterdir()) == []


def test_after_a_relayed_fill_a_new_one_caches_when_there_is_room_again(
    store: Store, disk_room: dict[str, int]
) -> None:
    data = os.urandom(2 * 1024 * KiB)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())

    async def fetch(offset: int = 0) -> httpx.Response:
        return upstream_response(data)

    async def pull(fills: Fills) -> bytes:
        reader = await fills.open(digest, fetch)
        return b"".join([chunk async for chunk in reader.chunks(0, None)])

    async def scenario() -> None:
        fills = Fills(store)
        assert await pull(fills) == data  # relayed
        assert not store.has(digest)
        disk_room["bytes"] = 1 << 30
        assert await pull(fills) == data  # cached
        assert store.has(digest)
        await fills.aclose()

    asyncio.run(scenario())


# -- hostile header values (found by tests/integration/test_fuzz.py) --------------------------


def test_accept_keeps_only_media_types() -> None:
    assert accept_key(["caf\xe9, \xa1, application/JSON;q=1, */*, x/y z, ,"]) == (
        "*/*", "application/json")


def test_a_bearer_token_that_is_not_ascii_is_refused_not_forwarded() -> None:
    identities = Identities(lambda: asyncio.sleep(0, b"k" * 32))
    asyncio.run(identities.ready())
    with pytest.raises(errors.Unauthorized):
        identities.caller("Bearer caf\xe9", "up")
    assert identities.caller("Bearer abc.def-ghi", "up").credential is not None


def test_a_stalled_download_holds_disk_only_a_little_ahead_of_its_bytes(store: Store) -> None:
    """An upstream may announce a layer of any size up to the cap and then stall: the
    partial's blocks are reserved a bounded step ahead of what landed, never the whole
    announced size, so stalled downloads cannot take the disk from the others."""
    from mirror.datapath import RESERVE_AHEAD

    announced = 4 * RESERVE_AHEAD
    sent = 2 * 1024 * KiB
    digest = Digest("sha256", "0" * 64)
    stalled = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield os.urandom(sent)
        stalled.set()
        await asyncio.Event().wait()  # never more
        yield b""

    async def fetch(offset: int = 0) -> httpx.Response:
        return httpx.Response(200, headers={"content-length": str(announced)}, content=body())

    async def scenario() -> int:
        fills = Fills(store, max_size=announced)
        reader = await fills.open(digest, fetch)
        await asyncio.wait_for(stalled.wait(), 10)
        await asyncio.sleep(0.2)  # the bytes land
        (part,) = store.tmp.glob("*.part")
        blocks = os.stat(part).st_blocks * 512
        reader.close()
        await fills.aclose()
        return blocks

    held = asyncio.run(scenario())
    assert sent <= held <= sent + RESERVE_AHEAD + 1024 * KiB
