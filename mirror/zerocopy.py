"""The one seam between blob readers and the HTTP server: a response that streams a
`Reader`, its file spans sent with sendfile(2) when the server offers it.

ASGI has no zero-copy body of its own; the spec's extension for it is
`http.response.zerocopysend` (a message naming a file, an offset and a count). Our server
protocol (`mirror.httpserver`) offers it on plain-HTTP connections; there `BlobResponse`
sends each `Span` a reader hands out (a range of a fill's partial that is there to be sent)
as one such message, and the kernel moves the bytes from the page cache to the socket. Without
it (HTTPS, another server, tests) the same spans go out as ordinary body chunks, read inline.
Everything else a reader hands out is bytes and goes as body chunks: views of committed
content's mapping (written to the socket from the page cache: on loopback faster than
sendfile, see `CommittedReader.part`), a relay's bytes past a full disk, the object store's,
another replica's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mirror.errors import StreamAborted
from mirror.readers import Reader, Span

ZERO_COPY = "http.response.zerocopysend"


class _File:
    """The `file` of a zero-copy message: anything with a `fileno`, as the spec asks."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class BlobResponse(StreamingResponse):
    """Bytes [start, end) of `reader` (end None: to the end of the blob); `sent` is told how
    many bytes went out, as they go. A client that disconnects ends it (and closes the
    reader), as for any streaming response."""

    def __init__(self, reader: Reader, start: int, end: int | None, *, status_code: int = 200,
                 headers: Mapping[str, str] | None = None, media_type: str | None = None,
                 sent: Callable[[int], None] | None = None) -> None:
        self.reader = reader
        self.span = (start, end)
        self.sent = sent
        self.zero_copy = False
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.zero_copy = ZERO_COPY in scope.get("extensions", {})
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        if self.zero_copy:
            async with contextlib.aclosing(self.reader.parts(*self.span)) as parts:
                async for part in parts:
                    if isinstance(part, Span):
                        await self._span(send, part)
                    else:
                        await self._body(send, part)
        else:  # the same bytes, spans read inline
            async with contextlib.aclosing(self.reader.chunks(*self.span)) as chunks:
                async for data in chunks:
                    await self._body(send, data)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _span(self, send: Send, span: Span) -> None:
        try:
            await send({"type": ZERO_COPY, "file": _File(span.fd), "offset": span.offset,
                        "count": span.count, "more_body": True})
        except EOFError as exc:
            raise StreamAborted(str(exc)) from None
        if self.sent is not None:
            self.sent(span.count)

    async def _body(self, send: Send, data: bytes | memoryview) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})
        if self.sent is not None:
            self.sent(len(data))
