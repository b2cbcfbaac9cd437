"""The disk budget: the store's walk, batched recency, eviction passes and the evictor."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from mirror import evict
from mirror.evict import Evictor, default_budget, evict_once
from mirror.fills import Fills
from mirror.metadata import SqliteMetadata
from mirror.reference import Digest
from mirror.settings import SettingsError, load
from mirror.store import Store

T = TypeVar("T")


def put(store: Store, data: bytes, age: float = 0.0) -> Digest:
    """Commit `data`, last used `age` seconds ago (its record and mtime)."""
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    run(store.write(digest, data, "up"))
    at = time.time() - age
    os.utime(store.path(digest), (at, at))
    store.recency.pending.pop(str(digest), None)
    metadata = store.metadata
    assert isinstance(metadata, SqliteMetadata)
    metadata.db.execute("UPDATE content SET used = ? WHERE digest = ?", (at, str(digest)))
    return digest


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


def last_used(store: Store, digest: str) -> float | None:
    record = run(store.metadata.content(digest))
    return None if record is None else record.used


def test_entries_walks_content_and_reports_strays(store: Store) -> None:
    a = put(store, b"a" * 10)
    b = put(store, b"b" * 20)
    (store.blobs / "sha256" / "zz").mkdir()
    (store.blobs / "sha256" / "zz" / "junk").write_bytes(b"x")
    (store.blobs / "stray").write_bytes(b"y")
    found = {(e.digest, e.size) for e in store.entries()}
    assert (a, 10) in found and (b, 20) in found
    assert sum(1 for e in store.entries() if e.digest is None) == 2


def test_hits_are_batched_in_memory_and_flushed_without_going_back_in_time(
    store: Store,
) -> None:
    digest = str(put(store, b"1" * 10, age=1000))
    store.recency.touch(digest)
    assert time.time() - (last_used(store, digest) or 0) > 900  # a hit costs no write
    assert run(store.recency.last_used(digest)) is not None  # but eviction sees it
    assert run(store.recency.flush()) == 1
    recorded = last_used(store, digest)
    assert recorded is not None and time.time() - recorded < 60
    assert store.recency.pending == {}
    run(store.metadata.touch({digest: recorded - 100}))  # another worker's older hit
    assert last_used(store, digest) == recorded


def test_closing_the_store_flushes_pending_hits(store: Store) -> None:
    digest = str(put(store, b"2" * 10, age=1000))
    store.recency.touch(digest)
    run(store.close())
    assert time.time() - (last_used(store, digest) or 0) < 60


def test_a_pass_removes_the_least_recently_used_down_to_the_low_water_mark(
    store: Store,
) -> None:
    old = put(store, b"o" * 1000, age=300)
    older = put(store, b"p" * 1000, age=400)
    recent = put(store, b"r" * 1000, age=100)
    newest = put(store, b"n" * 1000, age=10)
    result = run(evict_once(store, budget=2500, grace=0))
    assert result is not None
    # 4000 > 2500: down to 0.9 * 2500 = 2250, oldest first: two go.
    assert (result.removed, result.freed, result.total) == (2, 2000, 2000)
    assert not store.has(older) and not store.has(old)
    assert store.has(recent) and store.has(newest)
    assert last_used(store, str(older)) is None  # forgotten with its content
    under = run(evict_once(store, budget=2500, grace=0))
    assert under is not None and under.removed == 0


def test_a_pass_never_removes_pinned_or_recently_used_content(store: Store) -> None:
    pinned = put(store, b"p" * 1000, age=1000)
    run(store.metadata.pin("test", [str(pinned)]))
    old = put(store, b"o" * 1000, age=500)
    fresh = put(store, b"f" * 1000, age=0)
    result = run(evict_once(store, budget=500, grace=60))
    assert result is not None
    assert store.has(pinned) and store.has(fresh) and not store.has(old)
    assert result.kept_recent and result.total == 2000  # over budget: in use, and pinned


def test_the_hits_of_this_process_count_before_they_are_flushed(store: Store) -> None:
    a = put(store, b"a" * 1000, age=500)
    b = put(store, b"b" * 1000, age=400)
    store.recency.touch(a)  # a hit, still pending: a is now the most recent
    result = run(evict_once(store, budget=1500, grace=0))
    assert result is not None and result.removed == 1
    assert store.has(a) and not store.has(b)


def test_one_process_evicts_at_a_time(store: Store) -> None:
    put(store, b"x" * 1000, age=500)
    assert run(store.metadata.acquire("evict", "another process", 60))
    assert run(evict_once(store, budget=10, grace=0)) is None
    run(store.metadata.release("evict", "another process"))
    assert run(evict_once(store, budget=10, grace=0)) is not None


def test_a_reader_keeps_every_byte_of_a_blob_evicted_under_it(store: Store) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = put(store, data, age=500)

    async def read_while_evicted() -> bytes:
        reader = await Fills(store)._committed(digest)
        assert reader is not None
        chunks = reader.chunks(0, None)
        got = [await chunks.__anext__()]
        assert await evict_once(store, budget=0, grace=0) is not None
        assert not store.path(digest).exists()  # unlinked: the descriptor still reads it
        got += [chunk async for chunk in chunks]
        return b"".join(got)

    assert asyncio.run(read_while_evicted()) == data


async def aput(store: Store, data: bytes, age: float = 0.0) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    await store.write(digest, data, "up")
    at = time.time() - age
    store.recency.pending.pop(str(digest), None)
    metadata = store.metadata
    assert isinstance(metadata, SqliteMetadata)
    metadata.db.execute("UPDATE content SET used = ? WHERE digest = ?", (at, str(digest)))
    return digest


def test_the_evictor_wakes_when_a_commit_passes_the_budget(store: Store) -> None:
    async def scenario() -> tuple[int, bool, bool]:
        evictor = Evictor(store, budget=2500, grace=0)
        store.on_commit = evictor.committed
        task = asyncio.create_task(evictor.run())
        try:
            await asyncio.sleep(0.2)  # the first pass: learns the usage
            first = await aput(store, b"1" * 1000, age=50)
            await aput(store, b"2" * 1000, age=40)
            assert evictor.used == 2000
            await aput(store, b"3" * 1000)  # 3000 > 2500: wakes the evictor at once
            for _ in range(100):  # the file goes mid-pass: wait for the pass to end too
                if not store.has(first) and evictor.passes >= 2:
                    break
                await asyncio.sleep(0.02)
            return evictor.used, store.has(first), evictor.passes >= 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    used, first_left, passes = asyncio.run(scenario())
    assert not first_left and passes and used == 2000


def test_the_default_budget_is_a_share_of_held_plus_free_space(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(store, b"x" * 4096)

    class Vfs:
        f_bavail, f_frsize = 1000, 4096

    monkeypatch.setattr(evict.os, "statvfs", lambda _path: Vfs())
    assert default_budget(store, 4096) == int(0.8 * (4096 + 1000 * 4096))


@pytest.mark.parametrize(("value", "expected"), [
    ("10GB", 10 * 10**9), ("512MiB", 512 * 2**20), ("1048576", 2**20), (4096, 4096)])
def test_max_cache_size_takes_bytes_or_units(value: Any, expected: int) -> None:
    assert load({"max_cache_size": value}, env={}).max_cache_size == expected
    assert load(env={"MIRROR_MAX_CACHE_SIZE": str(value)}).max_cache_size == expected


@pytest.mark.parametrize("value", ["lots", "-1GB", "10 parsecs", True])
def test_max_cache_size_rejects_what_is_no_size(value: Any) -> None:
    with pytest.raises(SettingsError, match="max_cache_size"):
        load({"max_cache_size": value}, env={})


def test_max_cache_size_defaults_to_a_share_of_the_disk() -> None:
    assert load(env={}).max_cache_size is None
