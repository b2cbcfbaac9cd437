"""One upstream fetch feeds every waiter, across worker processes."""

from __future__ import annotations

import hashlib
import os
import threading

import httpx
from conftest import StartMirror
from support.fake_upstream import FakeUpstream
from support.registry import Upstream

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


def fetch_all(urls: list[str], headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """GET every URL at once from its own thread; each with its own connection."""
    results: list[httpx.Response | None] = [None] * len(urls)
    barrier = threading.Barrier(len(urls))

    def one(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            results[i] = client.get(urls[i], headers=headers)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_concurrent_cold_clients_across_two_workers_cause_one_upstream_get(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(workers=2)
    image = upstream.images["test/big:1.0"]
    digest, size = max(image.blobs, key=lambda blob: blob[1])
    mark = upstream.registry.mark()
    responses = fetch_all([f"{mirror.url}/v2/{image.repo}/blobs/{digest}"] * 8)
    expected = image.read_blob(digest)
    for response in responses:
        assert response.status_code == 200
        assert len(response.content) == size
        assert response.content == expected
    # (a first GET refused with 401 only teaches the mirror the token realm)
    gets = [r for r in upstream.registry.requests(since=mark) if r.is_blob_get and r.status == 200]
    assert len(gets) == 1


def test_concurrent_tag_and_manifest_requests_cause_one_upstream_request_each(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(workers=2)
    image = upstream.images["test/oci-single:1.0"]
    mark = upstream.registry.mark()
    url = f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}"
    responses = fetch_all([url] * 12, headers={"Accept": ACCEPT})
    assert {r.headers["docker-content-digest"] for r in responses} == {image.digest}
    seen = upstream.registry.requests(since=mark)
    by_tag = [r for r in seen if r.path.endswith(f"/manifests/{image.tag}") and r.status < 400]
    by_digest = [r for r in seen if r.path.endswith(f"/manifests/{image.digest}")
                 and r.method == "GET" and r.status < 400]
    assert len(by_tag) == 1
    assert len(by_digest) == 1


def test_followers_in_other_workers_get_bytes_while_the_fill_runs(
    start_mirror: StartMirror,
) -> None:
    with FakeUpstream() as fake:
        data = os.urandom(6 * 1024 * 1024)
        digest = fake.add_blob(data)
        fake.chunk_delay = 0.01  # ~1 s in all
        mirror = start_mirror(upstreams=[("fake", fake.url)], workers=2)
        url = f"{mirror.url}/v2/owner/img/blobs/{digest}"
        responses = fetch_all([url] * 8)
        for response in responses:
            assert hashlib.sha256(response.content).hexdigest() == digest.removeprefix("sha256:")
        assert fake.count("GET", f"/blobs/{digest}") == 1
