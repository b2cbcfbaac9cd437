"""The data plane: blob bodies downloaded with aiohttp.

httpx (the control plane: tokens, manifests, HEADs, pushes) parses bodies in pure Python and
tops out near 400-800 MB/s here; aiohttp's C parser streams a layer at wire speed. Only
blob GETs come this way; the auth and redirect rules are the upstream client's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp

from mirror import errors
from mirror.upstream.redirects import REDIRECTS, follow
from mirror.upstream.transport import Transport


class Streamed(Protocol):
    """What a fill reads: an upstream answer with a streamed body (Body, httpx.Response)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def aiter_raw(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


class BodyBroken(errors.UpstreamError):
    """The upstream's body ended early or the connection broke (a resume may help)."""


class Body:
    """A streamed upstream answer, shaped like the parts of httpx.Response we use."""

    def __init__(self, response: aiohttp.ClientResponse, upstream: str) -> None:
        self._response = response
        self._upstream = upstream
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers
        self.url = str(response.url)  # after redirects: who answered

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise errors.UpstreamTimeout(f"upstream {self._upstream} stalled") from exc
        except aiohttp.ClientError as exc:
            raise BodyBroken(f"download from upstream {self._upstream} broke: {exc}") from exc

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError):
            return b""

    async def aclose(self) -> None:
        self._response.release()


class Downloader:
    """One aiohttp session per upstream, opened on first use (it needs a running loop)."""

    def __init__(self, upstream: str, transport: Transport) -> None:
        self.upstream = upstream
        self.transport = transport
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self.transport.aiohttp_session()
        return self._session

    async def get(self, url: str, headers: dict[str, str], max_redirects: int) -> Body:
        """GET following redirects as `mirror.upstream.redirects` says."""
        start = url
        for _ in range(max_redirects + 1):
            try:
                response = await self._open().get(
                    url, headers=headers, allow_redirects=False, compress=None,
                    **self.transport.aiohttp_options(url))
            except TimeoutError as exc:
                raise errors.UpstreamTimeout(f"upstream {self.upstream} timed out") from exc
            except aiohttp.ClientError as exc:
                raise errors.UpstreamError(
                    f"upstream {self.upstream} unreachable: {type(exc).__name__}: {exc}"
                ) from exc
            location = response.headers.get("location")
            if response.status not in REDIRECTS or not location:
                return Body(response, self.upstream)
            response.release()
            url, headers = follow(start, url, location, headers)
        raise errors.UpstreamError(f"upstream {self.upstream} redirected too many times")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)  # let aiohttp close its transports
