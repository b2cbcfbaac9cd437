"""The Redis metadata store's access facts: the secret identities are MACs under, links of
digests to repositories and callers' grants (`mirror.access` decides with them)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from mirror.metadata.base import Grant
from mirror.metadata.redis_client import RedisClient
from mirror.metadata.redis_keys import BATCH, SEP, grant_record, guarded, joined, score_text


class RedisAccess(RedisClient):
    """The secret, links and grants, on the store's server."""

    @guarded
    async def secret(self) -> bytes:
        key = self._key("secret")
        await self.client.set(key, secrets.token_hex(32), nx=True)  # the first one wins
        return bytes.fromhex(str(await self.client.get(key)))

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
