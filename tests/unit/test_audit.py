"""The audit log's writer: whole JSON lines, appended, bounded (drops counted and warned
about), reopened after a rename; and which requests make which entries."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.routing import Route

from mirror.audit import MANIFESTS, AuditLog, Entry, action_of, entry_of
from mirror.metrics import Metrics


def entry(n: int = 0, user: str = "alice") -> Entry:
    return Entry(1_700_000_000.25, "127.0.0.1", user, "pull-blob", "docker.io",
                 "library/alpine", f"sha256:{n:064x}", f"sha256:{n:064x}", "hit", 200, n)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(what: str, check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_lines_are_json_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path), interval=0.01)
    audit.start()
    audit.add(entry(7))
    audit.close()
    [line] = lines(path)
    assert line == {"time": "2023-11-14T22:13:20.250Z", "client": "127.0.0.1", "user": "alice",
                    "action": "pull-blob", "upstream": "docker.io",
                    "repository": "library/alpine", "reference": f"sha256:{7:064x}",
                    "digest": f"sha256:{7:064x}", "cache": "hit", "status": 200, "bytes": 7}


def test_control_characters_cannot_make_a_second_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path), interval=0.01)
    audit.start()
    audit.add(entry(user='evil\n{"user": "forged"}\x1b[2J'))
    audit.close()
    [line] = lines(path)
    assert line["user"].startswith("evil\n")


def test_a_full_buffer_drops_counts_and_warns(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path), metrics, interval=3600, capacity=4)
    # Not started: nothing drains the buffer, as when the disk is slower than the requests.
    started = time.perf_counter()
    for n in range(10):
        audit.add(entry(n))
    assert time.perf_counter() - started < 0.1, "adding never waits"
    assert audit.dropped == 6
    assert metrics.samples("mirror_audit_dropped_lines_total") == [({}, 6.0)]
    with caplog.at_level(logging.WARNING, logger="mirror.audit"):
        audit.start()
        audit.close()
    assert [e["bytes"] for e in lines(path)] == [0, 1, 2, 3]
    assert any("6 entries dropped" in r.getMessage() for r in caplog.records)


def test_reopen_after_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path), interval=0.01)
    audit.start()
    audit.add(entry(1))
    wait_for("the first line", lambda: path.exists() and path.read_text())
    path.rename(tmp_path / "audit.log.1")
    audit.add(entry(2))  # still the old file: nobody said to reopen
    wait_for("the second line", lambda: len(lines(tmp_path / "audit.log.1")) == 2)
    audit.reopen()
    audit.add(entry(3))
    audit.close()
    assert [e["bytes"] for e in lines(tmp_path / "audit.log.1")] == [1, 2]
    assert [e["bytes"] for e in lines(path)] == [3]


def test_writers_sharing_a_file_never_interleave(tmp_path: Path) -> None:
    """Two logs on one file (as two workers have): every line whole."""
    path = tmp_path / "audit.log"
    logs = [AuditLog(str(path), interval=0.001, capacity=100_000) for _ in range(2)]
    for log in logs:
        log.start()

    def burst(log: AuditLog, base: int) -> None:
        for n in range(5000):
            log.add(entry(base + n, user="u" * (n % 300)))

    threads = [threading.Thread(target=burst, args=(log, i * 100_000))
               for i, log in enumerate(logs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log.close()
    got = lines(path)  # every line parses
    assert sorted(e["bytes"] for e in got) == sorted(
        [*range(5000), *range(100_000, 105_000)])


def test_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    audit = AuditLog("-", interval=0.01)
    audit.start()
    audit.add(entry(3))
    audit.close()
    assert json.loads(capfd.readouterr().err.strip())["bytes"] == 3


@pytest.mark.parametrize(("route", "method", "status", "action"), [
    (MANIFESTS, "GET", 200, "pull-manifest"),
    (MANIFESTS, "HEAD", 401, "pull-manifest"),
    (MANIFESTS, "PUT", 201, "push-manifest"),
    (MANIFESTS, "DELETE", 202, "delete"),
    ("/v2/{name:path}/blobs/{digest}", "GET", 200, "pull-blob"),
    ("/v2/{name:path}/blobs/{digest}", "DELETE", 202, "delete"),
    ("/v2/{name:path}/blobs/uploads/", "POST", 202, "push-blob"),
    ("/v2/{name:path}/blobs/uploads/{session}", "PATCH", 202, "push-blob"),
    ("/v2/{name:path}/tags/list", "GET", 200, None),
    ("/v2/{name:path}/tags/list", "GET", 403, "denied"),
    (MANIFESTS, "GET", 403, "denied"),
])
def test_actions(route: str, method: str, status: int, action: str | None) -> None:
    assert action_of(route, method, status) == action


def scope(route: str, method: str, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "http", "method": method, "route": Route(route, lambda r: None),
            "state": state, "client": ("10.1.2.3", 5555), "headers": [], **extra}


def test_entries_from_requests() -> None:
    client = SimpleNamespace(name="docker.io")
    state = {"target": (client, "library/alpine"), "user": "bob", "cache": "miss"}
    made = entry_of(scope(MANIFESTS, "GET", state, path_params={"reference": "3.20"}), 200,
                    1638, [(b"docker-content-digest", b"sha256:abc"), (b"etag", b"x")])
    assert made is not None
    assert (made.client, made.user, made.action, made.upstream, made.repository, made.reference,
            made.digest, made.cache, made.status, made.bytes) == (
        "10.1.2.3", "bob", "pull-manifest", "docker.io", "library/alpine", "3.20",
        "sha256:abc", "miss", 200, 1638)
    # An upload's closing PUT: the reference is its ?digest=.
    upload = entry_of(scope("/v2/{name:path}/blobs/uploads/{session}", "PUT",
                            {"target": (client, "team/app")}, path_params={"session": "u1"},
                            query_string=b"digest=sha256%3Aaaa"), 201, 0, [])
    assert upload is not None and upload.reference == "sha256:aaa"
    assert upload.user == "anonymous"  # no Authorization header, no caller known
    # Credentials never known (a foreign token): "-".
    foreign = entry_of(scope(MANIFESTS, "GET", {"target": (client, "a/b"), "user": ""},
                             headers=[(b"authorization", b"Bearer xyz")]), 401, 0, [])
    assert foreign is not None and foreign.user == "-"
    # Not audited: the ping, listings that were served, unrouted paths.
    assert entry_of(scope("/v2/", "GET", {"target": (client, "")}), 401, 0, []) is None
    assert entry_of(scope("/v2/{name:path}/tags/list", "GET", {"target": (client, "a/b")}),
                    200, 10, []) is None
    assert entry_of({"type": "http", "method": "GET"}, 404, 0, []) is None
