"""The SQLite store's checkpoints run on a thread of its own, not in a write on the caller's
(the event loop's) thread: a checkpoint fsyncs the database, tens of milliseconds on a big
one, which would stall every request of the process (tests/bench/metadata.py). A commit
checkpoints itself only past the WAL's bound, so the WAL stays bounded under any load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirror.metadata import sqlite_db
from mirror.metadata.base import TagRecord
from mirror.metadata.sqlite import SqliteMetadata

ACCEPT = ("application/vnd.oci.image.index.v1+json",
          "application/vnd.oci.image.manifest.v1+json")


async def write_tags(meta: SqliteMetadata, first: int, count: int) -> None:
    for n in range(first, first + count):
        await meta.set_tag(TagRecord("docker.io", f"team/app{n % 7}", f"v{n}",
                                     f"sha256:{n:064x}", ACCEPT[1], 100, float(n)), ACCEPT)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_writes_leave_checkpoints_to_the_stores_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_WRITES", 10**9)
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_INTERVAL", 3600.0)
    database = tmp_path / "metadata.db"
    meta = SqliteMetadata(database)
    meta.open_sync()
    try:
        assert meta.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == \
            sqlite_db.WAL_LIMIT_PAGES
        checkpointer = meta._checkpointer
        assert checkpointer is not None and checkpointer.checkpoints == 0
        size = database.stat().st_size
        # ~2,500 WAL pages: SQLite's own automatic checkpoint (at 1,000) would have copied
        # them into the database file within these writes; here they stay in the WAL (whose
        # bound is higher).
        asyncio.run(write_tags(meta, 0, 500))
        assert database.stat().st_size == size
        assert checkpointer.checkpoints == 0
        # Past the threshold, the store's thread checkpoints: the database file grows.
        monkeypatch.setattr(sqlite_db, "CHECKPOINT_WRITES", 1)
        asyncio.run(write_tags(meta, 500, 1))
        assert wait_for(lambda: database.stat().st_size > size)
        assert checkpointer.checkpoints >= 1
    finally:
        meta.close_sync()
    assert not checkpointer._thread.is_alive()
    assert not Path(f"{database}-wal").exists()  # the last connection checkpointed the rest
    reopened = SqliteMetadata(database)
    reopened.open_sync()
    try:
        assert asyncio.run(reopened.tag("docker.io", "team/app3", "v500", ACCEPT)) is not None
    finally:
        reopened.close_sync()


def test_a_checkpoint_follows_a_lone_write(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the write threshold, a checkpoint still comes within CHECKPOINT_INTERVAL."""
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_INTERVAL", 0.05)
    meta = SqliteMetadata(tmp_path / "metadata.db")
    meta.open_sync()
    try:
        checkpointer = meta._checkpointer
        assert checkpointer is not None
        assert wait_for(lambda: checkpointer.checkpoints >= 1)  # the one after opening
        done = checkpointer.checkpoints
        asyncio.run(write_tags(meta, 0, 1))
        assert wait_for(lambda: checkpointer.checkpoints > done)
        time.sleep(0.3)  # no writes since: no more checkpoints
        idle = checkpointer.checkpoints
        time.sleep(0.3)
        assert checkpointer.checkpoints == idle
    finally:
        meta.close_sync()


def test_the_wal_stays_bounded_when_the_thread_falls_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes that never let the thread's checkpoints catch up (here: no thread checkpoints
    at all) still keep the WAL within its bound: past it, a commit checkpoints and the WAL
    starts again from its beginning."""
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_WRITES", 10**9)
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_INTERVAL", 3600.0)
    monkeypatch.setattr(sqlite_db, "WAL_LIMIT_PAGES", 200)
    database = tmp_path / "metadata.db"
    meta = SqliteMetadata(database)
    meta.open_sync()
    try:
        asyncio.run(write_tags(meta, 0, 1000))  # ~5,000 WAL pages written in all
        page = meta.db.execute("PRAGMA page_size").fetchone()[0]
        wal = Path(f"{database}-wal").stat().st_size
        assert wal < 2 * 200 * (page + 24)
        assert database.stat().st_size > 200 * page  # what the commits checkpointed
    finally:
        meta.close_sync()
