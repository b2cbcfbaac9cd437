"""Import the previous release's metadata index (a diskcache database under `index/`).

Runs once, inside the transaction that creates the schema, when a cache written by the
previous release is first opened: tags, media types, links, pins, pushes and images named
by digest carry over, so nothing is fetched again. What it did not record is derived:
content sizes and last uses from the files under `blobs/`, manifest children from the
stored manifests, and each digest's holders from the upstreams whose repositories were
linked to it.

Access decisions do not carry over (the previous release's "public" flags could be wrong:
they are probed again) except for the repositories of pinned images (seeded or imported by
the operator, which that release served to anyone offline): those keep an anonymous grant.
The old index is left in place, unread from then on.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from mirror import oci
from mirror.metadata.base import accept_text
from mirror.reference import ALGORITHMS

log = logging.getLogger("mirror.metadata")

INDEX_DIR = "index"
LEGACY_PIN_OWNER = "(pinned before the upgrade)"


def import_index(db: sqlite3.Connection, root: Path) -> None:
    """Copy the old index at `root/index` (if any) into the new schema, in `db`'s
    transaction."""
    blobs = root / "blobs"
    directory = root / INDEX_DIR
    if not (directory / "cache.db").exists() and not blobs.is_dir():
        return
    started = time.monotonic()
    counts = _import_keys(db, directory) if (directory / "cache.db").exists() else {}
    files = _import_content(db, blobs)
    _derive(db, blobs)
    log.info("imported the previous release's index from %s in %.1f s: %s, %d content files",
             root, time.monotonic() - started,
             ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing", files)


def _import_keys(db: sqlite3.Connection, directory: Path) -> dict[str, int]:
    import diskcache

    cache = diskcache.Cache(str(directory), eviction_policy="none")
    counts: dict[str, int] = {}
    try:
        for key in cache.iterkeys():
            if not isinstance(key, tuple) or not key:
                continue
            value = cache.get(key)
            kind = key[0]
            if _import_one(db, kind, key[1:], value):
                counts[kind] = counts.get(kind, 0) + 1
    finally:
        cache.close()
    return counts


def _import_one(db: sqlite3.Connection, kind: Any, key: tuple[Any, ...], value: Any) -> bool:
    if kind == "mt" and isinstance(value, str):
        db.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?)", (key[0], value))
    elif kind == "tag" and isinstance(value, dict) and len(key) == 4:
        upstream, repo, tag, accept = key
        db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
            upstream, repo, tag, accept_text(tuple(accept) if accept is not None else None),
            value["digest"], value["media_type"], int(value["size"]), float(value["at"])))
        db.execute("INSERT OR IGNORE INTO repos VALUES (?, ?)", (upstream, repo))
    elif kind == "link" and value and len(key) == 3:
        db.execute("INSERT OR IGNORE INTO links VALUES (?, ?, ?)", key)
    elif kind == "pin" and value:
        db.execute("INSERT OR IGNORE INTO pins VALUES (?, ?)", (LEGACY_PIN_OWNER, key[0]))
    elif kind == "pushed" and isinstance(value, int | float) and len(key) == 3:
        db.execute("INSERT OR REPLACE INTO pushed VALUES (?, ?, ?, ?)", (*key, float(value)))
    elif kind == "ref" and isinstance(value, dict) and len(key) == 3:
        db.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?, ?, ?)",
                   (*key, value["media_type"], int(value["size"])))
        db.execute("INSERT OR IGNORE INTO repos VALUES (?, ?)", key[:2])
    elif kind == "used" and isinstance(value, float):
        db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                   (f"legacy-used:{key[0]}", json.dumps(value)))
    else:
        return False
    return True


def _import_content(db: sqlite3.Connection, blobs: Path) -> int:
    """A content row for every committed file (blobs/<alg>/<xx>/<hex>)."""
    count = total = 0
    for algorithm, length in ALGORITHMS.items():
        base = blobs / algorithm
        if not base.is_dir():
            continue
        for sub in os.scandir(base):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for item in os.scandir(sub.path):
                name = item.name
                if len(name) != length or name[:2] != sub.name or not item.is_file(
                        follow_symlinks=False):
                    continue
                st = item.stat(follow_symlinks=False)
                digest = f"{algorithm}:{name}"
                row = db.execute("DELETE FROM settings WHERE key = ? RETURNING value",
                                 (f"legacy-used:{digest}",)).fetchone()
                used = max(json.loads(row[0]) if row else 0.0, st.st_mtime)
                db.execute("INSERT OR REPLACE INTO content VALUES (?, ?, ?)",
                           (digest, st.st_size, used))
                count += 1
                total += st.st_size
    db.execute("DELETE FROM settings WHERE key LIKE 'legacy-used:%'")
    db.execute("UPDATE totals SET bytes = ?, entries = ? WHERE id = 0", (total, count))
    return count


def _derive(db: sqlite3.Connection, blobs: Path) -> None:
    # Children of every stored manifest, read once from its file.
    for (digest,) in db.execute("SELECT digest FROM manifests").fetchall():
        algorithm, _, hex_ = digest.partition(":")
        path = blobs / algorithm / hex_[:2] / hex_
        try:
            data = path.read_bytes() if path.stat().st_size <= oci.MAX_MANIFEST else b""
        except OSError:
            continue
        kids = oci.named_digests(data)
        db.executemany("INSERT OR IGNORE INTO children VALUES (?, ?)",
                       [(digest, kid) for kid in kids])
    # The previous release fetched a digest from the upstreams it linked it under.
    db.execute("INSERT OR IGNORE INTO holders SELECT DISTINCT links.digest, links.upstream "
               "FROM links JOIN content ON content.digest = links.digest")
    # Pinned images (seeded or imported) stay readable by anyone offline, as they were.
    now = time.time()
    db.execute(
        "INSERT OR IGNORE INTO grants SELECT DISTINCT upstream, repo, 'anonymous', ?, 1 "
        "FROM (SELECT upstream, repo, digest FROM tags UNION "
        "SELECT upstream, repo, digest FROM refs) AS roots "
        "WHERE EXISTS (SELECT 1 FROM pins WHERE pins.digest = roots.digest)", (now,))
