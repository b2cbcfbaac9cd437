"""Every statement the SQLite metadata store runs uses an index: each interface operation is
called (listings across several pages), every statement it ran is recorded, and SQLite's
own `EXPLAIN QUERY PLAN` of each must search an index (or the primary key), never scan a
table or sort one; so the cost of an operation follows what it touches, not the cache's size
(tests/bench/metadata.py measures that at scale)."""

from __future__ import annotations

import asyncio
import inspect
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.metadata import sqlite as sqlite_module
from mirror.metadata import sqlite_db
from mirror.metadata.base import Grant, Metadata, RefRecord, TagRecord
from mirror.metadata.sqlite import SqliteMetadata

ACCEPT = ("application/vnd.oci.image.index.v1+json",
          "application/vnd.oci.image.manifest.v1+json")
# Plan lines that scan, and why each is fine: a constant row, the recursive CTE's own queue
# (one row per upstream name), the single-row totals table, and the most pulled tags walked
# in the order of their index, which stops at LIMIT + OFFSET rows (the page the browser asks).
ALLOWED_SCANS = {"SCAN CONSTANT ROW", "SCAN names", "SCAN totals",
                 "SCAN pulls USING COVERING INDEX pulls_by_count"}


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


class Recording:
    """A connection that remembers every statement it runs."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.statements: set[str] = set()

    def _note(self, sql: str) -> None:
        self.statements.add(" ".join(sql.split()))

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        self._note(sql)
        return self.db.execute(sql, args)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self._note(sql)
        return self.db.executemany(sql, rows)

    def close(self) -> None:
        self.db.close()


async def exercise(meta: Metadata) -> set[str]:
    """Call every operation of the interface, with enough rows for listings to page."""
    called: set[str] = set()

    async def call(name: str, *args: Any) -> Any:
        called.add(name)
        result = getattr(meta, name)(*args)
        if inspect.isasyncgen(result):
            return [item async for item in result]
        return await result

    await call("open")
    await call("ping")
    await call("secret")
    for n in range(5):
        await call("add_manifest", digest(n), ACCEPT[1], [digest(100 + n), digest(200)])
        await call("add_content", digest(n), 10 + n, "docker.io", float(n))
        await call("add_content", digest(n), 10 + n, None, float(n + 1))  # known: a use
        await call("set_tag", TagRecord("docker.io", f"r{n % 2}", f"t{n}", digest(n),
                                        ACCEPT[1], 10, float(n)), ACCEPT)
        await call("add_ref", RefRecord("docker.io", f"r{n % 3}", digest(n), ACCEPT[1], 10))
        await call("grant", Grant("docker.io", f"r{n}", f"id{n}", float(n), n % 2 == 0))
        await call("link", "docker.io", f"r{n % 2}", [digest(n), digest(200)])
        await call("pin", f"owner{n % 2}", [digest(n)])
        await call("put_upload", f"u{n}", {"n": n}, 4e9)
    await call("set_tag", TagRecord("ghcr.io", "x", "y", digest(1), ACCEPT[1], 1, 1.0), None)
    await call("media_type", digest(1))
    await call("children", digest(1))
    await call("parents", digest(200))
    await call("content", digest(1))
    await call("contents", [digest(1), digest(2), digest(99)])
    await call("totals")
    await call("oldest", 100.0)
    await call("iter_content")
    await call("touch", {digest(1): 50.0, digest(2): 60.0})
    await call("add_holder", digest(1), "ghcr.io")
    await call("holds", "ghcr.io", digest(1))
    await call("tag", "docker.io", "r1", "t1", ACCEPT)
    await call("tag", "docker.io", "r1", "t1", None)
    await call("tag_digests", "docker.io", "r1", "t1")
    await call("repo_tags", "docker.io", "r0", "", 2)
    await call("iter_tags")
    await call("tagged", "docker.io", "r1", digest(1))
    await call("tags_naming", "docker.io", "r1", digest(1))
    await call("named", digest(1))
    await call("add_pulls", {("docker.io", "r1", "t1"): 3, ("docker.io", "r0", "t0"): 1})
    await call("pulls", "docker.io", "r1", ["t1", "t3"])
    await call("most_pulled", 2, 0)
    await call("ref", "docker.io", "r1", digest(1))
    await call("iter_refs")
    await call("set_pushed", "docker.io", "r1", "t1", 5.0)
    await call("pushed", "docker.io", "r1", "t1")
    await call("generation")
    await call("bump_generation")
    await call("linked", "docker.io", "r1", digest(1))
    await call("granted", "docker.io", "r1", "id1")
    await call("readable", "docker.io", "r1", "id1", digest(1))
    await call("readable", "docker.io", "r1", "nobody", digest(1))
    await call("upstream_names")
    await call("iter_repos", "docker.io")
    await call("pinned", digest(1))
    await call("iter_pins")
    await call("get_upload", "u1")
    await call("iter_uploads")
    await call("acquire", "evict", "me", 60.0)
    await call("holder", "evict")
    await call("release", "evict", "me")
    # Removals last, on what is there.
    await call("drop_tag", "docker.io", "r1", "t1")
    await call("drop_tag", "ghcr.io", "x", "y")  # its repository's last record
    await call("drop_ref", "docker.io", "r1", digest(1))
    await call("unlink", "docker.io", "r1", digest(1))
    await call("revoke", "docker.io", "r1", "id1")
    await call("prune_grants", 10.0)
    await call("unpin", "owner1")
    await call("drop_upload", "u1")
    await call("drop_content", [digest(1), digest(2)])
    await call("close")
    return called


def plan(db: sqlite3.Connection, sql: str) -> list[str]:
    numbered = [int(n) for n in re.findall(r"\?(\d+)", sql)]  # ?1, ?2: each bound once
    count = max(numbered) if numbered else sql.count("?")
    return [str(row[3]) for row in db.execute("EXPLAIN QUERY PLAN " + sql, (None,) * count)]


@pytest.fixture
def statements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    for module in (sqlite_module, sqlite_db):  # listings read several pages
        monkeypatch.setattr(module, "PAGE", 2)
    meta = SqliteMetadata(tmp_path / "metadata.db")
    meta.open_sync()
    recording = Recording(meta.db)
    meta._db = recording  # type: ignore[assignment]
    called = asyncio.run(exercise(meta))
    assert set(Metadata.__abstractmethods__) <= called, "every operation is exercised"
    return {s for s in recording.statements if s.split()[0] not in (
        "BEGIN", "COMMIT", "ROLLBACK", "PRAGMA")}


def test_every_statement_searches_an_index(tmp_path: Path, statements: set[str]) -> None:
    db = sqlite3.connect(tmp_path / "metadata.db")
    bad: dict[str, list[str]] = {}
    for sql in sorted(statements):
        lines = plan(db, sql)
        # A scan of a subquery's rows reads no table (the subquery's own table reads are
        # lines of their own); here it is the one constant row a LEFT JOIN starts from.
        scans = [ln for ln in lines if ln.startswith("SCAN") and ln not in ALLOWED_SCANS
                 and not ln.startswith("SCAN (subquery-")]
        sorts = [ln for ln in lines if "TEMP B-TREE FOR ORDER BY" in ln]
        if scans or sorts:
            bad[sql] = lines
    db.close()
    assert not bad, "statements that scan or sort a table:\n" + "\n".join(
        f"{sql}\n    {lines}" for sql, lines in bad.items())
    assert len(statements) > 40  # the recording saw the store's statements


def test_point_reads_use_their_whole_key(tmp_path: Path, statements: set[str]) -> None:
    """The reads on the serving path search their table by every column they name (a
    prefix of the key would read a range: more rows as the cache grows)."""
    db = sqlite3.connect(tmp_path / "metadata.db")
    expected: dict[str, Callable[[str], bool]] = {
        "FROM tags WHERE upstream = ? AND repo = ? AND tag = ? AND accept = ?":
            lambda p: "(upstream=? AND repo=? AND tag=? AND accept=?)" in p,
        "FROM grants WHERE upstream = ? AND repo = ? AND identity = ?":
            lambda p: "(upstream=? AND repo=? AND identity=?)" in p,
        "FROM links WHERE upstream = ? AND repo = ? AND digest = ?":
            lambda p: "(upstream=? AND repo=? AND digest=?)" in p,
        "FROM holders WHERE digest = ? AND upstream = ?":
            lambda p: "(digest=? AND upstream=?)" in p,
        "FROM pushed WHERE upstream = ? AND repo = ? AND tag = ?":
            lambda p: "(upstream=? AND repo=? AND tag=?)" in p,
        "FROM tags WHERE digest = ? AND upstream = ? AND repo = ?":
            lambda p: "(digest=? AND upstream=? AND repo=?)" in p,
    }
    for fragment, good in expected.items():
        sqls = [s for s in statements if fragment in s]
        assert sqls, fragment
        for sql in sqls:
            lines = plan(db, sql)
            assert any(good(line) for line in lines), (sql, lines)
    db.close()
