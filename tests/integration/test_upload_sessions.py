"""Upload session records shared by several processes through the metadata store (SQLite
and Redis): each process is a `Sessions` with its own connection, the upstream a mock that
counts the cancels it gets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from mirror import upload_sessions
from mirror.metadata import Metadata, SqliteMetadata
from mirror.metadata.redis import RedisMetadata
from mirror.settings import Settings, Upstream
from mirror.store import Store
from mirror.upload_sessions import Session, Sessions, new_id
from mirror.upstream import UpstreamClient
from mirror.writethrough import WriteThrough

TIMEOUT = 10.0  # upload_timeout: a session started 100 s ago is long dead
New = Callable[[], Metadata]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "redis"])
def new(request: pytest.FixtureRequest, tmp_path: Path) -> New:
    """Makes (unopened) stores over one shared backend, emptied for the test."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return lambda: RedisMetadata(url)
    return lambda: SqliteMetadata(tmp_path / "metadata.db")


class Cancels:
    """An upstream that answers every request 202 and remembers the DELETEs."""

    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.upstream = Upstream("reg", "http://registry.example")

    def client(self) -> UpstreamClient:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.method == "DELETE":
                self.deleted.append(request.url.path)
            return httpx.Response(202)

        client = UpstreamClient(self.upstream, Settings(upstreams=(self.upstream,)))
        client.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        return client


@pytest.fixture
async def processes(new: New, tmp_path: Path) -> AsyncIterator[list[Sessions]]:
    """Three processes' view of upload sessions, over one metadata store."""
    stores = [new() for _ in range(3)]
    for store in stores:
        await store.open()
    yield [Sessions(store, WriteThrough(Store(tmp_path / f"cache-{n}", store)), TIMEOUT)
           for n, store in enumerate(stores)]
    for store in stores:
        await store.close()


def orphan(started: float) -> Session:
    session_id = new_id()
    return Session(session_id, "reg", "team/app",
                   f"http://registry.example/v2/team/app/blobs/uploads/{session_id}", started,
                   owner="alice")


@pytest.mark.anyio
async def test_a_session_saved_by_one_process_is_continued_by_another(
    processes: list[Sessions],
) -> None:
    one, two, _ = processes
    session = orphan(time.time())
    await one.save(session)
    loaded = await two.load(session.id)
    assert loaded == session
    moved = Session(**{**vars(session), "offset": 5, "location": session.location + "?n=1"})
    await two.save(moved)
    assert await one.load(session.id) == moved
    await one.drop(session.id)
    assert await two.load(session.id) is None


@pytest.mark.anyio
async def test_an_orphan_is_claimed_and_cancelled_by_one_process_only(
    processes: list[Sessions],
) -> None:
    cancels = Cancels()
    dead, alive = orphan(time.time() - 100), orphan(time.time())
    await processes[0].save(dead)
    await processes[0].save(alive)
    clients = [cancels.client() for _ in processes]
    try:
        await asyncio.gather(*(p.sweep({"reg": c}) for p, c in zip(processes, clients,
                                                                    strict=True)))
        await asyncio.gather(*(p.sweep({"reg": c}) for p, c in zip(processes, clients,
                                                                    strict=True)))
    finally:
        for client in clients:
            await client.http.aclose()
    assert cancels.deleted == [f"/v2/team/app/blobs/uploads/{dead.id}"]
    for process in processes:  # and its id still says why
        expired = await process.load(dead.id)
        assert expired is not None and expired.expired
        assert await process.load(alive.id) == alive


@pytest.mark.anyio
async def test_a_sweep_cancels_a_bounded_number_of_orphans(
    processes: list[Sessions], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upload_sessions, "ORPHANS_PER_SWEEP", 2)
    cancels = Cancels()
    for _ in range(5):
        await processes[0].save(orphan(time.time() - 100))
    client = cancels.client()
    try:
        swept = []
        for _ in range(4):
            before = len(cancels.deleted)
            await processes[1].sweep({"reg": client})
            swept.append(len(cancels.deleted) - before)
    finally:
        await client.http.aclose()
    assert swept == [2, 2, 1, 0]
