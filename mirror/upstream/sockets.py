"""Blocking sockets seen from other threads: cutting one (every blocking call on it ends at
once), cutting every socket a request uses, and telling whether an idle one is quiet."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading


def cut(sock: socket.socket) -> None:
    """End every blocking call on `sock` at once, from any thread. The plain socket's
    shutdown: `SSLSocket.shutdown` would also drop the TLS layer, and a read racing it
    would then return the raw ciphertext."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def quiet(sock: socket.socket) -> bool:
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


class Cut:
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
            cut(sock)
            sock.close()

    def finish(self) -> None:
        """The request is over: its sockets are its answer's (or closed)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()
