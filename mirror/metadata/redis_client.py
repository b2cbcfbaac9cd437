"""The Redis metadata store's connection: the pool, the check of the layout version at
open, key naming under the prefix, and the paged walks of sorted sets the listings use."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from mirror.metadata.base import PAGE, MetadataError
from mirror.metadata.redis_keys import SEP, Scored, guarded, joined, pairs, score_text, where
from mirror.metadata.redis_scripts import Scripts

SCHEMA_VERSION = 1
MAX_CONNECTIONS = 64  # per process; a request waits for one rather than failing
POOL_TIMEOUT = 5.0  # seconds to wait for a free connection before giving up
SOCKET_TIMEOUT = 10.0


class RedisClient:
    """A store's client: opened once, closed once; `_key` names keys under the prefix."""

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
