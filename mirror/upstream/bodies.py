"""The body of an answer on a blocking socket, read where a fill wants it: `SocketBody.readinto`
fills the caller's buffer from the socket (the read, and any TLS decryption, release the GIL),
of announced length, chunked or up to the end of the connection; `abort` cuts it from any
thread; closed, its connection goes back to the pool if it can be used again."""

from __future__ import annotations

import asyncio
import http.client
import select
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import httpx

from mirror import errors
from mirror.upstream.pool import Connection
from mirror.upstream.sockets import cut, quiet
from mirror.upstream.streamed import BodyBroken

if TYPE_CHECKING:
    from mirror.upstream.downloader import Downloader

ERROR_BODY = 1 << 20  # at most this much of an error answer's body is read


class SocketBody:
    """An upstream answer on a blocking socket: status and headers read, the body still on
    the wire. `readinto` (blocking, from one thread at a time) reads it; `abort` (from any
    thread) cuts the connection, which ends a `readinto` waiting for bytes, and no byte is
    returned after it."""

    def __init__(self, downloader: Downloader, conn: Connection,
                 response: http.client.HTTPResponse, url: str, until: float) -> None:
        self._downloader = downloader
        self._conn: Connection | None = conn
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
            cut(conn.sock)

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
                    and not self._buffered() and quiet(conn.sock))
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

