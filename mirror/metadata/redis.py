"""The shared metadata store: one Redis server (or a primary with replicas) for every replica.

Every operation reads or writes only the keys it names; listings walk sorted sets a page at
a time. Operations that change more than one key run as one Lua script or one MULTI/EXEC
transaction, so indexes and totals never drift, also under concurrent callers. Some scripts
derive per-digest key names from the prefix, so the store needs a standalone Redis (with
replicas or Sentinel if wanted), not Redis Cluster.

Key layout (P the prefix, "\\0" between names: no upstream, repository, tag, digest,
identity, owner or id holds one; `joined` refuses names that do):

    P schema                 string   layout version
    P secret                 string   the installation's MAC key (hex)
    P generation             string   counter (INCR)
    P tag\\0U\\0R\\0T           hash     Accept text ("-": latest) -> record JSON
    P tags\\0U\\0R              zset     tag names (score 0: lexical order)
    P repos                  zset     "U\\0R" with a tag or a ref (score 0)
    P names\\0D                zset     "t\\0U\\0R\\0T" tags and "r\\0U\\0R" refs naming D
    P refs                   hash     "U\\0R\\0D" -> ref JSON
    P refnames               zset     "U\\0R\\0D" (score 0)
    P manifests              hash     D -> media type
    P children\\0D / parents\\0D set      what manifest D names / the manifests naming D
    P sizes                  hash     D -> size of committed content
    P used                   zset     D, score = last use (LRU order)
    P content                zset     D (score 0: digest order)
    P totals                 hash     bytes, entries
    P holders\\0D              set      upstreams holding D
    P links\\0U\\0R             set      digests linked to the repository
    P grants\\0U\\0R            hash     identity -> {"at": ..., "durable": ...}
    P transient              zset     "U\\0R\\0I" of grants that are not durable, score = at
    P pins                   zset     "O\\0D" (score 0)
    P pinners\\0D              set      owners pinning D
    P pushed                 hash     "U\\0R\\0T" -> time of the last push
    P upload\\0ID              string   session JSON, expiring at the session's end
    P uploads                zset     ID, score = expiry
    P lock\\0NAME              string   owner, expiring with the lease
    P pulls                  zset     "U\\0R\\0T" of a recorded tag, score = its pull count
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import (
    AsyncIterator,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

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
from mirror.metadata.redis_keys import (
    BATCH,
    NEXT,
    SEP,
    Scored,
    chunks,
    grant_record,
    guarded,
    joined,
    lex_after,
    pairs,
    ref_record,
    score_text,
    tag_record,
    tag_value,
    under,
    where,
)
from mirror.metadata.redis_scripts import Scripts
from mirror.metadata.sqlite import accept_text

SCHEMA_VERSION = 1
MAX_CONNECTIONS = 64  # per process; a request waits for one rather than failing
POOL_TIMEOUT = 5.0  # seconds to wait for a free connection before giving up
SOCKET_TIMEOUT = 10.0
LATEST = accept_text(None)

class RedisMetadata(Metadata):
    def __init__(self, url: str, prefix: str = "mirror:", *,
                 max_connections: int = MAX_CONNECTIONS,
                 pool_timeout: float = POOL_TIMEOUT) -> None:
        """`prefix` starts every key (several installations may share one server)."""
        self.url = url
        self.prefix = prefix
        self.max_connections = max_connections
        self.pool_timeout = pool_timeout
        self._client: aioredis.Redis | None = None
        self._scripts: Scripts | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=self.max_connections, timeout=self.pool_timeout,
            decode_responses=True, socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            # A few quick retries ride out a dropped connection (every write has the same
            # effect when repeated); a server that is down fails the call within a second.
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), 3))
        client = aioredis.Redis.from_pool(pool)
        self._client, self._scripts = client, Scripts.register(client)
        try:
            await self._check_schema()
        except BaseException:
            await self.close()
            raise

    @guarded
    async def _check_schema(self) -> None:
        key = self._key("schema")
        await self.client.set(key, SCHEMA_VERSION, nx=True)
        version = int(await self.client.get(key) or 0)
        if version > SCHEMA_VERSION:
            raise MetadataError(
                f"{where(self.url)}: metadata layout version {version} is newer than this "
                f"release's ({SCHEMA_VERSION}); upgrade mirror to use it")

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise MetadataError("metadata store is not open")
        return self._client

    @property
    def scripts(self) -> Scripts:
        if self._scripts is None:
            raise MetadataError("metadata store is not open")
        return self._scripts

    async def close(self) -> None:
        client, self._client, self._scripts = self._client, None, None
        if client is not None:
            await client.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (rx.RedisError, OSError, MetadataError):
            return False

    @guarded
    async def secret(self) -> bytes:
        key = self._key("secret")
        await self.client.set(key, secrets.token_hex(32), nx=True)  # the first one wins
        return bytes.fromhex(str(await self.client.get(key)))

    # -- keys ------------------------------------------------------------------------------

    def _key(self, kind: str, *names: str) -> str:
        return self.prefix + kind + (SEP + joined(*names) if names else "")

    # -- pages -----------------------------------------------------------------------------

    @guarded
    async def _lex_page(self, key: str, lo: str, hi: str, limit: int) -> list[str]:
        return [str(m) for m in await self.client.zrangebylex(key, lo, hi, 0, limit)]

    async def _lex_pages(self, key: str, lo: str, hi: str = "+") -> AsyncIterator[list[str]]:
        """Members of a lexically ordered sorted set within ZRANGEBYLEX bounds, by page."""
        while True:
            page = await self._lex_page(key, lo, hi, PAGE)
            if page:
                yield page
            if len(page) < PAGE:
                return
            lo = "(" + page[-1]

    @guarded
    async def _score_page(self, key: str, start: tuple[str, str], below: float,
                          limit: int) -> Scored:
        score, member = start
        rows = await self.scripts.page_by_score(
            keys=[key], args=[score, member, score_text(below), limit])
        return pairs(list(rows))

    async def _score_pages(self, key: str, below: float,
                           start: tuple[str, str] = ("", "")) -> AsyncIterator[Scored]:
        """(member, score) pairs after `start`, scored below `below`, in (score, member)
        order, by page; entries removed meanwhile do not disturb the order."""
        while True:
            page = await self._score_page(key, start, below, PAGE)
            if page:
                yield page
            if len(page) < PAGE:
                return
            start = (score_text(page[-1][1]), page[-1][0])

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

    # -- access facts ----------------------------------------------------------------------

    @guarded
    async def link(self, upstream: str, repo: str, digests: Iterable[str]) -> None:
        wanted = list(digests)
        if wanted:
            await self.client.sadd(self._key("links", upstream, repo), *wanted)

    @guarded
    async def unlink(self, upstream: str, repo: str, digest: str) -> None:
        await self.client.srem(self._key("links", upstream, repo), digest)

    @guarded
    async def linked(self, upstream: str, repo: str, digest: str) -> bool:
        return bool(await self.client.sismember(self._key("links", upstream, repo), digest))

    @guarded
    async def grant(self, grant: Grant) -> None:
        g = grant
        await self.scripts.grant(
            keys=[self._key("grants", g.upstream, g.repo), self._key("transient")],
            args=[g.identity, score_text(g.at), int(g.durable),
                  joined(g.upstream, g.repo, g.identity)])

    @guarded
    async def granted(self, upstream: str, repo: str, identity: str) -> Grant | None:
        value = await self.client.hget(self._key("grants", upstream, repo), identity)
        return None if value is None else grant_record(upstream, repo, identity, value)

    @guarded
    async def revoke(self, upstream: str, repo: str, identity: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self._key("grants", upstream, repo), identity)
            pipe.zrem(self._key("transient"), joined(upstream, repo, identity))
            await pipe.execute()

    @guarded
    async def prune_grants(self, before: float) -> int:
        key = self._key("transient")
        removed = 0
        while True:  # each step removes what it read (or it was renewed): the range shrinks
            members = [str(m) for m in await self.client.zrangebyscore(
                key, "-inf", "(" + score_text(before), 0, BATCH)]
            if members:
                names = [m.rsplit(SEP, 1) for m in members]
                removed += int(await self.scripts.prune_grants(
                    keys=[key, *(self._key("grants", *n[0].split(SEP)) for n in names)],
                    args=[score_text(before), *members, *(n[1] for n in names)]))
            if len(members) < BATCH:
                return removed

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

    # -- pins ------------------------------------------------------------------------------

    @guarded
    async def pin(self, owner: str, digests: Iterable[str]) -> None:
        wanted = sorted(set(digests))
        if not wanted:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zadd(self._key("pins"), {joined(owner, d): 0 for d in wanted})
            for digest in wanted:
                pipe.sadd(self._key("pinners", digest), owner)
            await pipe.execute()

    @guarded
    async def unpin(self, owner: str) -> list[str]:
        digests = await self.scripts.unpin(
            keys=[self._key("pins")],
            args=[self._key("pinners") + SEP, owner, *under(owner)])
        return sorted(str(d) for d in digests)

    @guarded
    async def pinned(self, digest: str) -> bool:
        return bool(await self.client.exists(self._key("pinners", digest)))

    async def iter_pins(self) -> AsyncIterator[tuple[str, str]]:
        async for members in self._lex_pages(self._key("pins"), "-"):
            for member in members:
                owner, digest = member.split(SEP)
                yield owner, digest

    # -- uploads ---------------------------------------------------------------------------

    @guarded
    async def put_upload(self, upload_id: str, data: Mapping[str, Any], expires: float) -> None:
        key, index = self._key("upload", upload_id), self._key("uploads")
        async with self.client.pipeline(transaction=True) as pipe:
            if expires > time.time():
                pipe.set(key, json.dumps(dict(data)), pxat=math.ceil(expires * 1000))
                pipe.zadd(index, {upload_id: expires})
            else:  # over already: as good as gone
                pipe.delete(key)
                pipe.zrem(index, upload_id)
            pipe.zremrangebyscore(index, "-inf", "(" + score_text(time.time()))
            await pipe.execute()

    @guarded
    async def get_upload(self, upload_id: str) -> dict[str, Any] | None:
        value = await self.client.get(self._key("upload", upload_id))
        return None if value is None else dict(json.loads(value))

    @guarded
    async def drop_upload(self, upload_id: str) -> None:
        index = self._key("uploads")
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key("upload", upload_id))
            pipe.zrem(index, upload_id)
            pipe.zremrangebyscore(index, "-inf", "(" + score_text(time.time()))  # expired
            await pipe.execute()

    async def iter_uploads(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        now = time.time()
        start = (score_text(now), "")  # sessions that end later than now
        async for page in self._score_pages(self._key("uploads"), math.inf, start):
            for upload_id, data in await self._uploads([i for i, e in page if e > now]):
                yield upload_id, data

    @guarded
    async def _uploads(self, ids: list[str]) -> list[tuple[str, dict[str, Any]]]:
        if not ids:
            return []
        values = await self.client.mget([self._key("upload", i) for i in ids])
        return [(upload_id, dict(json.loads(value)))
                for upload_id, value in zip(ids, values, strict=True) if value is not None]

    # -- locks -----------------------------------------------------------------------------

    @guarded
    async def acquire(self, name: str, owner: str, lease: float) -> bool:
        millis = max(1, math.ceil(lease * 1000))
        return bool(await self.scripts.acquire(keys=[self._key("lock", name)],
                                               args=[owner, millis]))

    @guarded
    async def release(self, name: str, owner: str) -> None:
        await self.scripts.release(keys=[self._key("lock", name)], args=[owner])

    @guarded
    async def holder(self, name: str) -> str | None:
        value = await self.client.get(self._key("lock", name))
        return None if value is None else str(value)
