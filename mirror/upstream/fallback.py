"""Blob GETs through aiohttp, where the blocking sockets cannot go (an https:// URL behind an
https:// proxy: TLS in TLS), their bodies read as async streams (`Body`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp

from mirror import errors
from mirror.upstream.exchange import timed_out, unreachable
from mirror.upstream.streamed import BodyBroken
from mirror.upstream.transport import Transport


class Body:
    """A streamed upstream answer through aiohttp, shaped like the parts of httpx.Response we
    use (the fallback behind proxies `Transport.open_socket` does not speak)."""

    def __init__(self, response: aiohttp.ClientResponse, upstream: str) -> None:
        self._response = response
        self._upstream = upstream
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers
        self.url = str(response.url)  # after redirects: who answered

    def locations(self) -> list[str]:
        return self._response.headers.getall("location", [])

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



class Fallback:
    """aiohttp's session for one upstream, opened on its first request."""

    def __init__(self, upstream: str, transport: Transport) -> None:
        self.upstream = upstream
        self.transport = transport
        self._session: aiohttp.ClientSession | None = None

    async def get(self, url: str, headers: dict[str, str]) -> Body:
        if self._session is None or self._session.closed:
            self._session = self.transport.aiohttp_session()
        try:
            response = await self._session.get(
                url, headers=headers, allow_redirects=False, compress=None,
                **self.transport.aiohttp_options(url))
        except TimeoutError as exc:
            raise timed_out(self.upstream) from exc
        except aiohttp.ClientError as exc:
            raise unreachable(self.upstream, exc) from exc
        return Body(response, self.upstream)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)  # let aiohttp close its transports
