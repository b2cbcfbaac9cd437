"""The on-disk store's fill locks and partial cleanup, and in-process single flight."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from mirror.flight import SingleFlight, exclusive
from mirror.locks import FillLock, lock_is_held
from mirror.reference import Digest
from mirror.store import Store


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


# -- FillLock -------------------------------------------------------------------------------


def test_fill_lock_is_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first, second = FillLock(path), FillLock(path)
    assert first.acquire()
    try:
        assert not second.acquire()
        assert second.fd is None
        assert not second.acquire()  # still refused, and no fd leaked
    finally:
        first.release()
    assert second.acquire()
    second.release()


def test_release_unlinks_the_lock_file(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = FillLock(path)
    assert lock.acquire()
    assert path.exists()
    lock.release()
    assert not path.exists()
    assert lock.fd is None
    lock.release()  # idempotent


def test_release_without_remove_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = FillLock(path)
    assert lock.acquire()
    lock.release(remove=False)
    assert path.exists()
    assert not lock_is_held(path)
    assert FillLock(path).acquire()


def test_release_without_acquire_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    path.write_text("")
    FillLock(path).release()
    assert path.exists()


def test_lock_is_held(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    assert not lock_is_held(path)
    assert not path.exists()  # never creates the file
    lock = FillLock(path)
    assert lock.acquire()
    assert lock_is_held(path)
    assert lock_is_held(path)  # checking does not steal or drop the lock
    assert not FillLock(path).acquire()
    lock.release()
    assert not lock_is_held(path)
    assert not path.exists()


def test_lock_is_held_false_for_a_leftover_unlocked_file(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    path.write_text("")
    assert not lock_is_held(path)
    assert path.exists()


def test_lock_on_an_unlinked_file_does_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the holder unlinks the file between our open and our flock, acquire starts over."""
    path = tmp_path / "x.lock"
    real_flock = fcntl.flock
    calls: list[int] = []

    def racing_flock(fd: int, operation: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            path.unlink()  # the previous holder finishes right now
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", racing_flock)
    lock = FillLock(path)
    assert lock.acquire()
    monkeypatch.undo()
    assert len(calls) == 2
    assert path.exists()
    assert lock_is_held(path)
    lock.release()


def test_exclusive_takes_a_free_lock(store: Store) -> None:
    async def run() -> None:
        lock = await exclusive(store, "name", timeout=1)
        assert lock is not None
        assert lock_is_held(store.locks / "name.lock")
        lock.release()

    asyncio.run(run())


def test_exclusive_waits_for_the_holder_and_returns_none(store: Store) -> None:
    holder = FillLock(store.locks / "name.lock")
    assert holder.acquire()

    async def run() -> FillLock | None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, holder.release)
        return await exclusive(store, "name", timeout=5)

    assert asyncio.run(run()) is None


# -- Store ----------------------------------------------------------------------------------


def test_store_layout_and_write(store: Store) -> None:
    data = b"hello"
    digest = _digest(data)

    async def run() -> None:
        assert store.size(digest) is None
        assert not store.has(digest)
        assert await store.read(digest) is None
        await store.write(digest, data, "up")
        assert store.path(digest) == store.blobs / "sha256" / digest.hex[:2] / digest.hex
        assert await store.read(digest) == data
        assert store.size(digest) == 5
        assert await store.metadata.totals() == (5, 1)
        assert await store.metadata.holds("up", str(digest))
        assert list(store.tmp.iterdir()) == []
        await store.remove(digest)
        assert not store.has(digest)
        assert await store.metadata.totals() == (0, 0)
        await store.remove(digest)  # already gone: fine

    asyncio.run(run())


def test_commit_keeps_the_inode(store: Store) -> None:
    digest = _digest(b"abc")
    part = store.partial_path(digest)
    part.write_bytes(b"abc")
    inode = part.stat().st_ino
    final = asyncio.run(store.commit(digest, part, None))
    assert final.stat().st_ino == inode
    assert not part.exists()


def test_a_damaged_file_reads_as_a_miss_and_is_removed(store: Store) -> None:
    """A truncated blob or an emptied manifest is never served with its short length."""
    data = b"x" * 1000
    digest = _digest(data)

    async def run() -> None:
        await store.write(digest, data, "up")
        store.path(digest).write_bytes(data[:10])  # truncated behind our back
        assert await store.open(digest) is None
        assert not store.has(digest)
        assert await store.metadata.content(str(digest)) is None
        await store.write(digest, data, "up")
        store.path(digest).write_bytes(b"")  # emptied
        assert await store.read(digest) is None
        assert not store.has(digest)

    asyncio.run(run())


def test_a_file_without_a_record_reads_as_a_miss_but_stays(store: Store) -> None:
    digest = _digest(b"stray")
    store.path(digest).parent.mkdir(parents=True, exist_ok=True)
    store.path(digest).write_bytes(b"stray")
    assert asyncio.run(store.open(digest)) is None
    assert store.has(digest)  # a fill will commit over it and record it


# -- cleanup_partials -----------------------------------------------------------------------


def test_cleanup_removes_orphan_partials(store: Store) -> None:
    orphan = _digest(b"orphan")
    store.partial_path(orphan).write_bytes(b"orp")
    store.size_path(orphan).write_text("6")
    assert store.cleanup_partials() == 2
    assert list(store.tmp.iterdir()) == []
    assert list(store.locks.iterdir()) == []  # the locks it took are gone too


def test_cleanup_keeps_partials_whose_lock_is_held(store: Store) -> None:
    live, orphan = _digest(b"live"), _digest(b"orphan")
    for digest in (live, orphan):
        store.partial_path(digest).write_bytes(b"...")
    lock = FillLock(store.lock_path(live))
    assert lock.acquire()
    try:
        assert store.cleanup_partials() == 1
        assert store.partial_path(live).exists()
        assert not store.partial_path(orphan).exists()
        assert lock_is_held(store.lock_path(live))
    finally:
        lock.release()
    assert store.cleanup_partials() == 1
    assert not store.partial_path(live).exists()


def test_cleanup_with_nothing_to_do(store: Store) -> None:
    assert store.cleanup_partials() == 0


def test_cleanup_leaves_committed_content(store: Store) -> None:
    digest = _digest(b"kept")
    asyncio.run(store.write(digest, b"kept", None))
    store.partial_path(digest).write_bytes(b"ke")
    assert store.cleanup_partials() == 1
    assert asyncio.run(store.read(digest)) == b"kept"


# -- SingleFlight ---------------------------------------------------------------------------


def test_single_flight_runs_once_for_concurrent_callers() -> None:
    flight = SingleFlight()
    runs = 0

    async def work() -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        return "value"

    async def run() -> list[str]:
        return await asyncio.gather(*(flight.do("key", work) for _ in range(10)))

    assert asyncio.run(run()) == ["value"] * 10
    assert runs == 1
    assert flight._pending == {}


def test_single_flight_propagates_an_exception_to_all() -> None:
    flight = SingleFlight()
    runs = 0

    class Boom(Exception):
        pass

    async def work() -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        raise Boom("boom")

    async def run() -> list[object]:
        return await asyncio.gather(*(flight.do("key", work) for _ in range(10)),
                                    return_exceptions=True)

    results = asyncio.run(run())
    assert runs == 1
    assert len(results) == 10
    assert all(isinstance(r, Boom) for r in results)
    assert flight._pending == {}


def test_single_flight_keys_are_separate_and_not_cached() -> None:
    flight = SingleFlight()
    calls: list[str] = []

    def work_for(key: str) -> Callable[[], Awaitable[str]]:
        async def work() -> str:
            calls.append(key)
            await asyncio.sleep(0.01)
            return key.upper()
        return work

    async def run() -> list[str]:
        together = await asyncio.gather(
            flight.do("a", work_for("a")), flight.do("b", work_for("b")),
            flight.do("a", work_for("a")))
        later = await flight.do("a", work_for("a"))  # finished flights are not a cache
        return [*together, later]

    assert asyncio.run(run()) == ["A", "B", "A", "A"]
    assert sorted(calls) == ["a", "a", "b"]
