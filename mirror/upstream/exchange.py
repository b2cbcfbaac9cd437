"""One HTTP/1.1 GET on a blocking socket, up to its answer's head: the request line and
headers, informational (1xx) answers skipped, the deadline kept while the head trickles in,
and a kept-alive connection that went stale while idle replaced once. The body is left on
the wire for `mirror.upstream.bodies`."""

from __future__ import annotations

import http.client
import io
import socket
from typing import cast
from urllib.parse import SplitResult, urlsplit

from mirror import __version__, errors
from mirror.upstream.pool import Connection, Pool
from mirror.upstream.sockets import Cut
from mirror.upstream.transport import bracket, budget

USER_AGENT = f"mirror/{__version__}"
INFORMATIONAL = 16  # 1xx answers skipped before the final one, at most


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
            self.sock.settimeout(budget(self.timeout, self.until))
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


def timed_out(upstream: str) -> errors.UpstreamTimeout:
    return errors.UpstreamTimeout(f"upstream {upstream} timed out")


def unreachable(upstream: str, exc: BaseException) -> errors.UpstreamError:
    return errors.UpstreamError(
        f"upstream {upstream} unreachable: {type(exc).__name__}: {exc}")


def request(pool: Pool, url: str, headers: dict[str, str], cut: Cut, until: float,
            upstream: str) -> tuple[Connection, http.client.HTTPResponse]:
    """GET `url` on a kept-alive connection of `pool` (blocking), its answer's head read by
    `until`; a connection the upstream closed while it was idle is replaced once."""
    parts = urlsplit(url)
    read = pool.transport.read
    for attempt in range(2):
        try:
            conn, reused = pool.get(url, cut, until)
        except TimeoutError as exc:
            raise timed_out(upstream) from exc
        except OSError as exc:
            raise unreachable(upstream, exc) from exc
        target = url.split("#", 1)[0] if conn.absolute else (
            (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        lines = [f"GET {target} HTTP/1.1", f"Host: {_host(parts)}",
                 f"User-Agent: {USER_AGENT}", "Accept: */*",
                 *(f"{k}: {v}" for k, v in {**headers, **conn.headers}.items())]
        wire = _Wire(conn.sock, read, until)
        reader = io.BufferedReader(wire)
        response = _Response(cast(socket.socket, _Reader(reader)), method="GET")
        try:
            conn.sock.settimeout(budget(read, until))
            conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            response.begin()
            if cut.cancelled:
                raise ConnectionAbortedError("the request was cancelled")
        except TimeoutError as exc:
            conn.close()
            raise timed_out(upstream) from exc
        except (OSError, http.client.HTTPException, UnicodeEncodeError) as exc:
            conn.close()
            if reused and attempt == 0 and not cut.cancelled and isinstance(
                    exc, http.client.RemoteDisconnected | ConnectionError):
                continue  # it went stale while idle
            raise unreachable(upstream, exc) from exc
        wire.until = None  # the body's reads wait the read timeout each, as always
        conn.sock.settimeout(read)
        return conn, response
    raise AssertionError("unreachable")


def _host(parts: SplitResult) -> str:
    """The Host header for a URL: its host, and its port unless it is the scheme's own."""
    host = bracket(parts.hostname or "")
    port = parts.port
    if port is None or port == {"http": 80, "https": 443}.get(parts.scheme):
        return host
    return f"{host}:{port}"
