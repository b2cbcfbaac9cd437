"""The embedded metadata store: one SQLite database (WAL) beside the cache, shared by workers
(`mirror.metadata.sqlite_db` opens, migrates and checkpoints it); this module holds the
interface's operations.

Every table has the index its queries need, so each operation touches only its own rows;
listings read keyset-paginated pages.

Calls run on the caller's thread: each is a few microseconds (an indexed point read ~5 us,
a write ~25 us here), cheaper than a hop to another thread.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

from mirror.metadata.base import (
    PAGE,
    AcceptKey,
    ContentRecord,
    Grant,
    Metadata,
    PullCount,
    RefRecord,
    TagRecord,
    accept_text,
)
from mirror.metadata.sqlite_sessions import SqliteSessions

log = logging.getLogger("mirror.metadata")


class SqliteMetadata(SqliteSessions, Metadata):
    """The interface's operations on the cache's index, access facts and counters."""

    async def secret(self) -> bytes:
        self._write("a secret", lambda db: db.execute(
            "INSERT OR IGNORE INTO settings VALUES ('secret', ?)", (secrets.token_bytes(32),)))
        row = self._one("SELECT value FROM settings WHERE key = 'secret'")
        if row is None:  # the disk was full when it was first needed: one for this process
            value = secrets.token_bytes(32)
            log.warning("no room to store the installation secret; using a process-local one")
            return value
        return bytes(row[0])

    # -- manifests -------------------------------------------------------------------------

    async def add_manifest(self, digest: str, media_type: str, children: Iterable[str]) -> None:
        kids = sorted(set(children))

        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?)", (digest, media_type))
            db.executemany("INSERT OR IGNORE INTO children VALUES (?, ?)",
                           [(digest, kid) for kid in kids])

        self._write("a manifest", work)

    async def media_type(self, digest: str) -> str | None:
        row = self._one("SELECT media_type FROM manifests WHERE digest = ?", (digest,))
        return None if row is None else str(row[0])

    async def children(self, digest: str) -> list[str] | None:
        if self._one("SELECT 1 FROM manifests WHERE digest = ?", (digest,)) is None:
            return None
        return [r[0] for r in self._all("SELECT child FROM children WHERE parent = ?",
                                        (digest,))]

    async def parents(self, digest: str) -> list[str]:
        return [r[0] for r in self._all("SELECT parent FROM children WHERE child = ?",
                                        (digest,))]

    # -- content ---------------------------------------------------------------------------

    async def add_content(self, digest: str, size: int, holder: str | None, at: float) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            new = db.execute("INSERT OR IGNORE INTO content VALUES (?, ?, ?)",
                             (digest, size, at)).rowcount > 0
            if new:
                db.execute("UPDATE totals SET bytes = bytes + ?, entries = entries + 1",
                           (size,))
            else:
                db.execute("UPDATE content SET used = MAX(used, ?) WHERE digest = ?",
                           (at, digest))
            if holder is not None:
                db.execute("INSERT OR IGNORE INTO holders VALUES (?, ?)", (digest, holder))
            return new

        return bool(self._write("content", work))

    async def content(self, digest: str) -> ContentRecord | None:
        row = self._one("SELECT size, used FROM content WHERE digest = ?", (digest,))
        return None if row is None else ContentRecord(digest, int(row[0]), float(row[1]))

    async def contents(self, digests: Sequence[str]) -> dict[str, ContentRecord]:
        wanted = list(dict.fromkeys(digests))[:PAGE]
        if not wanted:
            return {}
        marks = ", ".join("?" * len(wanted))
        rows = self._all(f"SELECT digest, size, used FROM content WHERE digest IN ({marks})",
                         tuple(wanted))
        return {r[0]: ContentRecord(r[0], int(r[1]), float(r[2])) for r in rows}

    async def drop_content(self, digests: Iterable[str]) -> int:
        wanted = list(digests)

        def work(db: sqlite3.Connection) -> int:
            freed = count = 0
            for digest in wanted:
                row = db.execute("DELETE FROM content WHERE digest = ? RETURNING size",
                                 (digest,)).fetchone()
                if row is not None:
                    freed += int(row[0])
                    count += 1
                db.execute("DELETE FROM holders WHERE digest = ?", (digest,))
            if count:
                db.execute("UPDATE totals SET bytes = bytes - ?, entries = entries - ?",
                           (freed, count))
            return freed

        return self._write("removed content", work) or 0

    async def totals(self) -> tuple[int, int]:
        row = self._one("SELECT bytes, entries FROM totals WHERE id = 0")
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def oldest(self, before: float) -> AsyncIterator[ContentRecord]:
        sql = ("SELECT digest, size, used FROM content WHERE (used, digest) > (?, ?) "
               "AND used < ? AND NOT EXISTS (SELECT 1 FROM pins WHERE pins.digest = "
               "content.digest) ORDER BY used, digest LIMIT ?")
        async for row in self._pages(sql, (-1.0, "", before),
                                     lambda r: (r[2], r[0], before)):
            yield ContentRecord(row[0], int(row[1]), float(row[2]))

    async def iter_content(self, after: str = "") -> AsyncIterator[ContentRecord]:
        sql = "SELECT digest, size, used FROM content WHERE digest > ? ORDER BY digest LIMIT ?"
        async for row in self._pages(sql, (after,), lambda r: (r[0],)):
            yield ContentRecord(row[0], int(row[1]), float(row[2]))

    async def touch(self, uses: Mapping[str, float]) -> None:
        rows = [(at, digest) for digest, at in uses.items()]
        self._write("last uses", lambda db: db.executemany(
            "UPDATE content SET used = MAX(used, ?) WHERE digest = ?", rows))

    async def add_holder(self, digest: str, upstream: str) -> None:
        self._write("a holder", lambda db: db.execute(
            "INSERT OR IGNORE INTO holders VALUES (?, ?)", (digest, upstream)))

    async def holds(self, upstream: str, digest: str) -> bool:
        return self._one("SELECT 1 FROM holders WHERE digest = ? AND upstream = ?",
                         (digest, upstream)) is not None

    # -- tags ------------------------------------------------------------------------------

    async def tag(self, upstream: str, repo: str, tag: str,
                  accept: AcceptKey | None) -> TagRecord | None:
        row = self._one("SELECT digest, media_type, size, at FROM tags WHERE upstream = ? "
                        "AND repo = ? AND tag = ? AND accept = ?",
                        (upstream, repo, tag, accept_text(accept)))
        if row is None:
            return None
        return TagRecord(upstream, repo, tag, row[0], row[1], int(row[2]), float(row[3]))

    async def set_tag(self, record: TagRecord, accept: AcceptKey | None) -> None:
        r = record
        values = (r.upstream, r.repo, r.tag)
        data = (r.digest, r.media_type, r.size, r.at)

        def work(db: sqlite3.Connection) -> None:
            sql = "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            if accept is not None:
                db.execute(sql, (*values, accept_text(accept), *data))
            db.execute(sql, (*values, "-", *data))
            db.execute("INSERT OR IGNORE INTO repos VALUES (?, ?)", (r.upstream, r.repo))

        self._write("a tag", work)

    async def drop_tag(self, upstream: str, repo: str, tag: str) -> list[str]:
        def work(db: sqlite3.Connection) -> list[str]:
            rows = db.execute("DELETE FROM tags WHERE upstream = ? AND repo = ? AND tag = ? "
                              "RETURNING digest", (upstream, repo, tag)).fetchall()
            db.execute("DELETE FROM pulls WHERE upstream = ? AND repo = ? AND tag = ?",
                       (upstream, repo, tag))
            self._drop_repo_if_empty(db, upstream, repo)
            return sorted({r[0] for r in rows})

        return self._write("a dropped tag", work) or []

    @staticmethod
    def _drop_repo_if_empty(db: sqlite3.Connection, upstream: str, repo: str) -> None:
        if (db.execute("SELECT 1 FROM tags WHERE upstream = ? AND repo = ? LIMIT 1",
                       (upstream, repo)).fetchone() is None
                and db.execute("SELECT 1 FROM refs WHERE upstream = ? AND repo = ? LIMIT 1",
                               (upstream, repo)).fetchone() is None):
            db.execute("DELETE FROM repos WHERE upstream = ? AND repo = ?", (upstream, repo))

    async def tag_digests(self, upstream: str, repo: str, tag: str) -> list[str]:
        rows = self._all("SELECT DISTINCT digest FROM tags WHERE upstream = ? AND repo = ? "
                         "AND tag = ?", (upstream, repo, tag))
        return sorted(r[0] for r in rows)

    async def repo_tags(self, upstream: str, repo: str, after: str = "",
                        limit: int = PAGE) -> list[TagRecord]:
        rows = self._all(
            "SELECT tag, digest, media_type, size, at FROM tags WHERE upstream = ? AND "
            "repo = ? AND tag > ? AND accept = '-' ORDER BY tag LIMIT ?",
            (upstream, repo, after, limit))
        return [TagRecord(upstream, repo, r[0], r[1], r[2], int(r[3]), float(r[4]))
                for r in rows]

    async def iter_tags(self) -> AsyncIterator[TagRecord]:
        sql = ("SELECT upstream, repo, tag, digest, media_type, size, at FROM tags "
               "WHERE (upstream, repo, tag) > (?, ?, ?) AND accept = '-' "
               "ORDER BY upstream, repo, tag LIMIT ?")
        async for r in self._pages(sql, ("", "", ""), lambda r: (r[0], r[1], r[2])):
            yield TagRecord(r[0], r[1], r[2], r[3], r[4], int(r[5]), float(r[6]))

    async def tagged(self, upstream: str, repo: str, digest: str) -> bool:
        return self._one("SELECT 1 FROM tags WHERE digest = ? AND upstream = ? AND repo = ? "
                         "LIMIT 1", (digest, upstream, repo)) is not None

    async def tags_naming(self, upstream: str, repo: str, digest: str) -> list[str]:
        rows = self._all("SELECT DISTINCT tag FROM tags WHERE digest = ? AND upstream = ? AND "
                         "repo = ?", (digest, upstream, repo))
        return sorted(r[0] for r in rows)

    async def named(self, digest: str) -> bool:
        return any(self._one(sql, (digest,)) is not None for sql in (
            "SELECT 1 FROM tags WHERE digest = ? LIMIT 1",
            "SELECT 1 FROM refs WHERE digest = ? LIMIT 1",
            "SELECT 1 FROM pins WHERE digest = ? LIMIT 1"))

    # -- pull counts -----------------------------------------------------------------------

    async def add_pulls(self, pulls: Mapping[tuple[str, str, str], int]) -> None:
        rows = [(u, r, t, n, u, r, t) for (u, r, t), n in pulls.items() if n > 0]
        if rows:
            self._write("pull counts", lambda db: db.executemany(
                "INSERT INTO pulls SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM tags WHERE "
                "upstream = ? AND repo = ? AND tag = ? AND accept = '-') "
                "ON CONFLICT DO UPDATE SET count = count + excluded.count", rows))

    async def pulls(self, upstream: str, repo: str, tags: Sequence[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(tags))[:PAGE]
        if not wanted:
            return {}
        marks = ", ".join("?" * len(wanted))
        rows = self._all(f"SELECT tag, count FROM pulls WHERE upstream = ? AND repo = ? AND "
                         f"tag IN ({marks})", (upstream, repo, *wanted))
        return {str(r[0]): int(r[1]) for r in rows}

    async def most_pulled(self, limit: int, offset: int = 0) -> list[PullCount]:
        rows = self._all("SELECT upstream, repo, tag, count FROM pulls ORDER BY count DESC, "
                         "upstream, repo, tag LIMIT ? OFFSET ?", (limit, offset))
        return [PullCount(r[0], r[1], r[2], int(r[3])) for r in rows]

    # -- refs ------------------------------------------------------------------------------

    async def add_ref(self, record: RefRecord) -> None:
        r = record

        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?, ?, ?)",
                       (r.upstream, r.repo, r.digest, r.media_type, r.size))
            db.execute("INSERT OR IGNORE INTO repos VALUES (?, ?)", (r.upstream, r.repo))

        self._write("an image", work)

    async def ref(self, upstream: str, repo: str, digest: str) -> RefRecord | None:
        row = self._one("SELECT media_type, size FROM refs WHERE upstream = ? AND repo = ? "
                        "AND digest = ?", (upstream, repo, digest))
        return None if row is None else RefRecord(upstream, repo, digest, row[0], int(row[1]))

    async def drop_ref(self, upstream: str, repo: str, digest: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            gone = db.execute("DELETE FROM refs WHERE upstream = ? AND repo = ? AND digest = ?",
                              (upstream, repo, digest)).rowcount > 0
            self._drop_repo_if_empty(db, upstream, repo)
            return gone

        return bool(self._write("a dropped image", work))

    async def iter_refs(self) -> AsyncIterator[RefRecord]:
        sql = ("SELECT upstream, repo, digest, media_type, size FROM refs "
               "WHERE (upstream, repo, digest) > (?, ?, ?) "
               "ORDER BY upstream, repo, digest LIMIT ?")
        async for r in self._pages(sql, ("", "", ""), lambda r: (r[0], r[1], r[2])):
            yield RefRecord(r[0], r[1], r[2], r[3], int(r[4]))

    # -- pushes ----------------------------------------------------------------------------

    async def set_pushed(self, upstream: str, repo: str, tag: str, at: float) -> None:
        self._write("a push", lambda db: db.execute(
            "INSERT OR REPLACE INTO pushed VALUES (?, ?, ?, ?)", (upstream, repo, tag, at)))

    async def pushed(self, upstream: str, repo: str, tag: str) -> float:
        row = self._one("SELECT at FROM pushed WHERE upstream = ? AND repo = ? AND tag = ?",
                        (upstream, repo, tag))
        return 0.0 if row is None else float(row[0])

    async def generation(self) -> int:
        row = self._one("SELECT value FROM settings WHERE key = 'generation'")
        return 0 if row is None else int(row[0])

    async def bump_generation(self) -> int:
        def work(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO settings VALUES ('generation', 1) ON CONFLICT (key) "
                       "DO UPDATE SET value = value + 1")
            return int(db.execute(
                "SELECT value FROM settings WHERE key = 'generation'").fetchone()[0])

        result = self._write("a generation", work)
        return result if result is not None else await self.generation()

    # -- access facts ----------------------------------------------------------------------

    async def link(self, upstream: str, repo: str, digests: Iterable[str]) -> None:
        rows = [(upstream, repo, d) for d in digests]
        if rows:
            self._write("a repository's content", lambda db: db.executemany(
                "INSERT OR IGNORE INTO links VALUES (?, ?, ?)", rows))

    async def unlink(self, upstream: str, repo: str, digest: str) -> None:
        self._write("an unlink", lambda db: db.execute(
            "DELETE FROM links WHERE upstream = ? AND repo = ? AND digest = ?",
            (upstream, repo, digest)))

    async def linked(self, upstream: str, repo: str, digest: str) -> bool:
        return self._one("SELECT 1 FROM links WHERE upstream = ? AND repo = ? AND digest = ?",
                         (upstream, repo, digest)) is not None

    async def grant(self, grant: Grant) -> None:
        g = grant
        self._write("an access grant", lambda db: db.execute(
            "INSERT INTO grants VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "at = MAX(at, excluded.at), durable = MAX(durable, excluded.durable)",
            (g.upstream, g.repo, g.identity, g.at, int(g.durable))))

    async def granted(self, upstream: str, repo: str, identity: str) -> Grant | None:
        row = self._one("SELECT at, durable FROM grants WHERE upstream = ? AND repo = ? "
                        "AND identity = ?", (upstream, repo, identity))
        return None if row is None else Grant(upstream, repo, identity, float(row[0]),
                                              bool(row[1]))

    async def readable(self, upstream: str, repo: str, identity: str,
                       digest: str) -> tuple[Grant | None, bool, bool]:
        # One statement: one read transaction (and its locks) instead of three.
        at, durable, linked, holds = self._one(
            "SELECT g.at, g.durable, "
            "EXISTS (SELECT 1 FROM links WHERE upstream = ?1 AND repo = ?2 AND digest = ?4), "
            "EXISTS (SELECT 1 FROM holders WHERE digest = ?4 AND upstream = ?1) "
            "FROM (SELECT 1) LEFT JOIN grants AS g ON g.upstream = ?1 AND g.repo = ?2 "
            "AND g.identity = ?3", (upstream, repo, identity, digest))
        if at is None:
            return None, False, False
        grant = Grant(upstream, repo, identity, float(at), bool(durable))
        return grant, bool(linked), bool(linked and holds)

    async def revoke(self, upstream: str, repo: str, identity: str) -> None:
        self._write("a revoked grant", lambda db: db.execute(
            "DELETE FROM grants WHERE upstream = ? AND repo = ? AND identity = ?",
            (upstream, repo, identity)))

    async def prune_grants(self, before: float) -> int:
        result = self._write("pruned grants", lambda db: db.execute(
            "DELETE FROM grants WHERE durable = 0 AND at < ?", (before,)).rowcount)
        return int(result or 0)

    async def upstream_names(self) -> list[str]:
        # A skip scan of the primary key: one probe per distinct upstream.
        rows = self._all(
            "WITH RECURSIVE names(name) AS (SELECT MIN(upstream) FROM repos UNION ALL "
            "SELECT (SELECT MIN(upstream) FROM repos WHERE upstream > names.name) FROM names "
            "WHERE names.name IS NOT NULL) SELECT name FROM names WHERE name IS NOT NULL")
        return [str(r[0]) for r in rows]

    async def iter_repos(self, upstream: str, after: str = "") -> AsyncIterator[str]:
        sql = ("SELECT repo FROM repos WHERE upstream = ? AND repo > ? ORDER BY repo LIMIT ?")
        async for row in self._pages(sql, (upstream, after), lambda r: (upstream, r[0])):
            yield str(row[0])
