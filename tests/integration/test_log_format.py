"""Every line a real `mirror serve` writes on stderr, uvicorn's included, is in the chosen
format; paths in the plain access log cannot forge lines or reach a terminal."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import httpx
import pytest
from conftest import StartMirror
from support.procs import MirrorProc
from support.registry import Upstream


def raw_request(mirror: MirrorProc, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def exercise(mirror: MirrorProc, upstream: Upstream) -> None:
    """Requests that make the mirror and uvicorn log: answers, errors, a request httptools
    cannot parse, one that never finishes its headers."""
    image = upstream.images["test/oci-single:1.0"]
    accept = {"Accept": image.media_type}
    assert httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}", headers=accept,
                     trust_env=False).status_code == 200
    assert httpx.get(f"{mirror.url}/v2/a%0aFORGED%1b[31m/manifests/x",
                     trust_env=False).status_code in (400, 404)
    assert raw_request(mirror, b"NOT HTTP AT ALL\x1b\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw_request(mirror, b"GET /v2/ HTTP/1.1\r\nHo").startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("args", [["--log-format", "json"], ["--access-log", "json"]],
                         ids=["log-format", "legacy-access-log"])
def test_every_stderr_line_is_json_in_json_mode(
    upstream: Upstream, start_mirror: StartMirror, args: list[str]
) -> None:
    mirror = start_mirror(workers=2, args=[*args, "--header-timeout", "1"])
    exercise(mirror, upstream)
    time.sleep(0.5)  # the access log is written in batches, within 0.2 s
    mirror.stop()  # shutdown lines too
    lines = mirror.log_text().splitlines()
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line, or this fails naming it
        assert isinstance(entry, dict), line
        entries.append(entry)
    loggers = {e.get("logger") for e in entries}
    messages = " ".join(str(e.get("message", "")) for e in entries)
    assert "uvicorn.error" in loggers
    assert "Application startup complete" in messages
    assert "Invalid HTTP request received" in messages
    assert "Finished server process" in messages
    paths = [e["path"] for e in entries if "path" in e]
    assert "/v2/a%0aFORGED%1b[31m/manifests/x" in paths


def test_plain_lines_cannot_be_forged(upstream: Upstream, start_mirror: StartMirror) -> None:
    mirror = start_mirror(args=["--header-timeout", "1"])
    exercise(mirror, upstream)
    time.sleep(0.5)
    mirror.stop()
    log = mirror.log_text()
    assert "\x1b" not in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert '"GET /v2/a%0aFORGED%1b[31m/manifests/x" ' in log
    assert " WARNING uvicorn.error: Invalid HTTP request received." in log
    assert " INFO uvicorn.error: Application startup complete." in log
