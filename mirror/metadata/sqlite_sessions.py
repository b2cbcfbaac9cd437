"""The SQLite metadata store's operations outside the cache's index: pins (what owners keep
in the cache), upload sessions and named locks."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from mirror.metadata.sqlite_db import SqliteDatabase


class SqliteSessions(SqliteDatabase):
    """Pins, upload sessions and locks, on the store's database."""

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
