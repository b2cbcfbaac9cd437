"""Hardening against a real `mirror serve`: what a cut stream logs, and request bodies that
are refused while they stream."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest
from conftest import StartMirror
from support.fake_upstream import FakeUpstream


def test_a_cut_stream_is_one_log_line_not_a_traceback(start_mirror: StartMirror) -> None:
    with FakeUpstream() as fake:
        data = os.urandom(3 * 1024 * 1024)
        digest = fake.add_blob(data)
        fake.corrupt.add(digest)
        mirror = start_mirror(upstreams=[("fake", fake.url)])
        url = f"{mirror.url}/v2/owner/img/blobs/{digest}"
        with pytest.raises(httpx.HTTPError), httpx.stream("GET", url, timeout=30) as response:
            assert response.status_code == 200
            for _ in response.iter_raw():
                pass
        time.sleep(0.5)  # the log is written in batches
        log = mirror.log_text()
        assert "Traceback" not in log, log[-3000:]
        assert sum(1 for line in log.splitlines() if " cut GET " in line) == 1, log[-3000:]
        assert "without completing response" not in log


def test_huge_token_forms_are_refused_while_they_stream(start_mirror: StartMirror) -> None:
    """Four anonymous 300 MiB bodies used to be read whole first (1.5 GB of memory)."""
    mirror = start_mirror()
    rss_before = rss(mirror)
    sockets = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", mirror.port), timeout=10)
        sock.sendall(b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
        sockets.append(sock)
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"a" * (1 << 20))
    answered = 0
    for sock in sockets:
        try:
            for _ in range(300):
                sock.sendall(chunk)
        except OSError:
            pass  # refused and closed: what we want
        sock.settimeout(10)
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
        answered += answer.startswith(b"HTTP/1.1 400")
        sock.close()
    assert answered == 4
    assert rss(mirror) - rss_before < 100 * 2**20
    assert httpx.get(f"{mirror.url}/v2/", timeout=10).status_code == 401


def rss(mirror: object) -> int:
    pid = mirror.proc.pid  # type: ignore[attr-defined]
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
