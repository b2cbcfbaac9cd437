"""Slow and huge request headers against a real `mirror serve`: connections that never finish
their headers are closed after header_timeout, headers over 64 KiB get 431, and normal
requests keep being answered quickly meanwhile."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import StartMirror
from support.procs import MirrorProc
from support.registry import Upstream

TIMEOUT = 1.0  # the header_timeout given to the mirror


def connect(mirror: MirrorProc) -> socket.socket:
    return socket.create_connection(("127.0.0.1", mirror.port), timeout=30)


def read_all(sock: socket.socket, limit: float = 30) -> bytes:
    """Everything until the server closes (bounded by `limit` seconds)."""
    sock.settimeout(limit)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, on a connection kept open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def timed_request(mirror: MirrorProc) -> float:
    """Seconds for one GET /healthz on a new connection (fails unless answered 200)."""
    started = time.monotonic()
    with connect(mirror) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_all(sock, 10)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return time.monotonic() - started


def status_and_body(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def rss_kib(mirror: MirrorProc) -> int:
    """Resident memory of the mirror's processes, summed."""
    assert mirror.proc is not None
    pids = [mirror.proc.pid]
    for children in Path(f"/proc/{mirror.proc.pid}/task").glob("*/children"):
        pids += map(int, children.read_text().split())
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_connections_that_never_finish_their_headers_are_closed(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(args=["--header-timeout", str(TIMEOUT)])
    sockets = []
    started = time.monotonic()
    try:
        for _ in range(300):
            sock = connect(mirror)
            sock.sendall(b"GET /v2/ HT")  # a partial request line, never finished
            sockets.append(sock)
        opened = time.monotonic() - started
        # Meanwhile a normal request is answered at once.
        normal = timed_request(mirror)
        assert normal < 2, normal
        closed_after = []
        for sock in sockets:
            answer = read_all(sock, 30)
            closed_after.append(time.monotonic() - started)
            status, body = status_and_body(answer)
            assert status == 408, answer
            assert body["errors"][0]["code"] == "UNSUPPORTED"  # type: ignore[index]
    finally:
        for sock in sockets:
            sock.close()
    print(f"\n300 slow connections opened in {opened:.2f}s; normal request {normal * 1000:.1f} ms;"
          f" all closed {max(closed_after):.2f}s after the first was opened")
    assert max(closed_after) < opened + TIMEOUT + 10
    assert timed_request(mirror) < 2
    # A client slower than a byte at a time, but within the time, is served.
    with connect(mirror) as sock:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n":
            sock.sendall(bytes([byte]))
            time.sleep(TIMEOUT / 200)
        assert read_all(sock).startswith(b"HTTP/1.1 200")


def test_a_header_flood_is_cut_off_with_431(upstream: Upstream, start_mirror: StartMirror) -> None:
    mirror = start_mirror(args=["--header-timeout", "30"])
    rss_before = rss_kib(mirror)
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:  # normal requests all along
        while not stop.is_set() and len(latencies) < 1000:
            latencies.append(timed_request(mirror))
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    sent = 0
    started = time.monotonic()
    try:
        with connect(mirror) as sock:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Flood: ")
            chunk = b"a" * (1 << 20)
            try:
                while sent < 100 * (1 << 20):  # 100 MB of one header
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = read_all(sock, 10)
        cut = time.monotonic() - started
    finally:
        stop.set()
        prober.join(60)
    rss_after = rss_kib(mirror)
    status, body = status_and_body(answer)
    print(f"\nheader flood: cut off after {sent / 2**20:.0f} MiB sent in {cut:.2f}s; mirror RSS "
          f"{rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB; {len(latencies)} normal "
          f"requests meanwhile, slowest {max(latencies) * 1000:.1f} ms")
    assert status == 431
    assert body["errors"][0]["code"] == "SIZE_INVALID"  # type: ignore[index]
    assert sent < 100 * (1 << 20)  # the server stopped reading long before the end
    assert rss_after - rss_before < 30 * 1024
    assert latencies and max(latencies) < 2
    assert timed_request(mirror) < 2


@pytest.mark.parametrize("workers", [1, 2])
def test_kept_alive_connections_must_send_the_next_headers_in_time(
    upstream: Upstream, start_mirror: StartMirror, workers: int
) -> None:
    mirror = start_mirror(workers=workers, args=["--header-timeout", str(TIMEOUT)])
    with connect(mirror) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200"), first
        time.sleep(TIMEOUT / 2)  # within the time: the next request is served
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost:")  # ...and then never finished
        answer = read_all(sock, 30)
        waited = time.monotonic() - answered
    assert status_and_body(answer)[0] == 408
    assert TIMEOUT * 0.9 < waited < TIMEOUT + 5, waited
    # Request headers just under the limit are fine.
    with connect(mirror) as sock:
        filler = b"X-Pad: " + b"p" * (60 * 1024) + b"\r\n"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + filler
                     + b"Connection: close\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200")
