"""uvicorn's httptools protocol with limits on request headers and a zero-copy body, both of
which uvicorn lacks.

- A connection must send complete request headers within `header_timeout` seconds, counted
  from its start and, on a kept-alive connection, from the end of the previous response.
  Otherwise it is answered 408 (or just closed if it sent nothing of a new request) and closed:
  a client that trickles a request line, byte by byte, ties up nothing for long.
- Request line and headers may take at most MAX_HEADER_BYTES; past that the request is
  answered 431 and the connection closed, without reading further (httptools would otherwise
  buffer an endless header in memory).

- On plain-HTTP connections it offers the ASGI extension `http.response.zerocopysend`
  (`mirror.zerocopy` uses it for blob bodies): the message's file range goes to the socket
  with sendfile(2), straight from the page cache, once what uvloop still buffers for the
  socket has gone out; the socket's readiness is awaited through a duplicate of its
  descriptor (uvloop keeps the original's). With chunked encoding or a HEAD the range is
  read and sent as an ordinary body instead.

uvicorn takes it as `http=protocol(header_timeout)`: a `functools.partial` of the class, which
pickles by reference, so the workers uvicorn spawns get it too.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import is_ssl

from mirror import errors

MAX_HEADER_BYTES = 64 * 1024
ZERO_COPY = "http.response.zerocopysend"
FALLBACK_CHUNK = 1 << 20  # a zero-copy range sent as an ordinary body goes in these pieces


def protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """What to pass to uvicorn as `http=`."""
    factory = functools.partial(HeaderLimitProtocol, header_timeout=header_timeout)
    return cast(type[asyncio.Protocol], factory)  # uvicorn only calls it


class HeaderLimitProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._in_headers = True  # between the end of one request's body and its headers' end
        self._header_bytes = 0  # bytes fed to the parser while _in_headers
        self._header_timer: asyncio.TimerHandle | None = None

    # -- the clock ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_headers and not self.transport.is_closing():
            self._arm()  # the next request's headers are due within header_timeout
        # (else a pipelined request's headers are complete already)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._in_headers and self._header_bytes:
            self._reject(408, errors.RegistryError(
                f"request headers not received within {self.header_timeout:g} s"))
        elif self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # idle between requests: nothing to answer

    # -- the size ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._in_headers:
            super().data_received(data)
            return
        room = MAX_HEADER_BYTES - self._header_bytes
        if len(data) <= room:
            self._header_bytes += len(data)
            super().data_received(data)
        else:
            # Only `room` more bytes may complete the headers; the rest is body or the next
            # request, fed once they are complete.
            self._header_bytes += room
            super().data_received(data[:room])
            if self._in_headers:
                self._reject(431, errors.SizeInvalid(
                    f"request line and headers larger than {MAX_HEADER_BYTES} bytes"))
            elif not self.transport.is_closing():
                self.data_received(data[room:])
        if self._in_headers and self._header_bytes >= MAX_HEADER_BYTES \
                and not self.transport.is_closing():
            self._reject(431, errors.SizeInvalid(
                f"request line and headers larger than {MAX_HEADER_BYTES} bytes"))

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._disarm()
        super().on_headers_complete()
        cycle = self.cycle
        if (cycle is not None and cycle.scope is self.scope and type(cycle) is RequestResponseCycle
                and not is_ssl(self.transport)
                and self.transport.get_extra_info("socket") is not None):
            cycle.__class__ = ZeroCopyCycle  # its task has not started: it sends with ours
            self.scope.setdefault("extensions", {})[ZERO_COPY] = {}

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_headers = True  # the next request's, perhaps pipelined
        self._header_bytes = 0

    # -- answers -----------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the request: an OCI error body, not uvicorn's text."""
        self._reject(400, errors.RegistryError(msg))

    def _reject(self, status: int, error: errors.RegistryError) -> None:
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a response is under way: no room for another
            return
        if status != 400:
            self.logger.warning("%s %s: %s", self.client[0] if self.client else "-", status,
                                error.message)
        body = json.dumps(error.body()).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: ", str(len(body)).encode(), b"\r\n",
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


class ZeroCopyCycle(RequestResponseCycle):
    """uvicorn's request-response cycle that also sends `http.response.zerocopysend`."""

    async def send(self, message: Any) -> None:
        if message["type"] != ZERO_COPY:
            await super().send(message)
            return
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started or self.response_complete:
            raise RuntimeError(f"unexpected ASGI message {ZERO_COPY!r}")
        file = message["file"]
        fd = file if isinstance(file, int) else file.fileno()
        offset = message.get("offset")
        if offset is None:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        count = message.get("count")
        if count is None:
            count = os.fstat(fd).st_size - offset
        more = message.get("more_body", False)
        if self.chunked_encoding or self.scope["method"] == "HEAD":
            await self._as_body(fd, offset, count, more)
            return
        if count > self.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        await self._sendfile(fd, offset, count)
        self.expected_content_length -= count
        if not more:
            await super().send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _as_body(self, fd: int, offset: int, count: int, more: bool) -> None:
        while count > 0:
            data = os.pread(fd, min(count, FALLBACK_CHUNK), offset)
            if not data:
                raise EOFError(f"the file ended {count} bytes before the range it was sent")
            offset += len(data)
            count -= len(data)
            await super().send({"type": "http.response.body", "body": data,
                                "more_body": more or count > 0})
        if not more:
            await super().send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _sendfile(self, fd: int, offset: int, count: int) -> None:
        transport = self.transport
        if transport.get_write_buffer_size():
            # What uvloop still holds for the socket (the headers, say) goes out first.
            transport.set_write_buffer_limits(high=0)  # paused until it is all out
            try:
                await self.flow.drain()
            finally:
                transport.set_write_buffer_limits()
        sock = transport.get_extra_info("socket").fileno()
        ready: int | None = None  # a duplicate of `sock`, to await its readiness with
        try:
            while count > 0 and not self.disconnected:
                try:
                    sent = os.sendfile(sock, fd, offset, count)
                except BlockingIOError:
                    if ready is None:
                        ready = os.dup(sock)
                    await _writable(ready)
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    self.disconnected = True  # uvicorn learns it too, from connection_lost
                    return
                if sent == 0:
                    raise EOFError(f"the file ended {count} bytes before the range it was sent")
                offset += sent
                count -= sent
        finally:
            if ready is not None:
                os.close(ready)


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await waiter
    finally:
        loop.remove_writer(fd)
