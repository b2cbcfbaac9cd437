"""The shared metadata store: one Redis server (or a primary with replicas) for every replica.

Every operation reads or writes only the keys it names (`mirror.metadata.redis_keys` gives
the layout); listings walk sorted sets a page at a time (`mirror.metadata.redis_client`).
Operations that change more than one key run as one Lua script or one MULTI/EXEC
transaction, so indexes and totals never drift, also under concurrent callers. Some scripts
derive per-digest key names from the prefix, so the store needs a standalone Redis (with
replicas or Sentinel if wanted), not Redis Cluster.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

from mirror.metadata.base import (
    PAGE,
    AcceptKey,
    ContentRecord,
    Metadata,
    PullCount,
    RefRecord,
    TagRecord,
    accept_text,
)
from mirror.metadata.redis_access import RedisAccess
from mirror.metadata.redis_keys import (
    BATCH,
    NEXT,
    SEP,
    Scored,
    chunks,
    guarded,
    joined,
    lex_after,
    ref_record,
    score_text,
    tag_record,
    tag_value,
    under,
)
from mirror.metadata.redis_sessions import RedisSessions

LATEST = accept_text(None)


class RedisMetadata(RedisSessions, RedisAccess, Metadata):
    """The interface's operations on the cache's index and counters (access facts:
    `RedisAccess`; pins, uploads and locks: `RedisSessions`)."""

    # -- manifests -------------------------------------------------------------------------

    @guarded
    async def add_manifest(self, digest: str, media_type: str, children: Iterable[str]) -> None:
        kids = sorted(set(children))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("manifests"), digest, media_type)
            if kids:
                pipe.sadd(self._key("children", digest), *kids)
            for kid in kids:
                pipe.sadd(self._key("parents", kid), digest)
            await pipe.execute()

    @guarded
    async def media_type(self, digest: str) -> str | None:
        value = await self.client.hget(self._key("manifests"), digest)
        return None if value is None else str(value)

    @guarded
    async def children(self, digest: str) -> list[str] | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hexists(self._key("manifests"), digest)
            pipe.smembers(self._key("children", digest))
            known, kids = await pipe.execute()
        return sorted(kids) if known else None

    @guarded
    async def parents(self, digest: str) -> list[str]:
        return sorted(str(p) for p in await self.client.smembers(self._key("parents", digest)))

    # -- content ---------------------------------------------------------------------------

    def _content_keys(self) -> list[str]:
        return [self._key("sizes"), self._key("used"), self._key("content"),
                self._key("totals")]

    @guarded
    async def add_content(self, digest: str, size: int, holder: str | None, at: float) -> bool:
        args: list[str | int] = [digest, size, score_text(at)]
        if holder is not None:
            args.append(holder)
        new = await self.scripts.add_content(
            keys=[*self._content_keys(), self._key("holders", digest)], args=args)
        return bool(new)

    @guarded
    async def content(self, digest: str) -> ContentRecord | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(self._key("sizes"), digest)
            pipe.zscore(self._key("used"), digest)
            size, used = await pipe.execute()
        if size is None or used is None:
            return None
        return ContentRecord(digest, int(size), float(used))

    async def contents(self, digests: Sequence[str]) -> dict[str, ContentRecord]:
        wanted = list(dict.fromkeys(digests))[:PAGE]
        return {r.digest: r for r in await self._records(wanted)} if wanted else {}

    @guarded
    async def drop_content(self, digests: Iterable[str]) -> int:
        freed = 0
        for batch in chunks(list(digests)):
            holders = [self._key("holders", d) for d in batch]
            freed += int(await self.scripts.drop_content(
                keys=[*self._content_keys(), *holders], args=batch))
        return freed

    @guarded
    async def totals(self) -> tuple[int, int]:
        total, entries = await self.client.hmget(self._key("totals"), ["bytes", "entries"])
        return int(total or 0), int(entries or 0)

    async def oldest(self, before: float) -> AsyncIterator[ContentRecord]:
        async for page in self._score_pages(self._key("used"), before):
            for record in await self._unpinned(page):
                yield record

    @guarded
    async def _unpinned(self, page: Scored) -> list[ContentRecord]:
        """The page's content that is still recorded and not pinned."""
        digests = [digest for digest, _ in page]
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self._key("sizes"), digests)
            for digest in digests:
                pipe.exists(self._key("pinners", digest))
            sizes, *pins = await pipe.execute()
        return [ContentRecord(digest, int(size), used)
                for (digest, used), size, pinned in zip(page, sizes, pins, strict=True)
                if size is not None and not pinned]

    async def iter_content(self, after: str = "") -> AsyncIterator[ContentRecord]:
        async for page in self._lex_pages(self._key("content"), lex_after(after)):
            for record in await self._records(page):
                yield record

    @guarded
    async def _records(self, digests: list[str]) -> list[ContentRecord]:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hmget(self._key("sizes"), digests)
            pipe.zmscore(self._key("used"), digests)
            sizes, uses = await pipe.execute()
        return [ContentRecord(digest, int(size), float(used))
                for digest, size, used in zip(digests, sizes, uses, strict=True)
                if size is not None and used is not None]

    @guarded
    async def touch(self, uses: Mapping[str, float]) -> None:
        items = list(uses.items())
        for i in range(0, len(items), BATCH):
            # XX: only recorded content; GT: a later use recorded elsewhere stays
            await self.client.zadd(self._key("used"), dict(items[i:i + BATCH]), xx=True,
                                   gt=True)

    @guarded
    async def add_holder(self, digest: str, upstream: str) -> None:
        await self.client.sadd(self._key("holders", digest), upstream)

    @guarded
    async def holds(self, upstream: str, digest: str) -> bool:
        return bool(await self.client.sismember(self._key("holders", digest), upstream))

    # -- tags ------------------------------------------------------------------------------

    @guarded
    async def tag(self, upstream: str, repo: str, tag: str,
                  accept: AcceptKey | None) -> TagRecord | None:
        value = await self.client.hget(self._key("tag", upstream, repo, tag),
                                       accept_text(accept))
        return None if value is None else tag_record(upstream, repo, tag, value)

    @guarded
    async def set_tag(self, record: TagRecord, accept: AcceptKey | None) -> None:
        r = record
        fields = [LATEST] if accept is None else [accept_text(accept), LATEST]
        await self.scripts.set_tag(
            keys=[self._key("tag", r.upstream, r.repo, r.tag),
                  self._key("tags", r.upstream, r.repo), self._key("repos")],
            args=[self._key("names") + SEP, r.tag, joined(r.upstream, r.repo),
                  joined("t", r.upstream, r.repo, r.tag), r.digest, tag_value(r), *fields])

    @guarded
    async def drop_tag(self, upstream: str, repo: str, tag: str) -> list[str]:
        digests = await self.scripts.drop_tag(
            keys=[self._key("tag", upstream, repo, tag), self._key("tags", upstream, repo),
                  self._key("repos"), self._key("refnames"), self._key("pulls")],
            args=[self._key("names") + SEP, tag, joined(upstream, repo),
                  joined("t", upstream, repo, tag), *under(upstream, repo),
                  joined(upstream, repo, tag)])
        return sorted(str(d) for d in digests)

    @guarded
    async def tag_digests(self, upstream: str, repo: str, tag: str) -> list[str]:
        values = await self.client.hvals(self._key("tag", upstream, repo, tag))
        return sorted({str(json.loads(v)["digest"]) for v in values})

    @guarded
    async def repo_tags(self, upstream: str, repo: str, after: str = "",
                        limit: int = PAGE) -> list[TagRecord]:
        tags = await self._lex_page(self._key("tags", upstream, repo),
                                    lex_after(after), "+", limit)
        return await self._latest(upstream, repo, tags)

    @guarded
    async def _latest(self, upstream: str, repo: str, tags: list[str]) -> list[TagRecord]:
        """The latest records of `tags`, in their order (a tag dropped meanwhile is left)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for tag in tags:
                pipe.hget(self._key("tag", upstream, repo, tag), LATEST)
            values = await pipe.execute()
        return [tag_record(upstream, repo, tag, value)
                for tag, value in zip(tags, values, strict=True) if value is not None]

    async def iter_tags(self) -> AsyncIterator[TagRecord]:
        async for repos in self._lex_pages(self._key("repos"), "-"):
            for member in repos:
                upstream, repo = member.split(SEP)
                async for tags in self._lex_pages(self._key("tags", upstream, repo), "-"):
                    for record in await self._latest(upstream, repo, tags):
                        yield record

    @guarded
    async def tagged(self, upstream: str, repo: str, digest: str) -> bool:
        lo, hi = under("t", upstream, repo)
        return bool(await self.client.zrangebylex(self._key("names", digest), lo, hi, 0, 1))

    @guarded
    async def tags_naming(self, upstream: str, repo: str, digest: str) -> list[str]:
        lo, hi = under("t", upstream, repo)
        members = await self.client.zrangebylex(self._key("names", digest), lo, hi)
        return sorted({str(m).rpartition(SEP)[2] for m in members})

    @guarded
    async def named(self, digest: str) -> bool:
        return bool(await self.client.exists(self._key("names", digest),
                                             self._key("pinners", digest)))

    # -- pull counts -----------------------------------------------------------------------

    @guarded
    async def add_pulls(self, pulls: Mapping[tuple[str, str, str], int]) -> None:
        items = [(key, n) for key, n in pulls.items() if n > 0]
        for start in range(0, len(items), BATCH):
            batch = items[start:start + BATCH]
            await self.scripts.add_pulls(
                keys=[self._key("pulls"), *(self._key("tag", *key) for key, _ in batch)],
                args=[*(joined(*key) for key, _ in batch), *(n for _, n in batch)])

    @guarded
    async def pulls(self, upstream: str, repo: str, tags: Sequence[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(tags))[:PAGE]
        if not wanted:
            return {}
        scores = await self.client.zmscore(self._key("pulls"),
                                           [joined(upstream, repo, t) for t in wanted])
        return {tag: int(score) for tag, score in zip(wanted, scores, strict=True)
                if score is not None}

    @guarded
    async def most_pulled(self, limit: int, offset: int = 0) -> list[PullCount]:
        if limit <= 0:
            return []
        rows: list[Any] = await self.client.zrevrange(
            self._key("pulls"), offset, offset + limit - 1, withscores=True)
        out = []
        for row in rows:
            names = str(row[0]).split(SEP)
            out.append(PullCount(names[0], names[1], names[2], int(row[1])))
        return out

    # -- refs ------------------------------------------------------------------------------

    @guarded
    async def add_ref(self, record: RefRecord) -> None:
        r = record
        member = joined(r.upstream, r.repo, r.digest)
        value = json.dumps({"media_type": r.media_type, "size": r.size}, separators=(",", ":"))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("refs"), member, value)
            pipe.zadd(self._key("refnames"), {member: 0})
            pipe.zadd(self._key("names", r.digest), {joined("r", r.upstream, r.repo): 0})
            pipe.zadd(self._key("repos"), {joined(r.upstream, r.repo): 0})
            await pipe.execute()

    @guarded
    async def ref(self, upstream: str, repo: str, digest: str) -> RefRecord | None:
        member = joined(upstream, repo, digest)
        value = await self.client.hget(self._key("refs"), member)
        return None if value is None else ref_record(member, value)

    @guarded
    async def drop_ref(self, upstream: str, repo: str, digest: str) -> bool:
        gone = await self.scripts.drop_ref(
            keys=[self._key("refs"), self._key("tags", upstream, repo), self._key("repos"),
                  self._key("refnames"), self._key("names", digest)],
            args=[joined(upstream, repo, digest), joined("r", upstream, repo),
                  joined(upstream, repo), *under(upstream, repo)])
        return bool(gone)

    async def iter_refs(self) -> AsyncIterator[RefRecord]:
        async for members in self._lex_pages(self._key("refnames"), "-"):
            for record in await self._refs(members):
                yield record

    @guarded
    async def _refs(self, members: list[str]) -> list[RefRecord]:
        values = await self.client.hmget(self._key("refs"), members)
        return [ref_record(member, value)
                for member, value in zip(members, values, strict=True) if value is not None]

    # -- pushes ----------------------------------------------------------------------------

    @guarded
    async def set_pushed(self, upstream: str, repo: str, tag: str, at: float) -> None:
        await self.client.hset(self._key("pushed"), joined(upstream, repo, tag),
                               score_text(at))

    @guarded
    async def pushed(self, upstream: str, repo: str, tag: str) -> float:
        value = await self.client.hget(self._key("pushed"), joined(upstream, repo, tag))
        return 0.0 if value is None else float(value)

    @guarded
    async def generation(self) -> int:
        return int(await self.client.get(self._key("generation")) or 0)

    @guarded
    async def bump_generation(self) -> int:
        return int(await self.client.incr(self._key("generation")))

    @guarded
    async def upstream_names(self) -> list[str]:
        # A skip scan of the repos: one probe per distinct upstream.
        names: list[str] = []
        lo = "-"
        while first := await self.client.zrangebylex(self._key("repos"), lo, "+", 0, 1):
            names.append(str(first[0]).split(SEP)[0])
            lo = "[" + names[-1] + NEXT
        return names

    async def iter_repos(self, upstream: str, after: str = "") -> AsyncIterator[str]:
        lo = "(" + joined(upstream, after)
        hi = under(upstream)[1]
        skip = len(upstream) + 1
        async for members in self._lex_pages(self._key("repos"), lo, hi):
            for member in members:
                yield member[skip:]
