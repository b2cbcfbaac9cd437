"""The route replicas use among themselves: stream a fill in progress (or the content it
became) to another replica whose clients follow it (`mirror.cluster`). Callers prove they
are replicas of this cluster with a MAC under the shared installation secret; nothing else
reaches it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mirror import errors
from mirror.cluster import PEER_HEADER, ROUTE, SIZE_HEADER, Cluster
from mirror.fills import Fills
from mirror.ranges import parse_range
from mirror.reference import parse_digest
from mirror.zerocopy import BlobResponse


class InternalHandlers:
    def __init__(self, fills: Fills, cluster: Cluster) -> None:
        self.fills = fills
        self.cluster = cluster

    def routes(self) -> list[Route]:
        return [Route(ROUTE + "{digest}", self.fill, methods=["GET"])]

    async def fill(self, request: Request) -> Response:
        digest = parse_digest(request.path_params["digest"])
        if not await self.cluster.verify(digest, request.headers.get(PEER_HEADER)):
            raise errors.Denied("not a replica of this cluster")
        reader = await self.fills.serve_peer(digest)
        if reader is None:
            raise errors.BlobUnknown(f"no download of {digest} here")
        headers: dict[str, str] = {}
        status, start, end = 200, 0, reader.size
        if reader.size is not None:
            headers[SIZE_HEADER] = str(reader.size)
            try:
                span = parse_range(request.headers.get("range"), reader.size)
            except errors.RangeInvalid:
                reader.close()
                raise
            if span is not None:
                status, (start, end) = 206, span
            assert end is not None
            headers["Content-Length"] = str(end - start)
        return BlobResponse(reader, start, end, status_code=status, headers=headers,
                            media_type="application/octet-stream")
