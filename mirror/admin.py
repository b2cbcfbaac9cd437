"""`mirror cache ls|du|rm|gc|verify`: look at and tidy a cache, safe while a server uses it.

They change the cache only the way a server does: content files go with unlink(2) (a
client already reading one keeps its descriptor and gets every byte; the next request
misses and fetches again), partials only under their fill lock (so never a running fill's),
lock files only while holding them, and the index through its own transactions.

What is in use: the roots are the tag records (every Accept set's), the images recorded by
digest (`ref`) and the pins; from each root manifest the walk follows index children and
image blobs. `gc` removes what no root reaches; since a pull in progress records its tag
before fetching what it names, it spares content used within `--min-age` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

from mirror import imageref, oci
from mirror.errors import RegistryError
from mirror.evict import default_budget
from mirror.imageref import ImageRef, RefError
from mirror.progress import human_bytes
from mirror.reference import Digest, parse_digest
from mirror.settings import Settings, SettingsError, load, parse_upstream
from mirror.store import STALE_TMP, FillLock, Store

GC_MIN_AGE = 600.0


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
        parser.add_argument("--config", metavar="FILE", help="TOML settings file")
        parser.add_argument("--cache-dir", metavar="DIR", help="where the cache lives")
    parsers["rm"].add_argument("image", metavar="IMAGE",
                               help="[UPSTREAM/]REPO[:TAG] or [UPSTREAM/]REPO@DIGEST")
    parsers["gc"].add_argument(
        "--min-age", metavar="SECONDS", type=float, default=GC_MIN_AGE,
        help=f"keep content used less than this long ago (default {GC_MIN_AGE:.0f})")


def run(args: argparse.Namespace) -> int:
    flags = {"config": args.config, "cache_dir": args.cache_dir}
    try:
        settings = load({k: v for k, v in flags.items() if v is not None})
    except SettingsError as exc:
        print(f"mirror: bad setting: {exc}", file=sys.stderr)
        return 2
    if not (settings.cache_dir / "blobs").is_dir():
        print(f"mirror: no cache in {settings.cache_dir}", file=sys.stderr)
        return 2
    store = Store(settings.cache_dir)
    try:
        command = args.cache_command
        if command == "ls":
            return ls(store)
        if command == "du":
            return du(store, settings)
        if command == "rm":
            return rm(store, settings, args.image)
        if command == "gc":
            return gc(store, args.min_age)
        return verify(store)
    finally:
        store.close()


# -- what uses what --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Image:
    name: str  # upstream/repo:tag or upstream/repo@digest
    digest: str  # the latest root manifest
    roots: tuple[str, ...]  # every manifest its records name (one per Accept set)


def images(store: Store) -> list[Image]:
    latest: dict[str, str] = {}
    roots: dict[str, set[str]] = {}
    for accept, record in store.index.tag_records():
        name = f"{record.upstream}/{record.repo}:{record.tag}"
        roots.setdefault(name, set()).add(record.digest)
        if accept is None:
            latest[name] = record.digest
    for upstream, repo, digest, _, _ in store.index.refs():
        name = f"{upstream}/{repo}@{digest}"
        latest[name], roots[name] = digest, {digest}
    return [Image(name, latest.get(name) or min(digests), tuple(sorted(digests)))
            for name, digests in sorted(roots.items())]


def reachable(store: Store, roots: Iterable[str]) -> set[str]:
    """Every digest the root manifests lead to (index children, configs and layers)."""
    seen: set[str] = set()
    manifests = list(roots)
    while manifests:
        text = manifests.pop()
        if text in seen:
            continue
        seen.add(text)
        digest = _digest(text)
        size = store.size(digest) if digest is not None else None
        if digest is None or size is None or size > oci.MAX_MANIFEST:
            continue  # absent, or a layer (pins name those too): leads nowhere
        data = store.read(digest)
        if data is None:
            continue
        try:
            doc = oci.load(data)
            if oci.is_index(doc):
                manifests += [d.digest for d in oci.children(doc)]
            else:
                seen.update(d.digest for d in oci.blobs(doc))
        except oci.ManifestError:
            continue  # not a manifest we can read: it leads nowhere
    return seen


def in_use(store: Store) -> set[str]:
    return reachable(store, [*(r for i in images(store) for r in i.roots), *store.index.pins()])


def _digest(text: str) -> Digest | None:
    try:
        return parse_digest(text)
    except RegistryError:
        return None


def _sizes(store: Store, digests: Iterable[str]) -> int:
    total = 0
    for text in digests:
        digest = _digest(text)
        size = store.size(digest) if digest is not None else None
        total += size or 0
    return total


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


# -- commands --------------------------------------------------------------------------------


def ls(store: Store) -> int:
    rows: list[tuple[str, ...]] = [("IMAGE", "DIGEST", "SIZE", "LAST USE")]
    for image in images(store):
        digests = reachable(store, image.roots)
        used = [store.recency.last_used(d) for d in digests]
        rows.append((image.name, image.digest, human_bytes(_sizes(store, digests)),
                     _when(max((u for u in used if u), default=None))))
    _table(rows)
    return 0


def du(store: Store, settings: Settings) -> int:
    entries = [e for e in store.entries() if e.digest is not None]
    total = sum(e.size for e in entries)
    if settings.max_cache_size is not None:
        budget, how = settings.max_cache_size, "max_cache_size"
    else:
        budget, how = default_budget(store, total), "default: 80 % of the room the cache has"
    partial = [p for p in store.tmp.iterdir() if p.name.endswith(".part")]
    partial_bytes = sum(_size_of(p) for p in partial)
    print(f"content  {human_bytes(total)} ({total} bytes) in {len(entries)} entries")
    print(f"budget   {human_bytes(budget)} ({budget} bytes; {how}), "
          f"{100 * total / budget if budget else 0:.0f} % used")
    print(f"partial  {human_bytes(partial_bytes)} ({partial_bytes} bytes) in {len(partial)} "
          "downloads in progress or abandoned")
    return 0


def rm(store: Store, settings: Settings, text: str) -> int:
    try:
        ref = _parse_ref(store, settings, text)
    except RefError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    index = store.index
    if ref.digest is not None and ref.tag is None:
        found = [ref.digest] if any(
            (u, r, d) == (ref.upstream, ref.repo, ref.digest) for u, r, d, _, _ in index.refs()
        ) else []
        if found:
            index.drop_ref(ref.upstream, ref.repo, ref.digest)
    else:
        found = [record.digest for _, record in index.tag_records()
                 if (record.upstream, record.repo, record.tag) == (ref.upstream, ref.repo, ref.tag)]
        if found:
            assert ref.tag is not None
            index.drop_tag(ref.upstream, ref.repo, ref.tag)
    if not found:
        print(f"mirror: {ref} is not in the cache", file=sys.stderr)
        return 1
    keep = in_use(store)
    removed, freed = _remove(store, reachable(store, found) - keep)
    print(f"removed {ref}: {removed} entries, {human_bytes(freed)}")
    return 0


def gc(store: Store, min_age: float) -> int:
    keep = in_use(store)
    now = time.time()
    doomed = []
    for entry in store.entries():
        if entry.digest is None or str(entry.digest) in keep:
            continue
        used = max(store.recency.last_used(str(entry.digest)) or 0.0, entry.mtime)
        if now - used >= min_age:
            doomed.append(str(entry.digest))
    removed, freed = _remove(store, doomed)
    partials = store.cleanup_partials()
    locks = _remove_idle_locks(store)
    print(f"removed {removed} entries ({human_bytes(freed)}) no image uses, "
          f"{partials} abandoned partials, {locks} idle lock files")
    return 0


def verify(store: Store) -> int:
    checked = bad = 0
    size = 0
    for entry in store.entries():
        reason: str | None = "not a content file (its path is no digest)"
        if entry.digest is not None:
            checked += 1
            size += entry.size
            reason = _check(entry.path, entry.digest)
        if reason is None:
            continue
        bad += 1
        print(f"bad: {entry.path}: {reason}; removed")
        _discard(entry.path, entry.digest, store)
    print(f"verified {checked} entries ({human_bytes(size)}): {bad} bad")
    return 1 if bad else 0


# -- helpers ---------------------------------------------------------------------------------


def _parse_ref(store: Store, settings: Settings, text: str) -> ImageRef:
    """Parse against the configured upstreams and those the index names (by name or host)."""
    upstreams = list(settings.upstreams)
    known = {u.name for u in upstreams}
    names = {r.upstream for r in store.index.tags()} | {u for u, *_ in store.index.refs()}
    for name in sorted(names - known):
        with contextlib.suppress(SettingsError):
            upstreams.append(parse_upstream({"name": name, "url": f"https://{name}"}))
    return imageref.parse(text, upstreams, known_only=False)


def _remove(store: Store, digests: Iterable[str]) -> tuple[int, int]:
    removed = freed = 0
    for text in digests:
        digest = _digest(text)
        if digest is None or store.index.pinned(text):
            continue
        path = store.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        store.index.forget_use(text)
        removed += 1
        freed += size
    return removed, freed


def _check(path: os.PathLike[str], digest: Digest) -> str | None:
    try:
        with open(path, "rb") as f:
            got = hashlib.file_digest(f, digest.algorithm).hexdigest()
    except FileNotFoundError:
        return None  # removed meanwhile (evicted): nothing to verify
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return None if got == digest.hex else f"content hashes to {digest.algorithm}:{got}"


def _discard(path: os.PathLike[str], digest: Digest | None, store: Store) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    if digest is not None:
        store.index.forget_use(str(digest))


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


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
