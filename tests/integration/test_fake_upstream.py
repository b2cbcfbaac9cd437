"""Behaviour that needs an upstream misbehaving on cue: corrupt blobs, CDN redirects, slow
bodies with clients leaving, rate limits."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
from conftest import StartMirror
from support.fake_upstream import FakeUpstream


@pytest.fixture
def fake() -> FakeUpstream:
    with FakeUpstream() as upstream:
        yield upstream


def cached_files(cache_dir: object) -> list[str]:
    return [name for _, _, files in os.walk(f"{cache_dir}/blobs") for name in files]


def test_corrupt_blob_aborts_the_client_and_is_never_cached(
    fake: FakeUpstream, start_mirror: StartMirror
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = fake.add_blob(data)
    fake.corrupt.add(digest)
    mirror = start_mirror(upstreams=[("fake", fake.url)])
    url = f"{mirror.url}/v2/owner/img/blobs/{digest}"
    for _ in range(2):
        received = bytearray()
        with pytest.raises(httpx.HTTPError), httpx.stream("GET", url, timeout=30) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += chunk
        assert len(received) < len(data)  # never a clean, complete, wrong body
    assert cached_files(mirror.cache_dir) == []
    assert fake.count("GET", f"/blobs/{digest}") == 2  # nothing cached: both went upstream


def test_cdn_redirect_is_followed_without_our_authorization(
    fake: FakeUpstream, start_mirror: StartMirror
) -> None:
    data = os.urandom(200_000)
    digest = fake.add_blob(data)
    fake.redirect_blobs = True
    mirror = start_mirror(upstreams=[("fake", fake.url)])
    response = httpx.get(f"{mirror.url}/v2/owner/img/blobs/{digest}", timeout=30)
    assert response.status_code == 200
    assert response.content == data
    cdn = [s for s in fake.seen if s.path.startswith("/cdn/")]
    assert len(cdn) == 1
    assert "authorization" not in cdn[0].headers
    registry = [s for s in fake.seen if s.path.endswith(digest) and not s.path.startswith("/cdn")]
    assert registry[-1].headers["authorization"] == "Bearer fake-token"
    # The anonymous token was fetched once and reused.
    httpx.get(f"{mirror.url}/v2/owner/img/blobs/{fake.add_blob(b'x' * 10)}", timeout=30)
    assert sum(1 for s in fake.seen if s.path == "/token") == 1


def test_first_client_leaving_does_not_break_the_fill(
    fake: FakeUpstream, start_mirror: StartMirror
) -> None:
    data = os.urandom(8 * 1024 * 1024)
    digest = fake.add_blob(data)
    fake.chunk_delay = 0.01  # ~1.3 s for the whole body
    mirror = start_mirror(upstreams=[("fake", fake.url)])
    url = f"{mirror.url}/v2/owner/img/blobs/{digest}"
    results: dict[str, bytes] = {}

    def full(name: str) -> None:
        results[name] = httpx.get(url, timeout=60).content

    with httpx.stream("GET", url, timeout=60) as first:
        got = 0
        for chunk in first.iter_raw():
            got += len(chunk)
            if got >= 1024 * 1024:
                break
        late = threading.Thread(target=full, args=("late",))
        late.start()
    # The first client is gone; the late joiner still gets every byte.
    late.join(60)
    assert results["late"] == data
    assert fake.count("GET", f"/blobs/{digest}") == 1
    again = httpx.get(url, timeout=30)
    assert again.content == data
    assert fake.count("GET", f"/blobs/{digest}") == 1


def test_a_fill_whose_only_client_left_completes_into_the_cache(
    fake: FakeUpstream, start_mirror: StartMirror
) -> None:
    data = os.urandom(4 * 1024 * 1024)
    digest = fake.add_blob(data)
    fake.chunk_delay = 0.005
    mirror = start_mirror(upstreams=[("fake", fake.url)])
    url = f"{mirror.url}/v2/owner/img/blobs/{digest}"
    with httpx.stream("GET", url, timeout=60) as response:
        next(response.iter_raw())
    deadline = time.monotonic() + 30
    while not cached_files(mirror.cache_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cached_files(mirror.cache_dir) == [digest.removeprefix("sha256:")]
    assert httpx.get(url, timeout=30).content == data
    assert fake.count("GET", f"/blobs/{digest}") == 1


def test_rate_limit_is_passed_on_with_retry_after(
    fake: FakeUpstream, start_mirror: StartMirror
) -> None:
    fake.status_override["/v2/owner/img/manifests/1.0"] = (429, {"Retry-After": "42"})
    mirror = start_mirror(upstreams=[("fake", fake.url)])
    response = httpx.get(f"{mirror.url}/v2/owner/img/manifests/1.0", timeout=30)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "42"
    error = response.json()["errors"][0]
    assert error["code"] == "TOOMANYREQUESTS"
    assert "fake" in error["message"]


def test_range_on_a_blob_still_downloading(fake: FakeUpstream, start_mirror: StartMirror) -> None:
    data = os.urandom(6 * 1024 * 1024)
    digest = fake.add_blob(data)
    fake.chunk_delay = 0.01
    mirror = start_mirror(upstreams=[("fake", fake.url)])
    url = f"{mirror.url}/v2/owner/img/blobs/{digest}"
    with httpx.stream("GET", url, timeout=60) as first:
        part = httpx.get(url, headers={"Range": "bytes=1000-1999"}, timeout=60)
        assert part.status_code == 206
        assert part.content == data[1000:2000]
        assert first.read() == data
    assert fake.count("GET", f"/blobs/{digest}") == 1


def test_a_missing_tag_is_remembered_briefly(fake: FakeUpstream, start_mirror: StartMirror) -> None:
    ttl = 4.0
    mirror = start_mirror(upstreams=[("fake", fake.url)], args=["--negative-ttl", str(ttl)])
    url = f"{mirror.url}/v2/owner/img/manifests/nope"
    started = time.monotonic()
    for _ in range(20):
        response = httpx.get(url, timeout=30)
        assert response.status_code == 404
        assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # One upstream HEAD per negative_ttl at most, however slow the machine was meanwhile.
    asked = fake.count("HEAD", "/manifests/nope")
    assert 1 <= asked <= 1 + int((time.monotonic() - started) // ttl)
    time.sleep(ttl + 0.2)
    assert httpx.get(url, timeout=30).status_code == 404
    assert fake.count("HEAD", "/manifests/nope") == asked + 1


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'],
    ids=["not-json", "oversized"])
def test_an_invalid_or_oversized_upstream_manifest_is_not_cached(
    fake: FakeUpstream, start_mirror: StartMirror, body: bytes
) -> None:
    fake.manifests["1.0"] = ("application/vnd.oci.image.manifest.v1+json", body)
    mirror = start_mirror(upstreams=[("fake", fake.url)])
    for _ in range(2):
        response = httpx.get(f"{mirror.url}/v2/owner/img/manifests/1.0", timeout=30)
        assert response.status_code == 502
        message = response.json()["errors"][0]["message"]
        assert "not valid JSON" in message or "over 4 MiB" in message
    assert cached_files(mirror.cache_dir) == []


def test_a_blob_sent_chunked_without_a_length_streams_and_is_cached(
    fake: FakeUpstream, start_mirror: StartMirror
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    digest = fake.add_blob(data)
    fake.unsized.add(digest)
    fake.chunk_delay = 0.001  # the client is there while the blob is still coming
    mirror = start_mirror(upstreams=[("fake", fake.url)])
    url = f"{mirror.url}/v2/owner/img/blobs/{digest}"
    with httpx.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers  # the mirror does not know it yet
        assert response.headers.get("transfer-encoding") == "chunked"
        assert response.read() == data
    deadline = time.monotonic() + 10
    while not cached_files(mirror.cache_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    again = httpx.get(url, timeout=60)  # from the cache, with its length now
    assert again.content == data and again.headers["content-length"] == str(len(data))
    assert fake.count("GET", f"/blobs/{digest}") == 1
