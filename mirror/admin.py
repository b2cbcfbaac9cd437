"""`mirror cache ls|du|rm|gc|verify|refresh|pin|unpin`: look at and tidy a cache, safe while
a server uses it (`refresh`, `pin`, `unpin` and `rm` are `mirror.cacheops`).

They change the cache only the way a server does: content files go with unlink(2) (a
client already reading one keeps its descriptor and gets every byte; the next request
misses and fetches again), partials only under their fill lock (so never a running fill's),
lock files only while holding them, and metadata through its own operations.

What is in use: the roots are the tag records (every Accept set's), the images recorded by
digest (refs) and the pins; a manifest's children (recorded when it was stored) are in use
while the manifest is. Every command costs what it touches: `rm` of one image walks that
image only (each digest it frees is checked against the roots and parents that name it),
and `ls`, `gc` and `verify` stream the records in pages, in constant memory: `ls` prints
its first line at once. Since a pull in progress records its tag before fetching what it
names, `gc` spares content used within `--min-age` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator

from mirror import cacheops, objectstore
from mirror import metadata as metadata_module
from mirror.airgap.progress import human_bytes
from mirror.evict import default_budget
from mirror.imageref import ImageRef, RefError
from mirror.locks import FillLock
from mirror.metadata import Metadata
from mirror.reference import Digest
from mirror.settings import Settings, SettingsError, load
from mirror.store import STALE_TMP, Store

GC_MIN_AGE = 600.0
MEMO = 10_000  # reachability answers kept while collecting: bounded, whatever the cache


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = commands.add_parser("cache", help="inspect and tidy the cache (safe while serving)")
    sub = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    parsers = {
        "ls": sub.add_parser("ls", help="cached images: tag, digest, size on disk, last use"),
        "du": sub.add_parser("du", help="bytes and entries in the cache, and the budget"),
        "rm": sub.add_parser("rm", help="forget an image and remove the content only it uses"),
        "gc": sub.add_parser("gc", help="remove content no tag, image or pin uses, and "
                             "leftover temporary and lock files"),
        "verify": sub.add_parser("verify", help="re-hash every entry; remove bad ones "
                                 "(exit status 1 if any)"),
    }
    for parser in parsers.values():
        add_store_flags(parser)
    parsers["rm"].add_argument("image", metavar="IMAGE",
                               help="[UPSTREAM/]REPO[:TAG] or [UPSTREAM/]REPO@DIGEST")
    for name, text in (("refresh", "forget tags' cached resolutions: the next pull of each, "
                        "on every worker and replica, asks the upstream"),
                       ("pin", "keep images (their manifests and blobs) from eviction"),
                       ("unpin", "let pinned images be evicted again")):
        parser = sub.add_parser(name, help=text)
        add_store_flags(parser)
        parser.add_argument("refs", nargs="+", metavar="REF",
                            help="[UPSTREAM/]REPO[:TAG]" + ("" if name == "refresh" else
                                                           " or [UPSTREAM/]REPO@DIGEST"))
    parsers["gc"].add_argument(
        "--min-age", metavar="SECONDS", type=float, default=GC_MIN_AGE,
        help=f"keep content used less than this long ago (default {GC_MIN_AGE:.0f})")


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file")
    parser.add_argument("--cache-dir", metavar="DIR", help="where the cache lives")
    parser.add_argument("--redis", dest="redis_url", metavar="URL",
                        help="shared metadata store (as for serve)")
    parser.add_argument("--storage", metavar="URL",
                        help="where content lives: s3://BUCKET[/PREFIX] (as for serve)")


def run(args: argparse.Namespace) -> int:
    flags = {"config": args.config, "cache_dir": args.cache_dir, "redis_url": args.redis_url,
             "storage": args.storage}
    try:
        settings = load({k: v for k, v in flags.items() if v is not None})
    except SettingsError as exc:
        print(f"mirror: bad setting: {exc}", file=sys.stderr)
        return 2
    if not settings.storage and not (settings.cache_dir / "blobs").is_dir():
        print(f"mirror: no cache in {settings.cache_dir}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(settings, args))
    except BrokenPipeError:
        # `mirror cache ls | head`: the reader has what it wanted; leave quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    metadata = metadata_module.create(settings.cache_dir, settings.redis_url)
    await metadata.open()
    remote = objectstore.from_settings(settings.storage, settings.storage_options)
    store = Store(settings.cache_dir, metadata, remote, keep_local=remote is None)
    try:
        command = args.cache_command
        if command == "ls":
            return await ls(store)
        if command == "du":
            return await du(store, settings)
        if command == "rm":
            return await rm(store, settings, args.image)
        if command == "gc":
            return await gc(store, args.min_age)
        if command in ("refresh", "pin", "unpin"):
            return await each_ref(store, settings, command, args.refs)
        return await verify(store)
    finally:
        await store.close()
        await metadata.close()


# -- what uses what --------------------------------------------------------------------------


async def images(metadata: Metadata) -> AsyncIterator[tuple[str, list[str]]]:
    """(name, root digests) of every image, in name order per kind, streamed."""
    async for record in metadata.iter_tags():
        name = f"{record.upstream}/{record.repo}:{record.tag}"
        digests = await metadata.tag_digests(record.upstream, record.repo, record.tag)
        yield name, [record.digest, *(d for d in digests if d != record.digest)]
    async for ref in metadata.iter_refs():
        if not await metadata.tagged(ref.upstream, ref.repo, ref.digest):
            yield f"{ref.upstream}/{ref.repo}@{ref.digest}", [ref.digest]


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


def _row(*cells: str) -> None:
    name, rest = cells[0], cells[1:]
    print(f"{name:<48}  {rest[0]:<71}  {rest[1]:>9}  {rest[2]}".rstrip(), flush=True)


# -- commands --------------------------------------------------------------------------------


async def ls(store: Store) -> int:
    metadata = store.metadata
    _row("IMAGE", "DIGEST", "SIZE", "LAST USE")
    async for name, roots in images(metadata):
        size, used = 0, 0.0
        for digest in await closure(metadata, roots):
            record = await metadata.content(digest)
            if record is not None:
                size += record.size
                used = max(used, store.recency.pending.get(digest, record.used))
        _row(name, roots[0], human_bytes(size), _when(used or None))
    return 0


async def du(store: Store, settings: Settings) -> int:
    total, entries = await store.metadata.totals()
    if settings.max_cache_size is not None:
        budget, how = settings.max_cache_size, "max_cache_size"
    else:
        budget, how = default_budget(store, total), "default: 80 % of the room the cache has"
    partial = [p for p in store.tmp.iterdir() if p.name.endswith(".part")]
    partial_bytes = sum(_size_of(p) for p in partial)
    print(f"content  {human_bytes(total)} ({total} bytes) in {entries} entries")
    print(f"budget   {human_bytes(budget)} ({budget} bytes; {how}), "
          f"{100 * total / budget if budget else 0:.0f} % used")
    print(f"partial  {human_bytes(partial_bytes)} ({partial_bytes} bytes) in {len(partial)} "
          "downloads in progress or abandoned")
    return 0


async def rm(store: Store, settings: Settings, text: str) -> int:
    try:
        ref = await cacheops.parse_ref(store.metadata, settings.upstreams, text)
        removed, freed = await cacheops.forget(store, ref)
    except RefError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except cacheops.NotCached as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    print(f"removed {ref}: {removed} entries, {human_bytes(freed)}")
    return 0


async def each_ref(store: Store, settings: Settings, command: str, texts: list[str]) -> int:
    """`refresh`, `pin` or `unpin` of each reference; exit status 1 if any failed (2 if
    one does not parse)."""
    status = 0
    for text in texts:
        try:
            ref = await cacheops.parse_ref(store.metadata, settings.upstreams, text)
            if command == "refresh":
                dropped = await cacheops.refresh(store.metadata, ref)
                print(f"refreshed {ref}: " + (f"{len(dropped)} cached resolution(s) dropped; "
                      if dropped else "nothing was cached; ") + "the next pull asks upstream")
            elif command == "pin":
                print(f"pinned {ref}: {await cacheops.pin(store, ref)} entries")
            else:
                print(f"unpinned {ref}: {await cacheops.unpin(store, ref)} entries")
        except RefError as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            status = 2
        except cacheops.NotCached as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            status = max(status, 1)
    return status


async def gc(store: Store, min_age: float) -> int:
    metadata = store.metadata
    reach = cacheops.Reachability(metadata)
    now = time.time()
    removed = freed = 0
    batch: list[str] = []
    async for record in metadata.iter_content():
        used = max(store.recency.pending.get(record.digest, 0.0), record.used)
        if now - used < min_age or await reach.used(record.digest):
            continue
        batch.append(record.digest)
        if len(batch) >= 500:
            r, f = await cacheops.remove(store, batch)
            removed, freed, batch = removed + r, freed + f, []
    r, f = await cacheops.remove(store, batch)
    removed, freed = removed + r, freed + f
    # Strays: files nothing records. In an object store an unrecorded object may be content
    # whose record the metadata store lost (`verify` records it again): never removed here.
    strays = await _remove_strays(store, min_age) if store.remote is None else 0
    partials = store.cleanup_partials()
    locks = _remove_idle_locks(store)
    print(f"removed {removed} entries ({human_bytes(freed)}) no image uses, {strays} stray "
          f"files, {partials} abandoned partials, {locks} idle lock files")
    return 0


async def verify(store: Store) -> int:
    """Re-hash every file under blobs/ (streamed); remove bad ones, record unknown good ones."""
    if store.remote is not None:
        return await verify_objects(store)
    checked = bad = 0
    size = 0
    for entry in store.entries():
        reason: str | None = "not a content file (its path is no digest)"
        if entry.digest is not None:
            checked += 1
            size += entry.size
            reason = await asyncio.to_thread(_check, entry.path, entry.digest)
            if reason is None:
                record = await store.metadata.content(str(entry.digest))
                if record is None:  # good bytes nobody recorded (a crash mid-commit)
                    await store.metadata.add_content(str(entry.digest), entry.size, None,
                                                     entry.mtime)
        if reason is None:
            continue
        bad += 1
        print(f"bad: {entry.path}: {reason}; removed", flush=True)
        _discard(entry.path)
        if entry.digest is not None:
            await store.metadata.drop_content([str(entry.digest)])
    print(f"verified {checked} entries ({human_bytes(size)}): {bad} bad")
    return 1 if bad else 0


async def verify_objects(store: Store) -> int:
    """Re-hash every object in the object store (streamed); remove bad ones, and record good
    ones the metadata store lacks (after it was flushed, this rebuilds the content index)."""
    remote = store.remote
    assert remote is not None
    checked = bad = size = 0
    async for digest, length in remote.iter_content():
        checked += 1
        size += length
        if digest.algorithm not in ("sha256", "sha512"):
            continue
        hasher = hashlib.new(digest.algorithm)
        try:
            async for chunk in remote.read(digest):
                await asyncio.to_thread(hasher.update, chunk)
        except FileNotFoundError:
            continue  # removed meanwhile (evicted)
        if hasher.hexdigest() != digest.hex:
            bad += 1
            print(f"bad: {remote.key(digest)}: content hashes to {hasher.hexdigest()}; removed",
                  flush=True)
            await store.remove(digest)
        elif await store.metadata.content(str(digest)) is None:
            await store.metadata.add_content(str(digest), length, None, time.time())
    print(f"verified {checked} objects ({human_bytes(size)}): {bad} bad")
    return 1 if bad else 0


# -- helpers ---------------------------------------------------------------------------------


async def _remove_strays(store: Store, min_age: float) -> int:
    """Files under blobs/ with no content record, older than `min_age` (streamed walk)."""
    removed = 0
    now = time.time()
    for entry in store.entries():
        if now - entry.mtime < min_age:
            continue
        if entry.digest is not None and await store.metadata.content(str(entry.digest)):
            continue
        _discard(entry.path)
        removed += 1
    return removed


def _check(path: os.PathLike[str], digest: Digest) -> str | None:
    try:
        with open(path, "rb") as f:
            got = hashlib.file_digest(f, digest.algorithm).hexdigest()
    except FileNotFoundError:
        return None  # removed meanwhile (evicted): nothing to verify
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return None if got == digest.hex else f"content hashes to {digest.algorithm}:{got}"


def _discard(path: os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _remove_idle_locks(store: Store) -> int:
    """Lock files nobody holds (their holder died): taken, then released with removal."""
    removed = 0
    for path in store.locks.iterdir():
        if not path.name.endswith(".lock"):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > STALE_TMP:
                    path.unlink()
            continue
        lock = FillLock(path)
        if lock.acquire():
            lock.release(remove=True)
            removed += 1
    return removed


def _size_of(path: os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


closure = cacheops.closure  # for the callers that knew it here

__all__ = ["ImageRef", "add_parser", "closure", "images", "run"]
