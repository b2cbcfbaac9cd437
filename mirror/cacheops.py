"""Operations on one cached image, shared by `mirror cache ...` and the HTTP admin API
(`mirror.routes_admin`): refresh a tag, pin and unpin an image, forget it.

They change the cache only as a server does (metadata through its own operations, content
files by unlink), so they are safe while servers use the cache:

- `refresh` drops the tag's records and bumps the generation: every worker, and every
  replica sharing the metadata store, forgets what it remembers of tags, and the next pull
  of the tag asks the upstream.
- `pin` keeps the closure of the image (its manifests and blobs, as far as the cache knows
  them) from eviction, under the owner `str(ref)` (as `mirror seed` pins); `unpin` lets it
  go. Both go through `Store`, which keeps pins in the object store too.
- `forget` drops the image's tag (or digest) record and its pin, and removes the content
  that nothing else uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import cachetools

from mirror import imageref
from mirror.errors import RegistryError
from mirror.imageref import ImageRef, RefError
from mirror.metadata import Metadata
from mirror.reference import Digest, parse_digest
from mirror.settings import SettingsError, Upstream, parse_upstream
from mirror.store import Store

MEMO = 10_000  # reachability answers kept while collecting: bounded, whatever the cache


class NotCached(LookupError):
    """The image is not in the cache (nothing to pin or forget)."""


async def parse_ref(metadata: Metadata, upstreams: Sequence[Upstream], text: str) -> ImageRef:
    """Parse against the configured upstreams and those the cache names (by name or host)."""
    known = list(upstreams)
    names = {u.name for u in known}
    for name in await metadata.upstream_names():
        if name not in names:
            with contextlib.suppress(SettingsError):
                known.append(parse_upstream({"name": name, "url": f"https://{name}"}))
    return imageref.parse(text, known, known_only=False)


async def roots(metadata: Metadata, ref: ImageRef) -> list[str]:
    """The manifests the reference names in the cache: the tag's (every Accept set's), or
    the digest."""
    if ref.digest is not None:
        return [ref.digest]
    assert ref.tag is not None
    return await metadata.tag_digests(ref.upstream, ref.repo, ref.tag)


async def closure(metadata: Metadata, start: Iterable[str]) -> set[str]:
    """Every digest the root manifests lead to, by their recorded children."""
    seen: set[str] = set()
    pending = list(start)
    while pending:
        digest = pending.pop()
        if digest in seen:
            continue
        seen.add(digest)
        pending += await metadata.children(digest) or []
    return seen


class Reachability:
    """Whether a digest is in use: named by a root, or a child of a manifest in use.
    Answers are memoised in a bounded cache (constant memory, whatever the cache holds)."""

    def __init__(self, metadata: Metadata, ignore: Iterable[str] = ()) -> None:
        self.metadata = metadata
        self.ignore = set(ignore)  # manifests being removed: they keep nothing alive
        self._memo: cachetools.LRUCache[str, bool] = cachetools.LRUCache(MEMO)

    async def used(self, digest: str, depth: int = 0) -> bool:
        known = self._memo.get(digest)
        if known is not None:
            return known
        result = await self.metadata.named(digest)
        if not result and depth < 8:
            for parent in await self.metadata.parents(digest):
                if parent not in self.ignore and await self.used(parent, depth + 1):
                    result = True
                    break
        self._memo[digest] = result
        return result


def as_digest(text: str) -> Digest | None:
    try:
        return parse_digest(text)
    except RegistryError:
        return None


async def remove(store: Store, digests: Iterable[str]) -> tuple[int, int]:
    """Remove unpinned content; returns (entries, bytes) removed."""
    removed = freed = 0
    for text in digests:
        digest = as_digest(text)
        if digest is None or await store.metadata.pinned(text):
            continue
        size = store.size(digest)
        if size is None:
            await store.metadata.drop_content([text])
            continue
        await store.remove(digest)
        removed += 1
        freed += size
    return removed, freed


# -- the operations --------------------------------------------------------------------------


async def refresh(metadata: Metadata, ref: ImageRef) -> list[str]:
    """Forget the tag's resolutions everywhere; returns the digests its records named."""
    if ref.tag is None or ref.digest is not None:
        raise RefError(f"{ref}: refresh takes a tag (a digest never changes)")
    dropped = await metadata.drop_tag(ref.upstream, ref.repo, ref.tag)
    await metadata.bump_generation()  # every process drops what it remembers of tags
    return dropped


async def pin(store: Store, ref: ImageRef) -> int:
    """Pin what the cache knows of the image; returns the digests pinned."""
    found = await roots(store.metadata, ref)
    if not found:
        raise NotCached(f"{ref} is not in the cache (pull or seed it first)")
    digests = sorted(await closure(store.metadata, found))
    await store.pin(str(ref), digests)
    return len(digests)


async def unpin(store: Store, ref: ImageRef) -> int:
    """Drop the image's pin; returns the digests it had pinned."""
    released = await store.unpin(str(ref))
    if not released:
        raise NotCached(f"{ref} is not pinned")
    return len(released)


async def forget(store: Store, ref: ImageRef) -> tuple[int, int]:
    """Forget the image and remove the content only it used: (entries, bytes) removed."""
    metadata = store.metadata
    if ref.digest is not None and ref.tag is None:
        dropped = [ref.digest] if await metadata.drop_ref(ref.upstream, ref.repo,
                                                          ref.digest) else []
    else:
        assert ref.tag is not None
        dropped = await metadata.drop_tag(ref.upstream, ref.repo, ref.tag)
    if not dropped:
        raise NotCached(f"{ref} is not in the cache")
    await metadata.bump_generation()  # servers forget the tag too
    await store.unpin(str(ref))
    doomed = await closure(metadata, dropped)
    reach = Reachability(metadata, ignore=doomed)
    return await remove(store, [d for d in doomed if not await reach.used(d)])
