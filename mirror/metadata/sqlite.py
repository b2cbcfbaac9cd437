"""The embedded metadata store: one SQLite database (WAL) beside the cache, shared by workers.

Every table has the index its queries need, so each operation touches only its own rows;
listings read keyset-paginated pages. The schema is versioned with `PRAGMA user_version`
and migrated forward at open (`MIGRATIONS`); a cache written by the release before this
schema existed (a diskcache index under `index/`) is imported once (`mirror.metadata.legacy`).

Calls run on the caller's thread: each is a few microseconds (an indexed point read ~5 us,
a write ~25 us here), cheaper than a hop to another thread. Checkpoints, which copy the WAL
back into the database and fsync it (milliseconds, tens of them on a big database), run on a
thread of each store (`Checkpointer`, with a connection of its own) after every
`CHECKPOINT_WRITES` writes, so a write on the event loop seldom waits for a disk flush; a
commit checkpoints itself only when the WAL passes `WAL_LIMIT_PAGES` (what the thread has
not copied yet: little), which bounds the WAL under any load.
Writes that only remember what an upstream said are skipped with a warning when the disk is
full: each one missing fails safe (a tag is resolved again, access is probed again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mirror.metadata.base import (
    PAGE,
    AcceptKey,
    ContentRecord,
    Grant,
    Metadata,
    MetadataError,
    PullCount,
    RefRecord,
    TagRecord,
)

log = logging.getLogger("mirror.metadata")
T = TypeVar("T")

FILE_NAME = "metadata.db"
BUSY_TIMEOUT_MS = 30_000  # another worker's write transaction: wait, do not fail
# Writes of a store between two checkpoints of its thread (~5 WAL pages each: about SQLite's
# own default of 1,000 pages), and the longest a write waits for its checkpoint.
CHECKPOINT_WRITES = 200
CHECKPOINT_INTERVAL = 1.0
# The WAL's bound, in pages (4 KiB): the WAL starts again from its beginning only once all of
# it is copied, which the thread's checkpoints, running while writes go on, may never catch
# up with under a steady stream of writes; past this many pages a commit checkpoints (the
# rest) itself, as SQLite's automatic checkpoint does, and the WAL starts again.
WAL_LIMIT_PAGES = 10_000

# Schema version N is reached by running MIGRATIONS[N - 1]; append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE tags (
        upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL, accept TEXT NOT NULL,
        digest TEXT NOT NULL, media_type TEXT NOT NULL, size INTEGER NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (upstream, repo, tag, accept)) WITHOUT ROWID;
    CREATE INDEX tags_by_digest ON tags (digest);
    CREATE TABLE repos (upstream TEXT NOT NULL, repo TEXT NOT NULL,
        PRIMARY KEY (upstream, repo)) WITHOUT ROWID;
    CREATE TABLE manifests (digest TEXT PRIMARY KEY, media_type TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE children (parent TEXT NOT NULL, child TEXT NOT NULL,
        PRIMARY KEY (parent, child)) WITHOUT ROWID;
    CREATE INDEX children_by_child ON children (child);
    CREATE TABLE content (digest TEXT PRIMARY KEY, size INTEGER NOT NULL,
        used REAL NOT NULL) WITHOUT ROWID;
    CREATE INDEX content_by_use ON content (used, digest);
    CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL,
        entries INTEGER NOT NULL);
    INSERT INTO totals VALUES (0, 0, 0);
    CREATE TABLE holders (digest TEXT NOT NULL, upstream TEXT NOT NULL,
        PRIMARY KEY (digest, upstream)) WITHOUT ROWID;
    CREATE TABLE refs (upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL,
        media_type TEXT NOT NULL, size INTEGER NOT NULL,
        PRIMARY KEY (upstream, repo, digest)) WITHOUT ROWID;
    CREATE INDEX refs_by_digest ON refs (digest);
    CREATE TABLE pushed (upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL,
        at REAL NOT NULL, PRIMARY KEY (upstream, repo, tag)) WITHOUT ROWID;
    CREATE TABLE links (upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL,
        PRIMARY KEY (upstream, repo, digest)) WITHOUT ROWID;
    CREATE TABLE grants (upstream TEXT NOT NULL, repo TEXT NOT NULL, identity TEXT NOT NULL,
        at REAL NOT NULL, durable INTEGER NOT NULL,
        PRIMARY KEY (upstream, repo, identity)) WITHOUT ROWID;
    CREATE INDEX grants_by_age ON grants (durable, at);
    CREATE TABLE pins (owner TEXT NOT NULL, digest TEXT NOT NULL,
        PRIMARY KEY (owner, digest)) WITHOUT ROWID;
    CREATE INDEX pins_by_digest ON pins (digest);
    CREATE TABLE uploads (id TEXT PRIMARY KEY, data TEXT NOT NULL,
        expires REAL NOT NULL) WITHOUT ROWID;
    CREATE INDEX uploads_by_expiry ON uploads (expires);
    CREATE TABLE locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL,
        expires REAL NOT NULL) WITHOUT ROWID;
    """,
    # 2: pull counts of tags, most pulled first by index.
    """
    CREATE TABLE pulls (upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL,
        count INTEGER NOT NULL, PRIMARY KEY (upstream, repo, tag)) WITHOUT ROWID;
    CREATE INDEX pulls_by_count ON pulls (count DESC, upstream, repo, tag);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def accept_text(accept: AcceptKey | None) -> str:
    """How an Accept key is stored: '-' for the latest record, else the types joined."""
    return "-" if accept is None else ",".join(accept)


class Checkpointer:
    """Checkpoints the WAL from a thread of its own, on a connection of its own.

    A checkpoint copies the WAL's pages into the database and fsyncs both: on a big
    database, whose pages are scattered, tens of milliseconds that would stall every request
    of the process if a write on the event loop ran it (SQLite's automatic checkpoint does,
    in the commit that crosses its threshold). `wrote()` counts writes; every
    `CHECKPOINT_WRITES` of them (or `CHECKPOINT_INTERVAL` seconds after one) the thread runs
    PASSIVE checkpoints, which neither wait for nor block readers and writers, until the WAL
    is all copied (a few passes at most: writes go on meanwhile); the next write then starts
    the WAL again from its beginning. Another process's checkpoint running at the time just
    makes it skip a turn.
    """

    PASSES = 3

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = 0
        self._writes = 1  # one checkpoint soon after opening: a WAL a migration (or an
        # earlier run) left
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mirror-sqlite-checkpoint",
                                        daemon=True)
        self._thread.start()

    def wrote(self) -> None:
        self._writes += 1
        if self._writes >= CHECKPOINT_WRITES:
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while not self._stopping:
                self._wake.wait(CHECKPOINT_INTERVAL)
                self._wake.clear()
                if self._stopping or not self._writes:
                    continue
                self._writes = 0
                try:
                    if db is None:
                        db = sqlite3.connect(self.path, isolation_level=None,
                                             check_same_thread=False)
                        db.execute("PRAGMA synchronous = NORMAL")
                    for _ in range(self.PASSES):
                        busy, frames, copied = db.execute(
                            "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if busy or copied >= frames:
                            break
                    self.checkpoints += 1
                except Exception as exc:  # e.g. a full disk: the WAL waits for the next one
                    log.debug("checkpoint of %s failed: %s", self.path, exc)
        finally:
            if db is not None:
                db.close()


class SqliteMetadata(Metadata):
    def __init__(self, path: Path, legacy_root: Path | None = None) -> None:
        """`legacy_root`: a cache directory whose previous-release index to import once."""
        self.path = path
        self.legacy_root = legacy_root
        self._db: sqlite3.Connection | None = None
        self._checkpointer: Checkpointer | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self.open_sync()

    def open_sync(self) -> None:
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=BUSY_TIMEOUT_MS / 1000)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        with contextlib.suppress(sqlite3.OperationalError):  # a read-only medium keeps its mode
            db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        # Checkpoints are the Checkpointer's; a commit runs one only past the WAL's bound.
        db.execute(f"PRAGMA wal_autocheckpoint = {WAL_LIMIT_PAGES}")
        self._db = db
        self._migrate()
        self._checkpointer = Checkpointer(self.path)

    def _migrate(self) -> None:
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise MetadataError(
                f"{self.path}: schema version {version} is newer than this release's "
                f"({SCHEMA_VERSION}); upgrade mirror to use this cache")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]  # another worker won?
            fresh = version == 0
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        db.execute(statement)
            if fresh and self.legacy_root is not None:
                from mirror.metadata import legacy

                legacy.import_index(db, self.legacy_root)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if version < SCHEMA_VERSION:
            log.info("metadata schema %d -> %d in %s", version, SCHEMA_VERSION, self.path)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise MetadataError("metadata store is not open")
        return self._db

    async def close(self) -> None:
        self.close_sync()

    def close_sync(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._db is not None:
            self._db.close()  # the last connection to close checkpoints what is left
            self._db = None

    async def ping(self) -> bool:
        try:
            self.db.execute("SELECT 1").fetchone()
        except (sqlite3.Error, MetadataError):
            return False
        return True

    async def secret(self) -> bytes:
        self._write("a secret", lambda db: db.execute(
            "INSERT OR IGNORE INTO settings VALUES ('secret', ?)", (secrets.token_bytes(32),)))
        row = self._one("SELECT value FROM settings WHERE key = 'secret'")
        if row is None:  # the disk was full when it was first needed: one for this process
            value = secrets.token_bytes(32)
            log.warning("no room to store the installation secret; using a process-local one")
            return value
        return bytes(row[0])

    # -- helpers ---------------------------------------------------------------------------

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        try:
            return self.db.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise MetadataError(f"metadata read failed: {exc}") from exc

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise MetadataError(f"metadata read failed: {exc}") from exc

    def _write(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T | None:
        """Run `work` in one immediate transaction; skipped (None) on a full disk."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            if self._checkpointer is not None:
                self._checkpointer.wrote()
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                log.warning("cache disk full: %s not recorded", what)
                return None
            raise MetadataError(f"metadata write failed ({what}): {exc}") from exc
        except sqlite3.Error as exc:
            raise MetadataError(f"metadata write failed ({what}): {exc}") from exc
        return result

    async def _pages(self, sql: str, first: tuple[Any, ...],
                     cursor: Callable[[Any], tuple[Any, ...]]) -> AsyncIterator[Any]:
        """Keyset pagination: `sql` takes the cursor's values then LIMIT; rows in order."""
        args = first
        while True:
            rows = self._all(sql, (*args, PAGE))
            for row in rows:
                yield row
            if len(rows) < PAGE:
                return
            args = cursor(rows[-1])

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

    # -- pins ------------------------------------------------------------------------------

    async def pin(self, owner: str, digests: Iterable[str]) -> None:
        rows = [(owner, d) for d in digests]
        self._write("pins", lambda db: db.executemany(
            "INSERT OR IGNORE INTO pins VALUES (?, ?)", rows))

    async def unpin(self, owner: str) -> list[str]:
        result = self._write("unpins", lambda db: db.execute(
            "DELETE FROM pins WHERE owner = ? RETURNING digest", (owner,)).fetchall())
        return sorted(r[0] for r in result or [])

    async def pinned(self, digest: str) -> bool:
        return self._one("SELECT 1 FROM pins WHERE digest = ? LIMIT 1", (digest,)) is not None

    async def iter_pins(self) -> AsyncIterator[tuple[str, str]]:
        sql = ("SELECT owner, digest FROM pins WHERE (owner, digest) > (?, ?) "
               "ORDER BY owner, digest LIMIT ?")
        async for row in self._pages(sql, ("", ""), lambda r: (r[0], r[1])):
            yield str(row[0]), str(row[1])

    # -- uploads ---------------------------------------------------------------------------

    async def put_upload(self, upload_id: str, data: Mapping[str, Any], expires: float) -> None:
        text = json.dumps(dict(data))
        self._write("an upload session", lambda db: db.execute(
            "INSERT OR REPLACE INTO uploads VALUES (?, ?, ?)", (upload_id, text, expires)))

    async def get_upload(self, upload_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT data FROM uploads WHERE id = ? AND expires > ?",
                        (upload_id, time.time()))
        return None if row is None else dict(json.loads(row[0]))

    async def drop_upload(self, upload_id: str) -> None:
        now = time.time()

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
            db.execute("DELETE FROM uploads WHERE expires <= ?", (now,))  # indexed: cheap

        self._write("a finished upload", work)

    async def iter_uploads(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        sql = "SELECT id, data FROM uploads WHERE id > ? AND expires > ? ORDER BY id LIMIT ?"
        now = time.time()
        async for row in self._pages(sql, ("", now), lambda r: (r[0], now)):
            yield str(row[0]), dict(json.loads(row[1]))

    # -- locks -----------------------------------------------------------------------------

    async def acquire(self, name: str, owner: str, lease: float) -> bool:
        now = time.time()
        result = self._write("a lock", lambda db: db.execute(
            "INSERT INTO locks VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "owner = excluded.owner, expires = excluded.expires "
            "WHERE locks.owner = excluded.owner OR locks.expires <= ?",
            (name, owner, now + lease, now)).rowcount)
        return bool(result)

    async def release(self, name: str, owner: str) -> None:
        self._write("a released lock", lambda db: db.execute(
            "DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner)))

    async def holder(self, name: str) -> str | None:
        row = self._one("SELECT owner FROM locks WHERE name = ? AND expires > ?",
                        (name, time.time()))
        return None if row is None else str(row[0])


def database_path(cache_dir: Path) -> Path:
    return cache_dir / FILE_NAME


def exists(cache_dir: Path) -> bool:
    return os.path.exists(database_path(cache_dir))
