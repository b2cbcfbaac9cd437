"""Resilience: a disk budget, a full disk, a failing or absent upstream, and kill -9.

The upstream is the real seeded registry, reached through `FaultProxy` where a test breaks
the exchange on purpose (`support.faultproxy`), or a `FakeUpstream` for made-up blobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import StartMirror
from support import meta
from support.fake_upstream import FakeUpstream
from support.faultproxy import FaultProxy
from support.images import ImageInfo
from support.procs import REPO_ROOT, clean_env
from support.registry import Upstream

from mirror.routes import STALE_WARNING

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])
MiB = 1 << 20
STALE = STALE_WARNING


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.url) as proxy:
        yield proxy


def blob_path(cache: Path, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return cache / "blobs" / "sha256" / hex_[:2] / hex_


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pull(client: httpx.Client, image: ImageInfo) -> None:
    """The tag's manifest and every blob, checked against their digests."""
    manifest = client.get(f"/v2/{image.repo}/manifests/{image.tag}", headers={"Accept": ACCEPT})
    assert manifest.status_code == 200, manifest.text
    assert sha256(manifest.content) == image.digest
    for digest, size in image.blobs:
        blob = client.get(f"/v2/{image.repo}/blobs/{digest}")
        assert blob.status_code == 200, blob.text
        assert len(blob.content) == size and sha256(blob.content) == digest


def error_of(response: httpx.Response) -> dict[str, str]:
    first = response.json()["errors"][0]
    assert first["code"] and first["message"]
    return dict(first)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT, env=clean_env())


def wait_for(condition: object, timeout: float = 15.0, what: str = "condition") -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- the disk budget ---------------------------------------------------------------------------


def test_least_recently_used_content_is_evicted_past_the_budget_but_never_pinned_content(
    start_mirror: StartMirror,
) -> None:
    with FakeUpstream() as fake:
        blobs = [fake.add_blob(os.urandom(4 * MiB)) for _ in range(8)]
        mirror = start_mirror(upstreams=[("fake", fake.url)], args=["--max-cache-size", "18MiB"])
        cache = mirror.cache_dir
        with httpx.Client(base_url=mirror.url, timeout=30) as client:

            def get(i: int) -> None:
                response = client.get(f"/v2/owner/img/blobs/{blobs[i]}")
                assert response.status_code == 200
                assert sha256(response.content) == blobs[i]

            for i in range(4):  # 16 MiB: under the budget
                get(i)
            time.sleep(2.2)  # older than the grace period
            get(0)  # a hit: blob 0 is now the most recently used of the four
            get(4)  # 20 MiB: over; the pass frees down to 90 % of the budget: blob 1 goes
            wait_for(lambda: not blob_path(cache, blobs[1]).exists(), what="eviction")
            assert all(blob_path(cache, blobs[i]).exists() for i in (0, 2, 3, 4))

            # Pinned content stays whatever its age.
            meta.run(lambda m: m.pin("test", [blobs[2]]), cache)
            time.sleep(2.2)
            for i in (5, 6):
                get(i)
            wait_for(lambda: not blob_path(cache, blobs[3]).exists(), what="eviction")
            wait_for(lambda: not blob_path(cache, blobs[0]).exists(), what="eviction")
            assert blob_path(cache, blobs[2]).exists()
            held = sum(p.stat().st_size for p in (cache / "blobs").rglob("*") if p.is_file())
            assert held <= 18 * MiB

            # An evicted blob is simply fetched again.
            before = fake.count("GET", blobs[1])
            get(1)
            assert fake.count("GET", blobs[1]) == before + 1
        assert "evicted" in mirror.log_text()


def test_a_blob_evicted_while_a_client_reads_it_still_reaches_the_client_whole(
    start_mirror: StartMirror,
) -> None:
    """unlink(2) leaves open descriptors alone: a reader gets every byte of an evicted blob."""
    with FakeUpstream() as fake:
        data = os.urandom(48 * MiB)
        digest = fake.add_blob(data)
        mirror = start_mirror(upstreams=[("fake", fake.url)], args=["--max-cache-size", "8MiB"])
        url = f"{mirror.url}/v2/owner/img/blobs/{digest}"
        with httpx.Client(timeout=60) as client:
            assert client.get(url).content == data  # committed (and over the budget alone)
            with client.stream("GET", url) as response:
                assert response.status_code == 200
                chunks = response.iter_raw(MiB)
                got = [next(chunks)]
                # The blob is evicted once out of its grace period, mid-stream for us.
                wait_for(lambda: not blob_path(mirror.cache_dir, digest).exists(),
                         what="eviction")
                got += list(chunks)
        assert b"".join(got) == data


def test_hits_are_recorded_at_shutdown_for_the_next_run(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    image = upstream.images["test/oci-single:1.0"]
    with httpx.Client(base_url=mirror.url) as client:
        pull(client, image)
    mirror.stop()  # SIGTERM: the lifespan's shutdown flushes the pending batch
    for digest, _ in image.blobs:
        record = meta.run(lambda m, d=digest: m.content(d), mirror.cache_dir)
        assert record is not None and time.time() - record.used < 60


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs (we are root in the test environment)."""
    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root (CI runs as root)")
    path = tmp_path / "small-fs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_blob_bigger_than_the_disk_still_reaches_every_client_and_the_mirror_stays_up(
    upstream: Upstream, small_fs: Path, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(cache_dir=small_fs / "cache")
    image = upstream.images["test/big:1.0"]
    big, size = max(image.blobs, key=lambda blob: blob[1])
    assert size > 80 * MiB
    expected = image.read_blob(big)
    url = f"{mirror.url}/v2/{image.repo}/blobs/{big}"
    results: list[bytes | BaseException] = []

    def fetch() -> None:
        try:
            with httpx.Client(timeout=60) as client:
                response = client.get(url)
                assert response.status_code == 200
                results.append(response.content)
        except BaseException as exc:  # reported below
            results.append(exc)

    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        manifest = client.get(f"/v2/{image.repo}/manifests/{image.tag}",
                              headers={"Accept": ACCEPT})
        assert manifest.status_code == 200
        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for result in results:
            assert isinstance(result, bytes), result
            assert len(result) == size and result == expected
        assert len(results) == 2

        # Nothing half-written stays behind, and nothing unverified was committed.
        tmp = small_fs / "cache" / "tmp"
        assert [p.name for p in tmp.iterdir() if p.name.endswith((".part", ".size"))] == []
        assert not blob_path(small_fs / "cache", big).exists()
        assert "cache disk full" in mirror.log_text()

        # Still up, and with the space back, small content is cached again.
        assert client.get("/v2/").status_code in (200, 401)  # 401: the token challenge
        small, small_size = min(image.blobs, key=lambda blob: blob[1])
        again = client.get(f"/v2/{image.repo}/blobs/{small}")
        assert again.status_code == 200 and sha256(again.content) == small
        assert blob_path(small_fs / "cache", small).stat().st_size == small_size


def test_on_a_disk_already_full_everything_is_served_uncached_until_there_is_room(
    upstream: Upstream, small_fs: Path, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(cache_dir=small_fs / "cache")
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):  # fill the disk to the last byte
        while os.write(fd, b"\0" * 65536):
            pass
    os.close(fd)
    image = upstream.images["test/oci-single:1.0"]
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, image)  # tag, manifest, blobs: all served, every index write skipped
        assert [p for p in (small_fs / "cache" / "blobs").rglob("*") if p.is_file()] == []
        filler.unlink()
        pull(client, upstream.images["library/small:latest"])
        for digest, _ in upstream.images["library/small:latest"].blobs:
            assert blob_path(small_fs / "cache", digest).exists()
    log = mirror.log_text()
    assert "cache disk full" in log and "Traceback" not in log


# -- a failing, slow or absent upstream -------------------------------------------------------


def test_stale_tags_are_served_with_a_warning_when_the_upstream_fails_or_is_gone(
    upstream: Upstream, proxy: FaultProxy, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(upstreams=[("docker.io", proxy.url)], args=["--tag-ttl", "0"],
                          env={"MIRROR_CONNECT_TIMEOUT": "2", "MIRROR_READ_TIMEOUT": "2"})
    image = upstream.images["test/oci-single:1.0"]
    path = f"/v2/{image.repo}/manifests/{image.tag}"
    with httpx.Client(base_url=mirror.url, headers={"Accept": ACCEPT}, timeout=30) as client:
        pull(client, image)
        fresh = client.get(path)
        assert fresh.status_code == 200 and "warning" not in fresh.headers

        for break_it in (lambda: proxy.status(r"/manifests/", 503),
                         lambda: proxy.status(r"/manifests/", 429),
                         lambda: proxy.stall(r"/manifests/"),
                         proxy.refuse):
            break_it()
            started = time.monotonic()
            get, head = client.get(path), client.head(path)
            for stale in (get, head):
                assert stale.status_code == 200
                assert stale.headers["warning"] == STALE
                assert stale.headers["docker-content-digest"] == image.digest
            assert get.content == fresh.content
            assert time.monotonic() - started < 10
            proxy.clear()
            proxy.accept()

        healed = client.get(path)
        assert healed.status_code == 200 and "warning" not in healed.headers


def test_offline_serves_only_from_the_cache_and_never_contacts_the_upstream(
    upstream: Upstream, proxy: FaultProxy, start_mirror: StartMirror, tmp_path: Path
) -> None:
    online = start_mirror(upstreams=[("docker.io", proxy.url)])
    image = upstream.images["test/oci-single:1.0"]
    with httpx.Client(base_url=online.url) as client:
        pull(client, image)
    online.stop()

    # tag_ttl 0: the tag's record is past its TTL, so it is served as stale (within the TTL
    # it would be served as fresh, as online).
    offline = start_mirror(upstreams=[("docker.io", proxy.url)], cache_dir=online.cache_dir,
                           args=["--offline", "--tag-ttl", "0"])
    seen, tokens = len(proxy.seen), len(upstream.issuer.requests)
    other = upstream.images["test/docker-v2s2:1.0"]
    with httpx.Client(base_url=offline.url, headers={"Accept": ACCEPT}) as client:
        for _ in range(2):
            manifest = client.get(f"/v2/{image.repo}/manifests/{image.tag}")
            assert manifest.status_code == 200 and sha256(manifest.content) == image.digest
            assert manifest.headers["warning"] == STALE
            by_digest = client.get(f"/v2/{image.repo}/manifests/{image.digest}")
            assert by_digest.content == manifest.content
            for digest, size in image.blobs:
                head = client.head(f"/v2/{image.repo}/blobs/{digest}")
                assert head.status_code == 200 and int(head.headers["content-length"]) == size
                assert sha256(client.get(f"/v2/{image.repo}/blobs/{digest}").content) == digest
        # What is not cached is a clear 503 naming the upstream.
        for path in (f"/v2/{other.repo}/manifests/{other.tag}",
                     f"/v2/{other.repo}/manifests/{other.digest}",
                     f"/v2/{other.repo}/blobs/{other.blobs[0][0]}",
                     f"/v2/{other.repo}/tags/list"):
            refused = client.get(path)
            assert refused.status_code == 503, (path, refused.text)
            assert "docker.io" in error_of(refused)["message"]
    assert len(proxy.seen) == seen, proxy.seen[seen:]
    assert len(upstream.issuer.requests) == tokens


def test_a_tag_never_seen_fails_fast_with_an_oci_error_naming_the_upstream(
    upstream: Upstream, proxy: FaultProxy, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(upstreams=[("docker.io", proxy.url)],
                          env={"MIRROR_CONNECT_TIMEOUT": "2", "MIRROR_READ_TIMEOUT": "2"})
    image = upstream.images["test/docker-v2s2:1.0"]
    path = f"/v2/{image.repo}/manifests/{image.tag}"
    with httpx.Client(base_url=mirror.url, headers={"Accept": ACCEPT}, timeout=30) as client:
        for break_it, statuses in ((lambda: proxy.stall(r"/manifests/"), {504}),
                                   (lambda: proxy.status(r"/manifests/", 503), {502, 503}),
                                   (lambda: proxy.drop(r"/manifests/"), {502, 503}),
                                   (proxy.refuse, {502, 503})):
            break_it()
            started = time.monotonic()
            response = client.get(path)
            elapsed = time.monotonic() - started
            assert response.status_code in statuses, response.text
            assert "docker.io" in error_of(response)["message"]
            assert elapsed < 8, elapsed
            proxy.clear()
            proxy.accept()
        assert client.get(path).status_code == 200


def test_a_broken_blob_download_never_serves_wrong_bytes_and_is_fetched_again(
    upstream: Upstream, proxy: FaultProxy, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(upstreams=[("docker.io", proxy.url)])
    image = upstream.images["test/big:1.0"]
    big, size = max(image.blobs, key=lambda blob: blob[1])
    expected = image.read_blob(big)
    proxy.cut(f"/blobs/{big}", after=5 * MiB, method="GET", times=1)
    url = f"/v2/{image.repo}/blobs/{big}"
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        complete = None
        for _ in range(2):  # cut once: the first body is whole (resumed) or cut short
            try:
                response = client.get(url)
            except httpx.HTTPError:
                continue  # cut short: the client sees a broken transfer, never bad bytes
            assert response.status_code == 200 and response.content == expected
            complete = response.content
            break
        assert complete is not None
        assert not list((mirror.cache_dir / "tmp").glob("*.part"))
        assert blob_path(mirror.cache_dir, big).stat().st_size == size


def test_a_broken_blob_download_resumes_where_it_broke(
    upstream: Upstream, proxy: FaultProxy, start_mirror: StartMirror
) -> None:
    """PENDING until fills resume broken downloads: the client's one GET is served whole,
    and the mirror asks the upstream only for the rest (a Range request)."""
    mirror = start_mirror(upstreams=[("docker.io", proxy.url)])
    image = upstream.images["test/big:1.0"]
    big, _ = max(image.blobs, key=lambda blob: blob[1])
    proxy.cut(f"/blobs/{big}", after=5 * MiB, method="GET", times=1)
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        response = client.get(f"/v2/{image.repo}/blobs/{big}")
        assert response.status_code == 200 and response.content == image.read_blob(big)
    ranged = [s for s in proxy.seen if big in s.target and s.action == "pass"
              and s.method == "GET" and s.headers.get("range", "").startswith("bytes=")]
    assert ranged, [(s.method, s.action, s.headers.get("range")) for s in proxy.seen]
    first = int(ranged[0].headers["range"].removeprefix("bytes=").split("-")[0])
    assert 0 < first <= 5 * MiB


# -- kill -9 -----------------------------------------------------------------------------------


def test_pulls_survive_kill_9_at_random_moments_and_the_cache_verifies(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    seed = int(os.environ.get("MIRROR_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    print(f"kill -9 loop seed {seed} (MIRROR_TEST_SEED to replay)")
    mirror = start_mirror(workers=2)
    images = [upstream.images[r] for r in ("test/big:1.0", "test/oci-single:1.0",
                                            "library/small:latest")]
    big, _ = max(images[0].blobs, key=lambda blob: blob[1])
    tmp = mirror.cache_dir / "tmp"

    def hammer(stop: threading.Event, image: ImageInfo) -> None:
        with httpx.Client(base_url=mirror.url, timeout=30) as client:
            while not stop.is_set():
                try:
                    pull(client, image)
                except (httpx.HTTPError, AssertionError):
                    return  # killed under us

    for round_ in range(4):
        stop = threading.Event()
        threads = [threading.Thread(target=hammer, args=(stop, image)) for image in images]
        for thread in threads:
            thread.start()
        if round_ % 2 == 0:  # mid-fill of the big blob: once its partial shows up
            wait_for(lambda: any(tmp.glob("*.part")), what="a partial")
            time.sleep(rng.uniform(0, 0.1))
        else:  # anywhere
            time.sleep(rng.uniform(0.05, 1.5))
        mirror.kill()
        stop.set()
        for thread in threads:
            thread.join(60)
        blob_path(mirror.cache_dir, big).unlink(missing_ok=True)  # so the next round fills it
        mirror.start()
        # Partials of the killed run are gone (the new workers cleaned them up at start).
        assert not list(tmp.glob("*.part"))
    assert "partial downloads left by an earlier run" in mirror.log_text()

    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for image in images:
            pull(client, image)
    mirror.stop()
    verify = run_cli("cache", "verify", "--cache-dir", str(mirror.cache_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert " 0 bad" in verify.stdout
