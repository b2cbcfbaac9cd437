"""Blob GETs whose bodies a fill's own thread reads straight from the socket: the async
facade the upstream client calls.

A blob GET goes out on a blocking socket made as `mirror.upstream.transport` says (proxy, TLS
context, timeouts), its answer's head read in a worker thread (`mirror.upstream.exchange`); it
follows redirects as `mirror.upstream.redirects` says. The body is then read where the fill
wants it (`mirror.upstream.bodies`), so a fill's bytes never pass through the event loop
(`mirror.datapath`). Connections are kept alive and reused per origin and proxy
(`mirror.upstream.pool`).

Behind an https:// proxy for an https:// URL (TLS in TLS), the GET goes through aiohttp
(`mirror.upstream.fallback`). httpx (the control plane: tokens, manifests, HEADs, pushes)
parses bodies in pure Python, which tops out near 400-800 MB/s here: only blob GETs come this
way; the auth rules are the upstream client's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor

from mirror import errors
from mirror.upstream import exchange
from mirror.upstream.bodies import SocketBody
from mirror.upstream.fallback import Body, Fallback
from mirror.upstream.pool import Pool
from mirror.upstream.redirects import REDIRECTS, follow, location
from mirror.upstream.sockets import Cut
from mirror.upstream.transport import LIMIT, Transport

Answer = SocketBody | Body


class Downloader:
    """Blob GETs to one upstream: on kept-alive blocking sockets (`SocketBody`), or through
    aiohttp where those cannot go (`Body`). Its requests run in its own threads, at most
    LIMIT connections at a time (as aiohttp's connector allowed), so that no upstream
    holds up another's; each request's head arrives by `deadline` seconds or not at all."""

    def __init__(self, upstream: str, transport: Transport, deadline: float = 3600.0) -> None:
        self.upstream = upstream
        self.transport = transport
        self.deadline = deadline
        self.pool = Pool(transport)
        self.slots = asyncio.Semaphore(LIMIT)  # released by the answer's close
        self._executor: ThreadPoolExecutor | None = None
        self._fallback = Fallback(upstream, transport)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Threads for requests (connect, send, the answer's head) and error bodies; fills
        read their bodies in their own thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=LIMIT, thread_name_prefix=f"upstream-{self.upstream}")
        return self._executor

    async def get(self, url: str, headers: dict[str, str], max_redirects: int) -> Answer:
        """GET following redirects as `mirror.upstream.redirects` says."""
        start = url
        until = time.monotonic() + self.deadline
        for _ in range(max_redirects + 1):
            if any("\r" in v or "\n" in v for v in headers.values()):
                raise errors.UpstreamError(f"a header for upstream {self.upstream} spans lines")
            if self.transport.can_open(url):
                answer: Answer = await self._socket_get(url, dict(headers), until)
            else:
                answer = await self._fallback.get(url, headers)
            try:
                target = location(answer.locations())
            except errors.UpstreamError:
                await answer.aclose()
                raise
            if answer.status_code not in REDIRECTS or not target:
                return answer
            await answer.aclose()
            url, headers = follow(start, url, target, headers)
        raise errors.UpstreamError(f"upstream {self.upstream} redirected too many times")

    async def _socket_get(self, url: str, headers: dict[str, str], until: float) -> SocketBody:
        """`_request` in a thread. Cancelled (the caller's deadline, shutdown), its sockets
        are cut, so the thread gives up at once; an answer it still gets is closed."""
        await self.slots.acquire()
        cut = Cut()
        loop = asyncio.get_running_loop()
        try:
            future = self.executor.submit(self._request, url, headers, cut, until)
        except BaseException:
            self.slots.release()
            raise
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cut.cancel()

            def settle(done: Future[SocketBody]) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to do
                    loop.call_soon_threadsafe(self._orphaned, done)

            future.add_done_callback(settle)
            raise
        except BaseException:
            self.slots.release()
            raise

    def _orphaned(self, done: Future[SocketBody]) -> None:
        """A cancelled request's thread is done: let go of what it got."""
        if not done.cancelled() and done.exception() is None:
            done.result().close()  # never pooled: its socket was cut
        else:
            self.slots.release()

    def _request(self, url: str, headers: dict[str, str], cut: Cut,
                 until: float) -> SocketBody:
        """One GET on a kept-alive connection (blocking), its body left on the socket."""
        try:
            conn, response = exchange.request(self.pool, url, headers, cut, until,
                                              self.upstream)
            return SocketBody(self, conn, response, url, until)
        finally:
            cut.finish()

    async def aclose(self) -> None:
        self.pool.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        await self._fallback.aclose()
