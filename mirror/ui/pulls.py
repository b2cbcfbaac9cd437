"""Pull counts: how often each tag was pulled, for the cache browser's "most pulled".

A pull is a manifest request by tag (GET or HEAD) answered 200: docker, podman, skopeo and
containerd resolve a tag once per pull, then fetch by digest. Requests by digest are not
counted: an index's platform manifests are fetched by digest too, so they cannot tell a
pull. Counting costs no write per request: `PullCounter` (an ASGI middleware) adds to a
batch in memory that `PullBatch.run` writes to the metadata store every `FLUSH_EVERY`
seconds and when the process stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mirror.metadata import Metadata
from mirror.reference import is_digest

log = logging.getLogger("mirror.ui")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MANIFEST_ROUTE = "/v2/{name:path}/manifests/{reference}"  # mirror.routes.Handlers'
FLUSH_EVERY = 5.0
MAX_PENDING = 10_000  # distinct tags held before an early write: memory stays bounded

Key = tuple[str, str, str]  # (upstream, repository, tag)


class PullBatch:
    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self.pending: dict[Key, int] = {}

    def count(self, upstream: str, repo: str, tag: str) -> None:
        key = (upstream, repo, tag)
        self.pending[key] = self.pending.get(key, 0) + 1

    @property
    def full(self) -> bool:
        return len(self.pending) >= MAX_PENDING

    async def flush(self) -> int:
        """Write the batch now; returns how many tags it held. Best effort: a batch the
        store refuses is dropped (counts are a statistic, not a record to keep)."""
        batch, self.pending = self.pending, {}
        if not batch:
            return 0
        try:
            await self.metadata.add_pulls(batch)
        except Exception as exc:
            log.warning("could not record %d pull counts: %r", len(batch), exc)
        return len(batch)

    async def run(self, every: float = FLUSH_EVERY) -> None:
        try:
            while True:
                await asyncio.sleep(every)
                await self.flush()
        finally:  # the app is stopping: what was counted since the last write goes too
            await self.flush()


class PullCounter:
    """Counts the pulls `mirror.routes` answers; sees only the status and the route."""

    def __init__(self, app: ASGIApp, pulls: PullBatch) -> None:
        self.app = app
        self.pulls = pulls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in ("GET", "HEAD")
                or "/manifests/" not in scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        status = 0

        async def watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watching)
        if status == 200:
            self._count(scope)
            if self.pulls.full:
                await self.pulls.flush()

    def _count(self, scope: Scope) -> None:
        route = scope.get("route")
        if getattr(route, "path", None) != MANIFEST_ROUTE:
            return
        reference = str((scope.get("path_params") or {}).get("reference", ""))
        target = (scope.get("state") or {}).get("target")  # set by the route: (client, repo)
        if not reference or is_digest(reference) or not target or not target[1]:
            return
        client, repo = target
        self.pulls.count(client.name, repo, reference)
