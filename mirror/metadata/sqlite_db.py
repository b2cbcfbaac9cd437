"""The SQLite metadata store's database: opening it (WAL), its schema version
(`PRAGMA user_version`) and the forward migrations run at open (`MIGRATIONS`), the thread that
checkpoints its WAL, and the guarded reads and writes every operation goes through.

A cache written by the release before this schema existed (a diskcache index under `index/`)
is imported once, in the migration that creates the schema (`mirror.metadata.legacy`).
Checkpoints, which copy the WAL back into the database and fsync it (milliseconds, tens of
them on a big database), run on a thread of each store (`Checkpointer`, with a connection of
its own) after every `CHECKPOINT_WRITES` writes, so a write on the event loop seldom waits for
a disk flush; a commit checkpoints itself only when the WAL passes `WAL_LIMIT_PAGES` (what
the thread has not copied yet: little), which bounds the WAL under any load.
Writes that only remember what an upstream said are skipped with a warning when the disk is
full: each one missing fails safe (a tag is resolved again, access is probed again).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from mirror.metadata.base import PAGE, MetadataError

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



class SqliteDatabase:
    """A store's connection to the database: opened and migrated once, checkpointed by its
    thread; `_one`, `_all` and `_write` turn SQLite's failures into `MetadataError`."""

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


def database_path(cache_dir: Path) -> Path:
    return cache_dir / FILE_NAME
