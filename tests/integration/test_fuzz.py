"""Hostile input against the real server (a started mirror, the real upstream behind it).

Two properties, both driven by hypothesis over raw sockets (so nothing normalises what we
send):

1. Well-formed HTTP with hostile content (names, references and digests of the wrong shape,
   `..` plain and percent-encoded, NUL, huge values; odd Range, Accept and query strings;
   methods that make no sense): never a 500, every 4xx/5xx to a GET carries an OCI error body
   `{"errors": [{"code", "message"}]}`, and nothing is created outside the cache directory
   (the cache's parent is snapshotted) nor anywhere in it but where the layout says.
2. Malformed HTTP (bad request lines, NUL and spaces in the target, broken headers): these
   never reach the app, and uvicorn (httptools) answers them itself with a plain-text
   `400 Invalid HTTP request received.` and closes. We accept that: such requests come from
   no registry client, so an OCI body would help nobody, and the app (and the cache) never
   see them. The property is: a 4xx or a closed connection, never a 5xx, and the server
   stays up.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import StartMirror
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.registry import Upstream

from mirror.errors import SPEC_CODES

TIMEOUT = 20.0
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1500"))  # more for a longer campaign
HEX = "0123456789abcdef"

# Where the mirror may create files inside its cache directory.
LAYOUT = [re.compile(p) for p in (
    r"blobs(/(sha256(/[0-9a-f]{2}(/[0-9a-f]{64})?)?|/sha512(/[0-9a-f]{2}(/[0-9a-f]{128})?)?))?",
    r"tmp(/(sha256|sha512)-[0-9a-f]+\.(part|size|size\.\d+|\d+\.small))?",
    r"tmp/upload-[A-Za-z0-9_-]+\.part",
    r"locks(/((sha256|sha512)-[0-9a-f]+|tag-[0-9a-f]{64}|evict|[a-z]+-[0-9a-f]{64})\.lock)?",
    r"index(/[0-9a-f]{2}(/[0-9a-f]{2}(/[0-9a-f]+\.val)?)?)?",
    r"index/cache\.db(-wal|-shm|-journal)?",
    r"metadata\.db(-wal|-shm|-journal)?",
    r"tmp/(sha256|sha512)-[0-9a-f]+\.\d+-[0-9a-f]+\.own",
)]


def send(port: int, data: bytes, half_close: bool = False
         ) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes, read to EOF: (status or None if closed unanswered, headers, body).

    `half_close`: then send EOF, so a server waiting for the rest of a request stops waiting.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        with_eof = b""
        try:
            while chunk := sock.recv(1 << 16):
                with_eof += chunk
        except ConnectionResetError:
            pass
    if not with_eof:
        return None, {}, b""
    head, _, body = with_eof.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2:]
    return out


def tree(root: Path, skip: set[Path]) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in dirnames + filenames:
            found.add(str(Path(dirpath, name).relative_to(root)))
    return found


# -- strategies --------------------------------------------------------------------------------

def hex_digest(n: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=HEX, min_size=n, max_size=n)


HOSTILE = ["..", "%2e%2e", "%2E%2E", "%252e%252e", "..%2f..", "%2e%2e%2f%2e%2e%2fetc",
           "%00", "a%00b", "%2f", "%ff%fe", "caf%C3%A9", ".", "a//b", "-a", "a--", "A",
           "UPPER/Case", "a" * 300, "/".join(["a"] * 200), "%20", "a%0d%0aX-Injected:%201",
           "\\..\\..", "etc/passwd", "..;", "~root"]


@st.composite
def names(draw: st.DrawFn, real: list[str]) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.sampled_from(real))
    if kind == 1:
        return draw(st.sampled_from(HOSTILE))
    if kind == 2:
        parts = draw(st.lists(st.sampled_from([*HOSTILE, *real, "docker.io", "x"]),
                              min_size=1, max_size=4))
        return "/".join(parts)
    text = draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60))
    return quote(text, safe="/%:@")


@st.composite
def references(draw: st.DrawFn, real: list[str]) -> str:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.sampled_from(real))
    if kind == 1:
        return "sha256:" + draw(hex_digest(64))
    if kind == 2:
        algorithm = draw(st.sampled_from(["sha256", "sha512", "md5", "SHA256", "sha384", "",
                                          "sha256+b64", "a" * 100]))
        length = draw(st.sampled_from([0, 1, 32, 63, 64, 65, 127, 128, 129, 5000]))
        body = draw(st.text(alphabet=HEX + "ABCDEFxyz=_-", min_size=length, max_size=length))
        return f"{algorithm}:{body}"
    if kind == 3:
        return draw(st.sampled_from(["latest", "1.0", "_x", "-x", ".x", "a" * 129, "a" * 128,
                                     "..", "%2e%2e", "sha256:..%2f..%2f", "%00", "x%00",
                                     "sha256:" + "A" * 64, "sha256:%2e%2e", "::", ":"]))
    if kind == 4:
        return draw(st.sampled_from(HOSTILE))
    return quote(draw(st.text(max_size=80)), safe=":%")


@st.composite
def requests(draw: st.DrawFn, real_names: list[str], real_refs: list[str]) -> tuple[str, str,
                                                                                 bytes]:
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "PATCH",
                                   "DELETE", "OPTIONS", "TRACE", "PROPFIND", "FOO", "get"]))
    name = draw(names(real_names))
    ref = draw(references(real_refs))
    path = draw(st.sampled_from([
        f"/v2/{name}/manifests/{ref}", f"/v2/{name}/blobs/{ref}", f"/v2/{name}/tags/list",
        f"/v2/{name}/referrers/{ref}", f"/v2/{name}/blobs/uploads/",
        f"/v2/{name}/blobs/uploads/{ref}", f"/v2/{name}/{ref}", "/v2/", "/v2", f"/{name}",
        f"/v2/{ref}", "/token", f"//v2//{name}//manifests//{ref}", "/healthz", "/readyz",
        "/metrics",
    ]))
    query = draw(st.one_of(
        st.just(""),
        st.sampled_from(["ns=docker.io", "ns=", "ns=..", "ns=%00", "ns=" + "x" * 5000,
                         "n=-1", "n=999999999999999999999", "n=abc", "last=%2e%2e",
                         "artifactType=%00", "n=1&n=2&last=a&last=b", "&&&==", "x" * 20000,
                         "scope=repository:..:pull&service=x"]),
        st.text(max_size=100).map(lambda t: quote(t, safe="=&")),
    ))
    target = path + (f"?{query}" if query else "")
    headers = {"Host": "mirror.test", "Connection": "close"}
    if draw(st.booleans()):
        headers["Accept"] = draw(st.one_of(
            st.sampled_from([
                "*/*", "application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json;q=0.5, */*;q=0.1",
                ", , ,", "x" * 8000, ", ".join(f"type/{i}" for i in range(2000)), "\t"]),
            # Visible latin-1 only: control characters make it malformed HTTP (see below).
            st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]), max_size=200)))
    if draw(st.booleans()):
        headers["Range"] = draw(st.one_of(
            st.sampled_from(["bytes=0-0", "bytes=-1", "bytes=5-", "bytes=0-", "bytes=-0",
                             "bytes=100-50", "bytes=0-1,2-3", "bytes=99999999999999999999-",
                             "bytes=-99999999999999999999", "bytes=1-2-3", "bits=0-1",
                             "bytes=" + "9" * 5000, "bytes= 1 - 2 ", "bytes=--1", ""]),
            st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(-5, 2000),
                      st.integers(-5, 2000))))
    if draw(st.booleans()):
        headers["Authorization"] = draw(st.sampled_from([
            "Bearer junk", "Basic !!!", "Basic " + "QQ==" * 1000, "Bearer ", "Digest x",
            "Basic YWxpY2U6d3Jvbmc=", "Bearer caf\xe9", "Basic w6k6w6k=", "Basic 6Ono",
            "Basic Og==", "Basic YWxpY2U=", "bearer " + "x" * 5000]))
    if draw(st.integers(0, 9)) == 0:
        headers["X-Huge"] = "h" * draw(st.sampled_from([1000, 16000, 60000]))
    body = b""
    if method in ("POST", "PUT", "PATCH") and draw(st.booleans()):
        body = draw(st.binary(max_size=2000))
        headers["Content-Type"] = draw(st.sampled_from([
            "application/octet-stream", "application/vnd.oci.image.manifest.v1+json",
            "application/json", "caf\xe9/x", "", "a" * 3000]))
    if method == "PATCH" and draw(st.booleans()):
        headers["Content-Range"] = draw(st.sampled_from([
            "0-10", "bytes 0-10/*", "-1-5", "99999999999999999999-1", "5-2", "x", "\xe9"]))
    if body or method in ("POST", "PUT", "PATCH"):
        headers["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return method, target, head.encode("latin-1") + body


MALFORMED = st.one_of(
    st.sampled_from([
        b"GET /v2/\x00/manifests/x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/a b/manifests/x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /v2/\r\n\r\n",
        b"GET\r\n\r\n",
        b"\r\n\r\n",
        b"G\x00T /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nNo-Colon-Here\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: \x00\x01\r\n\r\n",
        b"GET /v2/" + b"a" * 100000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n",
        b"GET http://evil.example/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET ../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello's start
    ]),
    st.binary(min_size=1, max_size=300).map(lambda b: b + b"\r\n\r\n"),
    st.tuples(st.binary(max_size=10), st.binary(max_size=40)).map(
        lambda t: b"GET /v2/" + t[1] + b" HTTP/1.1\r\nHost: x" + t[0] + b"\r\n\r\n"),
)


def test_hostile_requests_never_crash_the_server_nor_escape_the_cache(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    world = tmp_path / "world"
    cache = world / "cache"
    mirror = start_mirror(cache_dir=cache, env={"MIRROR_CONNECT_TIMEOUT": "5",
                                                "MIRROR_READ_TIMEOUT": "5"})
    logs = mirror.log_dir
    small = [upstream.images[r] for r in ("test/oci-single:1.0", "library/small:latest",
                                          "test/oci-index:1.0", "private/secret:1.0")]
    real_names = [i.repo for i in small] + ["small", "docker.io/test/oci-single"]
    real_refs = [r for i in small for r in (i.tag, i.digest, *(d for d, _ in i.blobs))]
    before = tree(tmp_path, skip={cache, logs})
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests(real_names, real_refs))
    def well_formed(request: tuple[str, str, bytes]) -> None:
        method, target, data = request
        status, headers, body = send(mirror.port, data)
        assert status is not None, f"no answer to {data[:300]!r}"
        seen[status] = seen.get(status, 0) + 1
        if status >= 500:
            print("5xx:", status, method, target[:150], body[:300])
        assert status != 500 and status < 600, (status, target[:300], body[:500])
        if status >= 400 and method == "GET" and target.startswith("/v2"):
            assert headers.get("content-type", "").startswith("application/json"), (
                status, target[:300], headers, body[:300])
            errors = json.loads(body)["errors"]
            assert errors and all(isinstance(e["code"], str) and isinstance(e["message"], str)
                                  for e in errors), body[:300]
            assert all(e["code"] in SPEC_CODES for e in errors), body[:300]

    @settings(max_examples=EXAMPLES // 3, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(MALFORMED)
    def malformed(data: bytes) -> None:
        status, _, body = send(mirror.port, data, half_close=True)
        assert status is None or 400 <= status < 500, (status, data[:200], body[:300])

    started = time.monotonic()
    well_formed()
    middle = time.monotonic()
    malformed()
    print(f"fuzzed for {middle - started:.1f} + {time.monotonic() - middle:.1f} s; "
          f"statuses {dict(sorted(seen.items()))}")

    # Still up, nothing crashed, nothing created where it should not be.
    assert mirror.alive
    status, _, _ = send(mirror.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status in (200, 401)
    assert tree(tmp_path, skip={cache, logs}) == before
    stray = sorted(p for p in tree(cache, set()) if not any(r.fullmatch(p) for r in LAYOUT))
    assert stray == [], stray
    log = mirror.log_text()
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]


@pytest.mark.parametrize("reference", ["%2e%2e%2f%2e%2e%2findex%2fcache.db", "..%2f..%2fx"])
def test_traversal_in_a_reference_is_refused_as_invalid(
    start_mirror: StartMirror, reference: str
) -> None:
    mirror = start_mirror()
    for kind in ("manifests", "blobs"):
        status, _, body = send(mirror.port, (
            f"GET /v2/test/oci-single/{kind}/{reference} HTTP/1.1\r\nHost: x\r\n"
            "Connection: close\r\n\r\n").encode())
        assert status in (400, 404), body
        assert json.loads(body)["errors"][0]["code"] in (
            "MANIFEST_INVALID", "DIGEST_INVALID", "NAME_INVALID", "UNSUPPORTED")
