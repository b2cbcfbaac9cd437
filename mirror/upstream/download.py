"""The data plane: blob GETs whose bodies a fill's own thread reads straight from the socket.

A blob GET goes out on a blocking socket made as `mirror.upstream.transport` says (proxy, TLS
context, timeouts), with the answer's head parsed by `http.client`, in a worker thread; it
follows redirects as `mirror.upstream.redirects` says. The body is then read where the fill
wants it: `SocketBody.readinto` fills the caller's buffer from the socket (the read, and any
TLS decryption, release the GIL), so a fill's bytes never pass through the event loop
(`mirror.datapath`). Connections are kept alive and reused per origin and proxy.

Behind an https:// proxy for an https:// URL (TLS in TLS), the GET goes through aiohttp as
before (`Body`, read as an async stream). httpx (the control plane: tokens, manifests, HEADs,
pushes) parses bodies in pure Python, which tops out near 400-800 MB/s here: only blob GETs
come this way; the auth rules are the upstream client's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol
from urllib.parse import SplitResult, urlsplit

import aiohttp
import httpx

from mirror import __version__, errors
from mirror.upstream.redirects import REDIRECTS, follow
from mirror.upstream.transport import LIMIT, Connected, Transport

USER_AGENT = f"mirror/{__version__}"
IDLE = 30.0  # seconds a kept-alive connection may wait for its next request
KEEP = 8  # idle connections kept per origin (and proxy)
ERROR_BODY = 1 << 20  # at most this much of an error answer's body is read
# Requests (connect, send, the answer's head) run here; bodies are read by the fill's thread.
REQUESTS = ThreadPoolExecutor(max_workers=LIMIT, thread_name_prefix="upstream")


class Streamed(Protocol):
    """What a fill reads: an upstream answer with a streamed body (SocketBody, Body,
    httpx.Response)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def aiter_raw(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


class BodyBroken(errors.UpstreamError):
    """The upstream's body ended early or the connection broke (a resume may help)."""


class _Connection:
    def __init__(self, key: tuple[str, str, str | None], connected: Connected) -> None:
        self.key = key
        self.sock = connected.sock
        self.absolute = connected.absolute
        self.headers = connected.headers
        self.idle_since = 0.0

    def close(self) -> None:
        self.sock.close()


class _Pool:
    """Kept-alive connections by (scheme, host:port, proxy); thread-safe."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._idle: dict[tuple[str, str, str | None], list[_Connection]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def get(self, url: str) -> tuple[_Connection, bool]:
        """A connection for `url` (blocking): (connection, whether it was used before)."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, self.transport.proxy_for(url))
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                conn = idle.pop()
                if now - conn.idle_since < IDLE:
                    return conn, True
                conn.close()
        return _Connection(key, self.transport.open_socket(url)), False

    def put(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if not self.closed and len(idle) < KEEP:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class SocketBody:
    """An upstream answer on a blocking socket: status and headers read, the body still on
    the wire. `readinto` (blocking, from one thread at a time) reads it; `abort` (from any
    thread) cuts the connection, which ends a `readinto` waiting for bytes."""

    def __init__(self, pool: _Pool, conn: _Connection, response: http.client.HTTPResponse,
                 url: str, upstream: str) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._response = response
        self._upstream = upstream
        self.status_code = response.status
        self.headers: Mapping[str, str] = httpx.Headers(response.getheaders())
        self.url = url
        self._left = response.length  # None: chunked, or up to the end of the connection
        self._file = response.fp  # buffered over the socket: may hold the body's first bytes
        self._sock = conn.sock
        self._direct = False  # nothing left in `_file`'s buffer: read the socket itself
        self._tls: tuple[ssl.SSLSocket, select.poll] | None = None
        if isinstance(conn.sock, ssl.SSLSocket):
            # TLS hands out one record (16 KiB) a read: take what is there already, too.
            poll = select.poll()
            poll.register(conn.sock, select.POLLIN)
            self._tls = (conn.sock, poll)

    def readinto(self, view: memoryview) -> int:
        """Up to len(view) body bytes into `view` (at least 1, as soon as some arrived);
        0 at the end of the body. Raises BodyBroken (reset, truncated) or UpstreamTimeout
        (silent for the read timeout)."""
        left = self._left
        if left == 0 or self._conn is None:
            return 0
        try:
            if left is not None:
                if len(view) > left:
                    view = view[:left]
                if self._direct:
                    n = self._sock.recv_into(view)
                else:
                    n = self._file.readinto1(view)
                    self._direct = n < len(view)  # it had less than asked: its buffer is empty
                if n == 0:
                    raise BodyBroken(f"download from upstream {self._upstream} broke: the "
                                     f"connection ended {left} bytes early")
                if self._tls is not None:
                    sock, poll = self._tls
                    while n < len(view) and (sock.pending() or poll.poll(0)):
                        more = sock.recv_into(view[n:]) if self._direct else \
                            self._file.readinto1(view[n:])
                        if not more:
                            break
                        n += more
                self._left = left - n
                return n
            data = self._response.read1(len(view))  # chunked, or up to the end
            view[:len(data)] = data
            return len(data)
        except TimeoutError as exc:
            raise errors.UpstreamTimeout(f"upstream {self._upstream} stalled") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # ValueError: the connection was closed under us (abort)
            raise BodyBroken(f"download from upstream {self._upstream} broke: {exc!r}") \
                from exc

    def abort(self) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        loop = asyncio.get_running_loop()
        while n := await loop.run_in_executor(REQUESTS, self.readinto, view):
            yield bytes(view[:n])

    async def aread(self) -> bytes:
        """The body of a (small) error answer; b"" if it cannot be read."""

        def read() -> bytes:
            data = bytearray()
            view = memoryview(bytearray(65536))
            while len(data) < ERROR_BODY and (n := self.readinto(view)):
                data += view[:n]
            return bytes(data)

        try:
            return await asyncio.get_running_loop().run_in_executor(REQUESTS, read)
        except errors.RegistryError:
            return b""

    def close(self) -> None:
        """Done with the answer: its connection is kept for the next request if the body was
        read to its end and the upstream keeps it open, else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        done = self._left == 0 or (self._left is None and self._response.isclosed())
        reusable = done and not self._response.will_close
        self._response.close()  # the buffered reader over the socket, not the socket
        if reusable:
            self._pool.put(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self.close()


class Body:
    """A streamed upstream answer through aiohttp, shaped like the parts of httpx.Response we
    use (the fallback behind proxies `Transport.open_socket` does not speak)."""

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


Answer = SocketBody | Body


class Downloader:
    """Blob GETs to one upstream: on kept-alive blocking sockets (`SocketBody`), or through
    aiohttp where those cannot go (`Body`)."""

    def __init__(self, upstream: str, transport: Transport) -> None:
        self.upstream = upstream
        self.transport = transport
        self._pool = _Pool(transport)
        self._session: aiohttp.ClientSession | None = None

    async def get(self, url: str, headers: dict[str, str], max_redirects: int) -> Answer:
        """GET following redirects as `mirror.upstream.redirects` says."""
        start = url
        loop = asyncio.get_running_loop()
        for _ in range(max_redirects + 1):
            if any("\r" in v or "\n" in v for v in headers.values()):
                raise errors.UpstreamError(f"a header for upstream {self.upstream} spans lines")
            if self.transport.can_open(url):
                answer: Answer = await loop.run_in_executor(
                    REQUESTS, self._request, url, dict(headers))
            else:
                answer = await self._aiohttp_get(url, headers)
            location = answer.headers.get("location")
            if answer.status_code not in REDIRECTS or not location:
                return answer
            await answer.aclose()
            url, headers = follow(start, url, location, headers)
        raise errors.UpstreamError(f"upstream {self.upstream} redirected too many times")

    def _request(self, url: str, headers: dict[str, str]) -> SocketBody:
        """One GET on a kept-alive connection (blocking); a connection the upstream closed
        while it was idle is replaced once."""
        parts = urlsplit(url)
        for attempt in range(2):
            try:
                conn, reused = self._pool.get(url)
            except TimeoutError as exc:
                raise errors.UpstreamTimeout(f"upstream {self.upstream} timed out") from exc
            except OSError as exc:
                raise errors.UpstreamError(
                    f"upstream {self.upstream} unreachable: {type(exc).__name__}: {exc}"
                ) from exc
            target = url.split("#", 1)[0] if conn.absolute else (
                (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
            lines = [f"GET {target} HTTP/1.1", f"Host: {_host(parts)}",
                     f"User-Agent: {USER_AGENT}", "Accept: */*",
                     *(f"{k}: {v}" for k, v in {**headers, **conn.headers}.items())]
            response = http.client.HTTPResponse(conn.sock, method="GET")
            try:
                conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                response.begin()
            except TimeoutError as exc:
                conn.close()
                raise errors.UpstreamTimeout(f"upstream {self.upstream} timed out") from exc
            except (OSError, http.client.HTTPException, UnicodeEncodeError) as exc:
                conn.close()
                if reused and attempt == 0 and isinstance(
                        exc, http.client.RemoteDisconnected | ConnectionError):
                    continue  # it went stale while idle
                raise errors.UpstreamError(
                    f"upstream {self.upstream} unreachable: {type(exc).__name__}: {exc}"
                ) from exc
            return SocketBody(self._pool, conn, response, url, self.upstream)
        raise AssertionError("unreachable")

    async def _aiohttp_get(self, url: str, headers: dict[str, str]) -> Body:
        if self._session is None or self._session.closed:
            self._session = self.transport.aiohttp_session()
        try:
            response = await self._session.get(
                url, headers=headers, allow_redirects=False, compress=None,
                **self.transport.aiohttp_options(url))
        except TimeoutError as exc:
            raise errors.UpstreamTimeout(f"upstream {self.upstream} timed out") from exc
        except aiohttp.ClientError as exc:
            raise errors.UpstreamError(
                f"upstream {self.upstream} unreachable: {type(exc).__name__}: {exc}") from exc
        return Body(response, self.upstream)

    async def aclose(self) -> None:
        self._pool.close()
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)  # let aiohttp close its transports


def _host(parts: SplitResult) -> str:
    """The Host header for a URL: its host, and its port unless it is the scheme's own."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or port == {"http": 80, "https": 443}.get(parts.scheme):
        return host
    return f"{host}:{port}"
