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
import io
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, cast
from urllib.parse import SplitResult, urlsplit

import aiohttp
import httpx

from mirror import __version__, errors
from mirror.upstream.redirects import REDIRECTS, follow, location
from mirror.upstream.transport import LIMIT, Connected, Transport

USER_AGENT = f"mirror/{__version__}"
IDLE = 30.0  # seconds a kept-alive connection may wait for its next request
KEEP = 8  # idle connections kept per origin (and proxy)
ERROR_BODY = 1 << 20  # at most this much of an error answer's body is read
INFORMATIONAL = 16  # 1xx answers skipped before the final one, at most


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


def _cut(sock: socket.socket) -> None:
    """End every blocking call on `sock` at once, from any thread. The plain socket's
    shutdown: `SSLSocket.shutdown` would also drop the TLS layer, and a read racing it
    would then return the raw ciphertext."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _quiet(sock: socket.socket) -> bool:
    """Nothing waits to be read on an idle connection: no bytes (an answer nobody asked
    for would be taken for the next request's), no end."""
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        return not poll.poll(0)
    except (OSError, ValueError):
        return False


class _Cut:
    """Lets the event loop end a request whose thread is blocked (connecting, in the TLS
    handshake, waiting for the answer): the thread hands over each socket it uses, and
    `cancel` shuts them all down. It keeps a duplicate of each: its own descriptor, never
    closed (and reused) under it by the thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.cancelled = False

    def watch(self, sock: socket.socket) -> None:
        # The plain socket, whatever layer `sock` is (an SSLSocket's dup would be one).
        dup = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        with self._lock:
            if not self.cancelled:
                self._socks.append(dup)
                return
        dup.close()
        raise ConnectionAbortedError("the request was cancelled")

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            socks, self._socks = self._socks, []
        for sock in socks:
            _cut(sock)
            sock.close()

    def finish(self) -> None:
        """The request is over: its sockets are its answer's (or closed)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()


class _Wire(io.RawIOBase):
    """The socket under an answer's buffered reader: while `until` is set (the request
    phase), no read waits past it, however slowly the upstream trickles its head."""

    def __init__(self, sock: socket.socket, timeout: float, until: float | None) -> None:
        self.sock = sock
        self.timeout = timeout
        self.until = until

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.until is not None:
            left = self.until - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request's deadline passed")
            self.sock.settimeout(min(self.timeout, left))
        return self.sock.recv_into(buffer)


class _Reader:
    """What `http.client.HTTPResponse` reads from: our buffered reader, kept across the
    informational answers before the final one (a reader of its own would drop what the
    last one buffered)."""

    def __init__(self, file: io.BufferedReader[_Wire]) -> None:
        self.file = file

    def makefile(self, mode: str) -> io.BufferedReader[_Wire]:
        return self.file


class _Response(http.client.HTTPResponse):
    """Skips every informational (1xx) answer before the final one, not only
    `100 Continue` (a `103 Early Hints` is no answer to a GET), and only so many."""

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(INFORMATIONAL + 1):
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 <= status < 200:
                return version, status, reason
            if status == 101:
                raise http.client.HTTPException("the upstream switched protocols")
            http.client.parse_headers(self.fp)
        raise http.client.HTTPException(f"over {INFORMATIONAL} informational answers")


class _Pool:
    """Kept-alive connections by (scheme, host:port, proxy); thread-safe."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._idle: dict[tuple[str, str, str | None], list[_Connection]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def get(self, url: str, cut: _Cut, until: float) -> tuple[_Connection, bool]:
        """A connection for `url` (blocking): (connection, whether it was used before)."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, self.transport.proxy_for(url))
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(key, [])
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if now - conn.idle_since < IDLE and _quiet(conn.sock):
                cut.watch(conn.sock)
                return conn, True
            conn.close()
        return _Connection(key, self.transport.open_socket(url, cut.watch, until)), False

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
    thread) cuts the connection, which ends a `readinto` waiting for bytes, and no byte is
    returned after it."""

    def __init__(self, downloader: Downloader, conn: _Connection,
                 response: http.client.HTTPResponse, url: str, until: float) -> None:
        self._downloader = downloader
        self._conn: _Connection | None = conn
        self._response = response
        self._upstream = downloader.upstream
        self._until = until
        self.status_code = response.status
        self.headers = httpx.Headers(response.getheaders())
        self.url = url
        self._left = response.length  # None: chunked, or up to the end of the connection
        self._file = response.fp  # buffered over the socket: may hold the body's first bytes
        self._sock = conn.sock
        self._direct = False  # nothing left in `_file`'s buffer: read the socket itself
        self._aborted = False
        self._tls: tuple[ssl.SSLSocket, select.poll] | None = None
        if isinstance(conn.sock, ssl.SSLSocket):
            # TLS hands out one record (16 KiB) a read: take what is there already, too.
            poll = select.poll()
            poll.register(conn.sock, select.POLLIN)
            self._tls = (conn.sock, poll)

    def locations(self) -> list[str]:
        return self.headers.get_list("location")

    def readinto(self, view: memoryview) -> int:
        """Up to len(view) body bytes into `view` (at least 1, as soon as some arrived);
        0 at the end of the body. Raises BodyBroken (reset, truncated, aborted) or
        UpstreamTimeout (silent for the read timeout)."""
        left = self._left
        if left == 0 or self._conn is None:
            return 0
        try:
            if self._aborted:
                raise ConnectionAbortedError("aborted")
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
                    while (n < len(view) and not self._aborted
                           and (sock.pending() or poll.poll(0))):
                        more = sock.recv_into(view[n:]) if self._direct else \
                            self._file.readinto1(view[n:])
                        if not more:
                            break
                        n += more
                if self._aborted:  # whatever came after the cut is not the body's
                    raise ConnectionAbortedError("aborted")
                self._left = left - n
                return n
            data = self._response.read1(len(view))  # chunked, or up to the end
            if self._aborted:
                raise ConnectionAbortedError("aborted")
            view[:len(data)] = data
            return len(data)
        except TimeoutError as exc:
            raise errors.UpstreamTimeout(f"upstream {self._upstream} stalled") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # ValueError: the connection was closed under us (abort)
            raise BodyBroken(f"download from upstream {self._upstream} broke: {exc!r}") \
                from exc

    def abort(self) -> None:
        """Cut the connection (from any thread): a `readinto` under way ends at once."""
        self._aborted = True
        conn = self._conn
        if conn is not None:
            _cut(conn.sock)

    async def _threaded(self, work: Callable[[], bytes]) -> bytes:
        """`work` (reading the body) in a thread; cancelled, it ends at once (abort)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._downloader.executor, work)
        except asyncio.CancelledError:
            self.abort()
            raise

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        view = memoryview(bytearray(1 << 20))

        def read() -> bytes:
            return bytes(view[:self.readinto(view)])

        while data := await self._threaded(read):
            yield data

    async def aread(self) -> bytes:
        """The body of a (small) error answer, read by the request's deadline; b"" if it
        cannot be read."""

        def read() -> bytes:
            data = bytearray()
            view = memoryview(bytearray(65536))
            timeout = self._downloader.transport.read
            while len(data) < ERROR_BODY:
                left = self._until - time.monotonic()
                if left <= 0:
                    break
                self._sock.settimeout(min(timeout, left))  # a trickle ends by the deadline
                if not (n := self.readinto(view)):
                    break
                data += view[:n]
            return bytes(data)

        try:
            return await self._threaded(read)
        except errors.RegistryError:
            return b""

    def close(self) -> None:
        """Done with the answer (on the event loop): its connection is kept for the next
        request if the body was read to its end, the upstream keeps it open and sent
        nothing more, else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        done = self._left == 0 or (self._left is None and self._response.isclosed())
        reusable = (done and not self._response.will_close and not self._aborted
                    and not self._buffered() and _quiet(conn.sock))
        self._response.close()  # the buffered reader over the socket, not the socket
        if reusable:
            conn.sock.settimeout(self._downloader.transport.read)
            self._downloader.pool.put(conn)
        else:
            conn.close()
        self._downloader.slots.release()

    def _buffered(self) -> bool:
        """Whether the answer's reader holds bytes past the body (an upstream sending
        more than it announced)."""
        if self._response.fp is None:
            return False
        self._sock.settimeout(0)  # look, never wait: only the reader's buffer counts
        try:
            return bool(self._response.fp.peek(1))
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except (OSError, ValueError):
            return True

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
        self.pool = _Pool(transport)
        self.slots = asyncio.Semaphore(LIMIT)  # released by the answer's close
        self._executor: ThreadPoolExecutor | None = None
        self._session: aiohttp.ClientSession | None = None

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
                answer = await self._aiohttp_get(url, headers)
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
        cut = _Cut()
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

    def _request(self, url: str, headers: dict[str, str], cut: _Cut,
                 until: float) -> SocketBody:
        """One GET on a kept-alive connection (blocking); a connection the upstream closed
        while it was idle is replaced once."""
        try:
            return self._request_once(url, headers, cut, until)
        finally:
            cut.finish()

    def _request_once(self, url: str, headers: dict[str, str], cut: _Cut,
                      until: float) -> SocketBody:
        parts = urlsplit(url)
        read = self.transport.read
        for attempt in range(2):
            try:
                conn, reused = self.pool.get(url, cut, until)
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
            wire = _Wire(conn.sock, read, until)
            reader = io.BufferedReader(wire)
            response = _Response(cast(socket.socket, _Reader(reader)), method="GET")
            try:
                left = until - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the request's deadline passed")
                conn.sock.settimeout(min(read, left))
                conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                response.begin()
                if cut.cancelled:
                    raise ConnectionAbortedError("the request was cancelled")
            except TimeoutError as exc:
                conn.close()
                raise errors.UpstreamTimeout(f"upstream {self.upstream} timed out") from exc
            except (OSError, http.client.HTTPException, UnicodeEncodeError) as exc:
                conn.close()
                if reused and attempt == 0 and not cut.cancelled and isinstance(
                        exc, http.client.RemoteDisconnected | ConnectionError):
                    continue  # it went stale while idle
                raise errors.UpstreamError(
                    f"upstream {self.upstream} unreachable: {type(exc).__name__}: {exc}"
                ) from exc
            wire.until = None  # the body's reads wait the read timeout each, as always
            conn.sock.settimeout(read)
            return SocketBody(self, conn, response, url, until)
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
        self.pool.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
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
