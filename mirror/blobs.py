"""Blobs: served from the cache, or streamed from a shared upstream fill.

Whether the cache may serve a read at all is `mirror.access`'s decision; this module only
carries it out (`cached`: the bytes may come from the cache).
"""

from __future__ import annotations

from mirror import errors
from mirror.fills import Fills
from mirror.readers import Reader
from mirror.reference import Digest
from mirror.store import Store
from mirror.upstream import Answer, Credential, UpstreamClient, upstream_error

PRESIGNED_LIFETIME = 60.0  # seconds a redirect's URL works: enough to start the download


class BlobService:
    def __init__(self, store: Store, fills: Fills) -> None:
        self.store = store
        self.fills = fills

    async def size(
        self, client: UpstreamClient, repo: str, digest: Digest,
        credential: Credential | None = None, *, cached: bool = True,
        known: int | None = None,
    ) -> int:
        """The blob's length, for HEAD: from the cache, a running fill, what the upstream
        already said (`known`), or an upstream HEAD."""
        if cached:
            size = await self.store.committed_size(digest)
            if size is not None:
                return size
            fill = self.fills.active.get(digest)
            if fill is not None and fill.size is not None:
                return fill.size
        if known is not None:
            return known
        response = await client.send("HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo,
                                     credential=credential)
        length = response.headers.get("content-length", "")
        if response.status_code != 200:
            raise upstream_error(response, client.name, errors.BlobUnknown, f"blob {digest}")
        if not (length.isascii() and length.isdigit()):
            raise errors.UpstreamError(f"upstream {client.name} sent no length for {digest}")
        return int(length)

    async def location(self, digest: Digest) -> str | None:
        """A short-lived presigned URL of committed content in the object store, if it is
        there (never for content still being fetched)."""
        remote = self.store.remote
        if remote is None or await self.store.committed_size(digest) is None:
            return None
        self.store.recency.touch(digest)
        return await remote.presign(digest, PRESIGNED_LIFETIME)

    async def open(
        self, client: UpstreamClient, repo: str, digest: Digest,
        credential: Credential | None = None, *, cached: bool = True,
        expected: int | None = None,
    ) -> Reader:
        """A reader over the blob; the caller streams `reader.chunks(...)` (which closes it)."""

        async def fetch(offset: int) -> Answer:
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            response = await client.get_blob(
                f"/v2/{repo}/blobs/{digest}", repo=repo, headers=headers, credential=credential)
            if response.status_code not in (200, 206):
                try:
                    body = await response.aread()
                finally:
                    await response.aclose()  # cancelled while reading, too
                raise upstream_error(
                    response, client.name, errors.BlobUnknown, f"blob {digest}", body)
            return response

        return await self.fills.open(digest, fetch, client.name, cached=cached,
                                     expected=expected)
