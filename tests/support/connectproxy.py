"""An HTTP CONNECT proxy on loopback that tunnels only to the addresses it is given.

It lets a daemon reach a test server by a name that does not resolve (dockerd treats every
address it can resolve to 127.0.0.0/8 as an insecure registry, skipping TLS verification):
the daemon's HTTPS_PROXY points here and `routes` maps "name:port" to a loopback address.
Anything else is refused (403) and recorded, so nothing ever leaves the machine.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import socketserver
import threading
from types import TracebackType

from .procs import free_port


class ConnectProxy:
    def __init__(self, routes: dict[str, tuple[str, int]]) -> None:
        self.routes = routes
        self.tunnels: list[str] = []
        self.refused: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="connect-proxy")

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 16384:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = request_line.partition(" ")
        target = rest.split(" ", 1)[0]
        if method != "CONNECT" or target not in self.routes:
            self.refused.append(request_line)
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        self.tunnels.append(target)
        with socket.create_connection(self.routes[target], timeout=30) as upstream:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            extra = head.split(b"\r\n\r\n", 1)[1]
            if extra:
                upstream.sendall(extra)
            self._pipe(client, upstream)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while True:
                events = sel.select(timeout=60)
                if not events:
                    return
                for key, _ in events:
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(65536)
                    except OSError:
                        return
                    if not data:
                        with contextlib.suppress(OSError):
                            key.data.shutdown(socket.SHUT_WR)
                        return
                    key.data.sendall(data)

    def start(self) -> ConnectProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ConnectProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
