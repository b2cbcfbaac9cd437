"""The Redis metadata store's operations outside the cache's index: pins (what owners keep
in the cache), upload sessions and named locks."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from mirror.metadata.redis_client import RedisClient
from mirror.metadata.redis_keys import SEP, guarded, joined, score_text, under


class RedisSessions(RedisClient):
    """Pins, upload sessions and locks, on the store's server."""

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
