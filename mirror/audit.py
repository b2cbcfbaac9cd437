"""The audit log: one JSON object per line for every request that reads or writes content.

    {"time": "2025-01-31T12:00:00.123Z", "client": "10.0.0.5", "user": "alice",
     "action": "pull-manifest", "upstream": "docker.io", "repository": "library/alpine",
     "reference": "3.20", "digest": "sha256:...", "cache": "hit", "status": 200,
     "bytes": 1638}

`action` is `pull-manifest`, `pull-blob`, `push-manifest`, `push-blob`, `delete`, or `denied`
(a 403: the repository policy or the upstream refused). `user` is the account the caller
logged in as (the mirror's tokens carry it), `anonymous`, or `-` when unknown; credentials
themselves never appear. Entries are made by the access-log middleware from what the routes
left in `request.state` (target, user, cache) and the answer (status, bytes, digest).

Writing never holds up an answer: entries go into a bounded buffer, and a thread of their
own writes them out in whole lines (JSON is encoded there too). When the buffer is full an
entry is dropped, counted (`mirror_audit_dropped_lines_total`) and warned about, rather
than making a request wait. The file is opened with O_APPEND and written in whole lines, at
most `PIPE_BUF` bytes a write where possible, so the lines of several workers sharing it
never interleave. `reopen` (on SIGHUP) opens the path again, for logrotate's rename.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qs

from mirror.metrics import Metrics

log = logging.getLogger("mirror.audit")

STDERR = "-"
CAPACITY = 10_000  # entries buffered at most; past that they are dropped
INTERVAL = 0.2  # seconds between writes, at most
WRITE_SIZE = 4096  # bytes of whole lines per write (PIPE_BUF: atomic on pipes too)
WARN_EVERY = 10.0  # seconds between two warnings about drops
FIELD_MAX = 256  # characters kept of a client-controlled field

MANIFESTS = "/v2/{name:path}/manifests/{reference}"
BLOBS = "/v2/{name:path}/blobs/{digest}"
UPLOADS = ("/v2/{name:path}/blobs/uploads/", "/v2/{name:path}/blobs/uploads/{session}")
ACTIONS: dict[tuple[str, str], str] = {
    (MANIFESTS, "GET"): "pull-manifest", (MANIFESTS, "HEAD"): "pull-manifest",
    (MANIFESTS, "PUT"): "push-manifest", (MANIFESTS, "DELETE"): "delete",
    (BLOBS, "GET"): "pull-blob", (BLOBS, "HEAD"): "pull-blob", (BLOBS, "DELETE"): "delete",
}


class Entry(NamedTuple):
    at: float  # time.time()
    client: str
    user: str
    action: str
    upstream: str
    repository: str
    reference: str
    digest: str
    cache: str
    status: int
    bytes: int

    def line(self) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.at))
        record: dict[str, Any] = self._asdict()
        del record["at"]
        # json.dumps escapes control and non-ASCII characters: one entry is one line.
        return json.dumps({"time": f"{seconds}.{int(self.at % 1 * 1000):03d}Z", **record},
                          separators=(",", ":"))


def action_of(route: str, method: str, status: int) -> str | None:
    """The audit action of a request to `route` (its pattern), or None if it is no content
    read or write (listings are audited only when denied)."""
    if status == 403:
        return "denied"
    if route in UPLOADS:
        return "push-blob"
    return ACTIONS.get((route, method))


def entry_of(scope: MutableMapping[str, Any], status: int, sent: int,
             headers: Sequence[tuple[bytes, bytes]]) -> Entry | None:
    """The entry for a finished request, if it is one to audit. `headers`: the answer's."""
    route = scope.get("route")
    state: Mapping[str, Any] = scope.get("state") or {}
    target = state.get("target")
    if route is None or not target or not target[1]:
        return None  # not a request naming a repository (or its name was refused as such)
    action = action_of(route.path, scope["method"], status)
    if action is None:
        return None
    params = scope.get("path_params") or {}
    reference = params.get("reference") or params.get("digest") or ""
    if not reference and scope.get("query_string"):  # an upload: its closing ?digest=
        query = parse_qs(scope["query_string"].decode("latin-1"))
        reference = (query.get("digest") or query.get("mount") or [""])[0]
    digest = next((v.decode("latin-1") for k, v in headers
                   if k.lower() == b"docker-content-digest"), "")
    user = state.get("user") or ("-" if _has_authorization(scope) else "anonymous")
    client = (scope.get("client") or ("-",))[0]
    return Entry(time.time(), str(client), _clip(user), action, target[0].name, target[1],
                 _clip(str(reference)), _clip(digest), str(state.get("cache", "-")), status,
                 sent)


def _has_authorization(scope: Mapping[str, Any]) -> bool:
    return any(k == b"authorization" for k, _ in scope.get("headers") or ())


def _clip(text: str) -> str:
    return text[:FIELD_MAX]


class AuditLog:
    """The buffer and its writer thread. `start` and `close` bracket its use."""

    def __init__(self, path: str, metrics: Metrics | None = None, *,
                 interval: float = INTERVAL, capacity: int = CAPACITY) -> None:
        self.path = path
        self.metrics = metrics
        self.interval = interval
        self.capacity = capacity
        self._full = 0  # entries dropped for a full buffer (counted on the request path)
        self._lost = 0  # entries that could not be written (counted by the writer)
        self._error = ""
        self._entries: collections.deque[Entry] = collections.deque()
        self._wake = threading.Event()
        self._reopen = False
        self._stop = False
        self._fd = -1
        self._thread: threading.Thread | None = None
        self._reported = 0  # drops already warned about
        self._warned_at = 0.0

    def start(self) -> None:
        self._fd = self._open()
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    def add(self, entry: Entry) -> None:
        """From the request path: never blocks, never raises."""
        if len(self._entries) >= self.capacity:
            self._full += 1
            if self.metrics is not None:
                self.metrics.audit_dropped.inc()
            self._wake.set()
            return
        self._entries.append(entry)
        if len(self._entries) >= self.capacity // 2:
            self._wake.set()

    @property
    def dropped(self) -> int:
        """Entries dropped so far in this process."""
        return self._full + self._lost

    def reopen(self) -> None:
        """Open the path again before the next write (SIGHUP, after logrotate's rename)."""
        self._reopen = True
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered, stop the thread, close the file."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._fd > 2:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1

    # -- the writer thread ---------------------------------------------------------------

    def _open(self) -> int:
        if self.path == STDERR:
            return 2
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stop
            if self._reopen:
                self._reopen = False
                self._swap()
            self._drain()
            self._report()
            if stopping:
                return

    def _swap(self) -> None:
        try:
            fd = self._open()
        except OSError as exc:
            log.warning("audit log: cannot reopen %s (%s); still writing the old file",
                        self.path, exc.strerror)
            return
        old, self._fd = self._fd, fd
        if old > 2:
            with contextlib.suppress(OSError):
                os.close(old)

    def _drain(self) -> None:
        chunk: list[bytes] = []
        size = 0
        while self._entries:
            line = (self._entries.popleft().line() + "\n").encode()
            if chunk and size + len(line) > WRITE_SIZE:
                self._write(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(chunk)

    def _write(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        try:
            while data:  # a short write is rare (a full disk); the rest goes after it
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            lost = data.count(b"\n")
            self._lost += lost
            self._error = f": {exc.strerror}"
            if self.metrics is not None:
                self.metrics.audit_dropped.inc(lost)

    def _report(self) -> None:
        fresh = self.dropped - self._reported
        now = time.monotonic()
        if fresh and now - self._warned_at >= WARN_EVERY:
            log.warning("audit log: %d entries dropped (the writer could not keep up, or "
                        "could not write %s%s)", fresh, self.path, self._error)
            self._reported, self._warned_at = self.dropped, now
