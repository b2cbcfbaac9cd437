"""Kept-alive connections to upstreams, reused per origin and proxy: a quiet idle one if
there is one, else a new socket opened as `mirror.upstream.transport` says."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

from mirror.upstream.sockets import Cut, quiet
from mirror.upstream.transport import Connected, Transport

IDLE = 30.0  # seconds a kept-alive connection may wait for its next request
KEEP = 8  # idle connections kept per origin (and proxy)

Key = tuple[str, str, str | None]  # scheme, host:port, proxy


class Connection:
    def __init__(self, key: Key, connected: Connected) -> None:
        self.key = key
        self.sock = connected.sock
        self.absolute = connected.absolute
        self.headers = connected.headers
        self.idle_since = 0.0

    def close(self) -> None:
        self.sock.close()


class Pool:
    """Kept-alive connections by (scheme, host:port, proxy); thread-safe."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._idle: dict[Key, list[Connection]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def get(self, url: str, cut: Cut, until: float) -> tuple[Connection, bool]:
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
            if now - conn.idle_since < IDLE and quiet(conn.sock):
                cut.watch(conn.sock)
                return conn, True
            conn.close()
        return Connection(key, self.transport.open_socket(url, cut.watch, until)), False

    def put(self, conn: Connection) -> None:
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
