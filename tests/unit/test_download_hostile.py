"""Blob GETs on blocking sockets against upstreams that misbehave: trickles, endless
informational answers, bytes past the body, odd redirects, TLS cut mid-body."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.tls import make_server_cert

from mirror import errors
from mirror.blobs import BlobService
from mirror.reference import Digest, parse_digest
from mirror.upstream import Answer, BodyBroken, Downloader, SocketBody
from mirror.upstream import downloader as facade
from mirror.upstream.transport import Transport

Handler = Callable[["Server", socket.socket], None]


class Server:
    """A loopback server running `handler` for each connection in a thread of its own."""

    def __init__(self, handler: Handler, wrap: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handler = handler
        self.wrap = wrap
        self.lines: list[bytes] = []  # request lines, as received
        self.connections = 0
        self.closed_at: float | None = None  # when a handler's send first failed
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.wrap is not None:
                conn = self.wrap.wrap_socket(conn, server_side=True)
            self.handler(self, conn)
        except OSError:
            if self.closed_at is None:
                self.closed_at = time.monotonic()
        finally:
            conn.close()

    def url(self, path: str = "/blob", scheme: str = "http") -> str:
        host = "localhost" if scheme == "https" else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}{path}"

    def head(self, conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(4096)
            if not more:
                return None
            data += more
        self.lines.append(data.split(b"\r\n", 1)[0])
        return data

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def trickle(server: Server, conn: socket.socket) -> None:
    """A byte every 0.1 s until the other end is gone (or the test is over)."""
    while not server.stop.is_set():
        conn.sendall(b"a")
        time.sleep(0.1)


@pytest.fixture
def serve() -> Any:
    servers: list[Server] = []

    def start(handler: Handler, wrap: ssl.SSLContext | None = None) -> Server:
        servers.append(Server(handler, wrap))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def downloader(server: Server, deadline: float = 3600.0) -> Downloader:
    return Downloader("up", Transport(server.url("/"), connect=2, read=2), deadline)


async def body(answer: Answer) -> bytes:
    data = b"".join([chunk async for chunk in answer.aiter_raw()])
    await answer.aclose()
    return data


def ok(server: Server, conn: socket.socket) -> None:
    while server.head(conn) is not None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


# -- the request phase ends by the deadline, or when cancelled --------------------------------


def slow_head(server: Server, conn: socket.socket) -> None:
    server.head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    trickle(server, conn)


def slow_error(server: Server, conn: socket.socket) -> None:
    server.head(conn)
    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 1000000\r\n\r\n")
    trickle(server, conn)


def test_cancelling_a_request_cuts_its_connection(serve: Any) -> None:
    server = serve(slow_head)
    fetcher = downloader(server)

    async def main() -> float:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await fetcher.get(server.url(), {}, 5)
        cancelled = time.monotonic()
        await asyncio.sleep(2.0)
        await fetcher.aclose()
        return cancelled

    cancelled = asyncio.run(main())
    assert server.closed_at is not None and server.closed_at - cancelled < 1.0


def test_a_trickled_head_ends_by_the_deadline(serve: Any) -> None:
    server = serve(slow_head)
    fetcher = downloader(server, deadline=0.5)

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(errors.UpstreamTimeout):
            await fetcher.get(server.url(), {}, 5)
        assert time.monotonic() - started < 1.5  # each byte came well within the read timeout
        await fetcher.aclose()

    asyncio.run(main())


def test_endless_continues_are_refused(serve: Any) -> None:
    def continues(server: Server, conn: socket.socket) -> None:
        server.head(conn)
        while not server.stop.is_set():
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.001)

    server = serve(continues)
    fetcher = downloader(server)

    async def main() -> None:
        async with asyncio.timeout(3):
            with pytest.raises(errors.UpstreamError):
                await fetcher.get(server.url(), {}, 5)
        await fetcher.aclose()

    asyncio.run(main())


def test_cancelling_an_error_body_read_cuts_its_connection(serve: Any) -> None:
    server = serve(slow_error)
    fetcher = downloader(server)

    async def main() -> float:
        answer = await fetcher.get(server.url(), {}, 5)
        assert answer.status_code == 404
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await answer.aread()
        cancelled = time.monotonic()
        await asyncio.sleep(2.0)
        await answer.aclose()
        await fetcher.aclose()
        return cancelled

    cancelled = asyncio.run(main())
    assert server.closed_at is not None and server.closed_at - cancelled < 1.0


def test_an_error_body_is_read_by_the_deadline(serve: Any) -> None:
    server = serve(slow_error)
    fetcher = downloader(server, deadline=0.5)

    async def main() -> None:
        answer = await fetcher.get(server.url(), {}, 5)
        started = time.monotonic()
        await answer.aread()
        assert time.monotonic() - started < 1.0
        await answer.aclose()
        await fetcher.aclose()

    asyncio.run(main())


def test_a_cancelled_error_body_read_still_closes_the_answer() -> None:
    closed = asyncio.Event()

    class Hanging:
        status_code = 404
        headers: dict[str, str] = {}  # noqa: RUF012

        async def aread(self) -> bytes:
            await asyncio.sleep(3600)
            return b""

        async def aclose(self) -> None:
            closed.set()

    class Client:
        name = "up"

        async def get_blob(self, *args: Any, **kwargs: Any) -> Hanging:
            return Hanging()

    class Fills:
        async def open(self, digest: Digest, fetch: Any, *args: Any, **kwargs: Any) -> Any:
            return await fetch(0)

    async def main() -> None:
        service = BlobService(None, Fills())  # type: ignore[arg-type]
        digest = parse_digest("sha256:" + "0" * 64)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await service.open(Client(), "r", digest)  # type: ignore[arg-type]
        assert closed.is_set()

    asyncio.run(main())


def test_connections_per_upstream_are_limited(serve: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facade, "LIMIT", 2)
    release = threading.Event()

    def held(server: Server, conn: socket.socket) -> None:
        server.head(conn)
        release.wait(5)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        while server.head(conn) is not None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = serve(held)
    fetcher = downloader(server)

    async def main() -> None:
        gets = [asyncio.create_task(fetcher.get(server.url(), {}, 5)) for _ in range(3)]
        await asyncio.sleep(0.5)
        assert server.connections == 2
        # A cancelled request gives its place back.
        gets[0].cancel()
        await asyncio.sleep(0.5)
        assert server.connections == 3
        release.set()
        assert [await body(await get) for get in gets[1:]] == [b"ok", b"ok"]
        await fetcher.aclose()

    asyncio.run(main())


# -- kept-alive connections and informational answers ------------------------------------


@pytest.mark.parametrize("pause", [0.3, 0.0])
def test_bytes_past_the_body_never_answer_the_next_request(serve: Any, pause: float) -> None:
    def oversends(server: Server, conn: socket.socket) -> None:
        while server.head(conn) is not None:
            if len(server.lines) == 1:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                time.sleep(pause)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")

    server = serve(oversends)
    fetcher = downloader(server)

    async def main() -> bytes:
        assert await body(await fetcher.get(server.url("/one"), {}, 5)) == b"hello"
        await asyncio.sleep(0.5)
        second = await body(await fetcher.get(server.url("/two"), {"Authorization": "x"}, 5))
        await fetcher.aclose()
        return second

    assert asyncio.run(main()) == b"good"
    assert server.connections == 2


def test_early_hints_are_skipped(serve: Any) -> None:
    def hints(server: Server, conn: socket.socket) -> None:
        while (head := server.head(conn)) is not None:
            path = head.split(b" ")[1]
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                         b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n" + path[-4:])

    server = serve(hints)
    fetcher = downloader(server)

    async def main() -> list[tuple[int, bytes]]:
        got = []
        for path in ("/aaaa", "/bbbb"):
            answer = await fetcher.get(server.url(path), {}, 5)
            got.append((answer.status_code, await body(answer)))
        await fetcher.aclose()
        return got

    assert asyncio.run(main()) == [(200, b"aaaa"), (200, b"bbbb")]
    assert server.connections == 1  # and the connection was kept


# -- TLS ----------------------------------------------------------------------------------


def test_no_byte_after_an_abort_on_tls(serve: Any, tmp_path: Path) -> None:
    cert = make_server_cert(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert, cert.key)
    size = 32 << 20

    def big(server: Server, conn: socket.socket) -> None:
        server.head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"A" * (1 << 20)
        for _ in range(size >> 20):
            conn.sendall(chunk)

    server = serve(big, context)
    transport = Transport.for_upstream(server.url("", "https"), 2, 2, ca_file=str(cert.ca),
                                       client_cert=None, client_key=None, environ={})
    fetcher = Downloader("up", transport)

    async def main() -> None:
        answer = await fetcher.get(server.url("/blob", "https"), {}, 5)
        assert isinstance(answer, SocketBody)
        view = memoryview(bytearray(1 << 20))
        got = 0
        while got < 4 << 20:
            got += answer.readinto(view)
        time.sleep(0.3)  # the kernel's receive queue fills with records
        answer.abort()
        with pytest.raises(BodyBroken):
            answer.readinto(view)
        await answer.aclose()
        await fetcher.aclose()

    asyncio.run(main())


def test_a_certificate_for_another_name_is_refused(serve: Any, tmp_path: Path) -> None:
    cert = make_server_cert(tmp_path / "tls", names=("other.test",), ips=())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert, cert.key)
    server = serve(ok, context)
    transport = Transport.for_upstream(server.url("", "https"), 2, 2, ca_file=str(cert.ca),
                                       client_cert=None, client_key=None, environ={})
    fetcher = Downloader("up", transport)

    async def main() -> None:
        with pytest.raises(errors.UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
            await fetcher.get(server.url("/blob", "https"), {}, 5)
        await fetcher.aclose()

    asyncio.run(main())


# -- redirects ----------------------------------------------------------------------------


def redirecting(location: str, repeat: int = 1) -> Handler:
    def handler(server: Server, conn: socket.socket) -> None:
        while server.head(conn) is not None:
            if len(server.lines) == 1:
                target = location.format(port=server.port)
                conn.sendall(b"HTTP/1.1 307 Temporary Redirect\r\n"
                             + f"Location: {target}\r\n".encode("latin-1") * repeat
                             + b"Content-Length: 0\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return handler


@pytest.mark.parametrize("location", [
    "ftp://127.0.0.1:{port}/x", "gopher://127.0.0.1:{port}/x", "http://127.0.0.1:99999/x",
    "http://127.0.0.1:x/x",
])
def test_redirects_to_odd_places_are_refused(serve: Any, location: str) -> None:
    server = serve(redirecting(location))
    fetcher = downloader(server)

    async def main() -> None:
        with pytest.raises(errors.UpstreamError):
            await fetcher.get(server.url(), {}, 5)
        await fetcher.aclose()

    asyncio.run(main())
    assert len(server.lines) == 1


@pytest.mark.parametrize(("location", "line"), [
    ("/a b\x0bc", b"GET /a%20b%0Bc HTTP/1.1"),
    ("/a%2Fb%zz?q=1 2", b"GET /a%2Fb%25zz?q=1%202 HTTP/1.1"),
])
def test_redirect_targets_are_percent_encoded(serve: Any, location: str, line: bytes) -> None:
    server = serve(redirecting(location))
    fetcher = downloader(server)

    async def main() -> None:
        assert await body(await fetcher.get(server.url(), {}, 5)) == b"ok"
        await fetcher.aclose()

    asyncio.run(main())
    assert server.lines[1] == line


def test_a_redirect_naming_two_places_is_refused(serve: Any) -> None:
    server = serve(redirecting("/one\r\nLocation: /two"))
    fetcher = downloader(server)

    async def main() -> None:
        with pytest.raises(errors.UpstreamError):
            await fetcher.get(server.url(), {}, 5)
        await fetcher.aclose()

    asyncio.run(main())
    assert len(server.lines) == 1


def test_a_repeated_location_is_followed_once(serve: Any) -> None:
    server = serve(redirecting("/next", repeat=2))
    fetcher = downloader(server)

    async def main() -> None:
        assert await body(await fetcher.get(server.url(), {}, 5)) == b"ok"
        await fetcher.aclose()

    asyncio.run(main())
    assert server.lines[1] == b"GET /next HTTP/1.1"
