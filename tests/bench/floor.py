#!/usr/bin/env python3
"""The floor of a verifying fill, for the benchmark's phase 6: the least a process can do
to serve one cold client of a blob and keep it, with no framework around it.

    python tests/bench/floor.py serve UPSTREAM_HOST:PORT PATH DIGEST DIR
    python tests/bench/floor.py sha256 [MiB]

`serve` listens on a loopback port (printed on its first line), answers one GET: opens the
upstream's PATH, reads its body into one reused 1 MiB buffer, hashes each piece and writes it
to a file in DIR (its blocks reserved ahead, as the mirror does), while a second thread sends
what landed to the client with sendfile(2), holding the last byte back until the digest
matches; then exits when its stdin closes (its CPU time can be read until then). That is the
mirror's data path (`mirror.datapath`, `mirror.zerocopy`) without the event loop, routing,
access checks, metrics or logs: what the mirror costs above it is the price of those.

`sha256` prints the CPU seconds per GiB of hashing alone (in memory, 1 MiB at a time).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's mirror
from mirror.datapath import BUFFER, RESERVE_AHEAD, WAKE_EVERY, reserve


def _head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise SystemExit("floor: connection closed before the end of the head")
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise SystemExit("floor: the upstream sent no Content-Length")


def serve(upstream: str, path: str, digest: str, directory: str) -> None:
    host, _, port = upstream.rpartition(":")
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    client, _ = listener.accept()
    _head(client)  # the client's GET; whatever it asked for, it gets the blob

    source = socket.create_connection((host, int(port)))
    source.sendall(f"GET {path} HTTP/1.1\r\nHost: {upstream}\r\n\r\n".encode())
    head, first = _head(source)
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"floor: upstream answered {head.splitlines()[0]!r}")
    size = _length(head)
    partial = os.path.join(directory, "floor.part")
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    client.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n"
                   "Connection: close\r\n\r\n".encode())

    landed = 0
    verified = failed = False
    changed = threading.Condition()

    def sendable() -> int:  # the last byte waits for the digest
        return landed if verified else min(landed, size - 1)

    def send() -> None:  # the client's side: the partial from the page cache
        sent = 0
        reader = os.open(partial, os.O_RDONLY)
        try:
            while sent < size:
                with changed:
                    while sendable() <= sent and not failed:
                        changed.wait()
                    if failed:
                        return
                    end = sendable()
                while sent < end:
                    sent += os.sendfile(client.fileno(), reader, sent, end - sent)
        finally:
            os.close(reader)
            client.close()

    sender = threading.Thread(target=send)
    sender.start()
    hasher = hashlib.sha256()
    buffer = memoryview(bytearray(BUFFER))
    got = reserved = since = 0
    pending = first
    while got < size:
        if pending:
            n = len(pending)
            buffer[:n] = pending
            pending = b""
        else:
            n = source.recv_into(buffer, min(BUFFER, size - got))
            if n == 0:
                raise SystemExit("floor: the upstream's body ended early")
        piece = buffer[:n]
        hasher.update(piece)
        if reserved < got + n:
            ahead = min(size, got + n + RESERVE_AHEAD) - reserved
            reserve(fd, reserved, ahead)
            reserved += ahead
        done = 0
        while done < n:
            done += os.write(fd, piece[done:])
        got += n
        since += n
        if since >= WAKE_EVERY or got == size:
            since = 0
            with changed:
                landed = got
                changed.notify()
    ok = "sha256:" + hasher.hexdigest() == digest
    with changed:
        verified, failed = ok, not ok  # a mismatch: the client sees a short body
        changed.notify()
    sender.join()
    os.close(fd)
    os.unlink(partial)
    source.close()
    if not ok:
        raise SystemExit("floor: digest mismatch")
    sys.stdin.read()


def sha256_cost(mib: int) -> float:
    """CPU seconds per GiB to hash `mib` MiB in memory, a buffer at a time."""
    data = memoryview(os.urandom(BUFFER))
    hasher = hashlib.sha256()
    started = time.process_time()
    for _ in range(mib):
        hasher.update(data)
    return (time.process_time() - started) * 1024 / mib


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 5:
        serve(*argv[1:])
        return 0
    if argv[:1] == ["sha256"] and len(argv) <= 2:
        print(f"{sha256_cost(int(argv[1]) if len(argv) == 2 else 1024):.3f}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
