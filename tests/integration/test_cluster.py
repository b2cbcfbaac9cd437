"""Replicas on one object store (Ceph's radosgw) and one Redis, behind nginx: one upstream
download per blob for the whole cluster, and every client gets the right bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support.ceph import Ceph
from support.containerd import Containerd, write_hosts_toml
from support.daemons import DockerdFactory, require
from support.fake_upstream import FakeUpstream
from support.images import ImageInfo, skopeo
from support.nginx import Nginx
from support.procs import REPO_ROOT, MirrorProc, clean_env
from support.redisd import RedisServer
from support.registry import Upstream

from mirror.metadata.redis import RedisMetadata

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])

Replicas = Callable[..., list[MirrorProc]]


@pytest.fixture
def replicas(ceph: Ceph, s3_bucket: str, redis_url: str, tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[Replicas]:
    """Factory: `replicas(n, upstreams, args)` starts n mirrors on one bucket and one Redis,
    each with its own (empty) local directory."""
    started: list[MirrorProc] = []

    def start(n: int, upstreams: list[tuple[str, str]], args: tuple[str, ...] = (),
              workers: int = 1, env: dict[str, str] | None = None) -> list[MirrorProc]:
        procs = []
        for _ in range(n):
            i = len(started)
            proc = MirrorProc(upstreams, tmp_path / f"replica-{i}", tmp_path / f"logs-{i}",
                              args=["--storage", f"s3://{s3_bucket}/mirror", "--redis",
                                    redis_url, *args],
                              env={**ceph.env(), **(env or {})}, workers=workers)
            started.append(proc)
            procs.append(proc.start())
        return procs

    yield start
    for proc in started:
        proc.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for proc in started:
            print(f"--- {proc.url} log ---\n{proc.log_text()[-8000:]}")


def objects(ceph: Ceph, bucket: str, prefix: str = "mirror/blobs/") -> dict[str, int]:
    s3 = ceph.client()
    found: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = item["Size"]
    return found


def pull(url: str, image: ImageInfo, dest: Path) -> None:
    skopeo("copy", "--all", "--src-tls-verify=false",
           f"docker://{url.removeprefix('http://')}/{image.repo}:{image.tag}", f"dir:{dest}")


def blob_gets(upstream: Upstream, mark: int) -> list[str]:
    return [r.path for r in upstream.registry.requests(since=mark) if r.is_blob_get]


def cache_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", "cache", *args], cwd=REPO_ROOT,
                          env=clean_env({"PYTHONPATH": str(REPO_ROOT), **env}),
                          capture_output=True, text=True, timeout=300)


def test_content_lives_in_the_bucket_and_a_fresh_replica_fetches_nothing_again(
    upstream: Upstream, replicas: Replicas, ceph: Ceph, s3_bucket: str, redis_url: str,
    tmp_path: Path,
) -> None:
    image = upstream.images["test/oci-index:1.0"]
    (first,) = replicas(1, [("docker.io", upstream.url)])
    pull(first.url, image, tmp_path / "a")
    stored = objects(ceph, s3_bucket)
    for digest, size in image.blobs:
        assert stored.get(f"mirror/blobs/{digest.replace(':', '/')}") == size
    assert not any(first.cache_dir.joinpath("blobs").rglob("*.*"))  # no local copies kept
    mark = upstream.registry.mark()
    (fresh,) = replicas(1, [("docker.io", upstream.url)])
    pull(fresh.url, image, tmp_path / "b")
    assert blob_gets(upstream, mark) == []
    # The cache commands work on the shared store.
    env = {**ceph.env(), "MIRROR_STORAGE": f"s3://{s3_bucket}/mirror",
           "MIRROR_REDIS_URL": redis_url, "MIRROR_CACHE_DIR": str(tmp_path / "cli")}
    listing = cache_cli("ls", env=env)
    assert listing.returncode == 0 and f"docker.io/{image.repo}:{image.tag}" in listing.stdout
    du = cache_cli("du", env=env)
    assert du.returncode == 0 and f"in {len(stored)} entries" in du.stdout, du.stdout
    verify = cache_cli("verify", env=env)
    assert verify.returncode == 0 and " 0 bad" in verify.stdout, verify.stdout + verify.stderr


def test_eight_cold_clients_over_three_replicas_cause_one_upstream_get(
    replicas: Replicas, tmp_path: Path,
) -> None:
    with FakeUpstream() as fake:
        data = os.urandom(48 * 1024 * 1024)
        digest = fake.add_blob(data)
        fake.chunk_delay = 0.004  # ~3 s in all: every client arrives mid-download
        procs = replicas(3, [("fake", fake.url)])
        with Nginx(tmp_path / "nginx", [p.host for p in procs]) as lb:
            results: list[str] = []

            def get() -> None:
                response = httpx.get(f"{lb.url}/v2/owner/img/blobs/{digest}", timeout=120)
                results.append(hashlib.sha256(response.content).hexdigest()
                               if response.status_code == 200 else str(response.status_code))

            threads = [threading.Thread(target=get) for _ in range(8)]
            for thread in threads:
                thread.start()
                time.sleep(0.05)
            for thread in threads:
                thread.join(180)
        assert results == [digest.removeprefix("sha256:")] * 8
        assert fake.count("GET", f"/blobs/{digest}") == 1
        served = [p for p in procs if "cache=miss" in p.log_text()]
        assert len(served) >= 2, "round robin spread the clients over the replicas"


def test_a_replica_killed_mid_fill_never_hands_out_a_wrong_byte(
    replicas: Replicas, ceph: Ceph, s3_bucket: str, redis_url: str, tmp_path: Path,
) -> None:
    with FakeUpstream() as fake:
        data = os.urandom(24 * 1024 * 1024)
        digest = fake.add_blob(data)
        fake.chunk_delay = 0.01  # ~4 s in all
        owner, *others = replicas(3, [("fake", fake.url)], env={"MIRROR_FILL_LEASE": "2"})
        path = f"/v2/owner/img/blobs/{digest}"
        outcomes: dict[str, str] = {}

        def get(name: str, proc: MirrorProc) -> None:
            try:
                response = httpx.get(proc.url + path, timeout=60)
                ok = hashlib.sha256(response.content).hexdigest() == digest[7:]
                outcomes[name] = "right" if ok else f"WRONG {response.status_code}"
            except httpx.HTTPError as exc:
                outcomes[name] = f"cut {type(exc).__name__}"

        first = threading.Thread(target=get, args=("owner", owner))
        first.start()
        time.sleep(0.5)  # the owner claimed the fill and streams it
        followers = [threading.Thread(target=get, args=(f"follower-{i}", p))
                     for i, p in enumerate(others)]
        for thread in followers:
            thread.start()
        time.sleep(0.8)
        owner.kill()
        for thread in [first, *followers]:
            thread.join(90)
        print("outcomes after kill -9 of the owner:", outcomes)
        assert not any(v.startswith("WRONG") for v in outcomes.values()), outcomes
        # A retry succeeds once the dead owner's claim has lapsed.
        deadline = time.monotonic() + 30
        while True:
            response = httpx.get(others[0].url + path, timeout=60)
            if response.status_code == 200:
                break
            assert time.monotonic() < deadline, response.text
            time.sleep(0.5)
        assert hashlib.sha256(response.content).hexdigest() == digest[7:]
        env = {**ceph.env(), "MIRROR_STORAGE": f"s3://{s3_bucket}/mirror",
               "MIRROR_REDIS_URL": redis_url, "MIRROR_CACHE_DIR": str(tmp_path / "cli")}
        verify = cache_cli("verify", env=env)
        assert verify.returncode == 0 and " 0 bad" in verify.stdout, verify.stdout


def test_redis_flushed_no_blob_is_fetched_again(
    upstream: Upstream, replicas: Replicas, redis_server: RedisServer, tmp_path: Path,
) -> None:
    image = upstream.images["test/oci-single:1.0"]
    (one,) = replicas(1, [("docker.io", upstream.url)])
    pull(one.url, image, tmp_path / "a")
    one.stop()
    redis_server.flushall()
    mark = upstream.registry.mark()
    (fresh,) = replicas(1, [("docker.io", upstream.url)])
    pull(fresh.url, image, tmp_path / "b")
    assert blob_gets(upstream, mark) == []


def test_redirects_go_only_to_callers_with_access(
    upstream: Upstream, replicas: Replicas, ceph: Ceph, tmp_path: Path,
) -> None:
    public, secret = upstream.images["test/oci-single:1.0"], upstream.images[
        "private/secret:1.0"]
    (proc,) = replicas(1, [("docker.io", upstream.url)], args=("--redirect",))
    pull(proc.url, public, tmp_path / "a")  # skopeo follows the redirects
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        digest = public.blobs[0][0]
        response = client.get(f"/v2/{public.repo}/blobs/{digest}")
        assert response.status_code == 307
        location = response.headers["location"]
        assert location.startswith(ceph.endpoint) and "X-Amz-Signature" in location
        assert hashlib.sha256(httpx.get(location, timeout=30).content).hexdigest() \
            == digest[7:]
        # Ranges and HEAD are answered by the mirror itself.
        assert client.get(f"/v2/{public.repo}/blobs/{digest}",
                          headers={"Range": "bytes=0-9"}).status_code == 206
        assert client.head(f"/v2/{public.repo}/blobs/{digest}").status_code == 200
    skopeo("copy", "--all", "--src-tls-verify=false", "--src-creds", "alice:alicepw",
           f"docker://{proc.host}/{secret.repo}:{secret.tag}", f"dir:{tmp_path / 's'}")
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        for digest, _ in secret.blobs:
            refused = client.get(f"/v2/{secret.repo}/blobs/{digest}")
            assert refused.status_code == 401 and "location" not in refused.headers


@pytest.mark.parametrize("redirect", [False, True], ids=["relayed", "redirected"])
def test_dockerd_containerd_and_skopeo_pull_through_three_replicas(
    upstream: Upstream, replicas: Replicas, dockerd_factory: DockerdFactory,
    containerd: Containerd, tmp_path: Path, redirect: bool,
) -> None:
    require("dockerd", "docker", "containerd", "ctr")
    procs = replicas(3, [("docker.io", upstream.url)],
                     args=("--redirect",) if redirect else ())
    with Nginx(tmp_path / "nginx", [p.host for p in procs]) as lb:
        host = lb.url.removeprefix("http://")
        small = upstream.images["library/small:latest"]
        index = upstream.images["test/oci-index:1.0"]
        for i, ref in enumerate(("library/small:latest", "test/oci-index:1.0")):
            pull(lb.url, upstream.images[ref], tmp_path / f"warm-{i}")  # cached: redirects
        daemon = dockerd_factory(lb.url, insecure_registries=[host])
        result = daemon.pull("small")
        assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
        assert daemon.image_digest("small") == small.digest
        hosts = tmp_path / "certs.d"
        write_hosts_toml(hosts, "docker.io", mirror_url=lb.url)
        result = containerd.pull(f"docker.io/{index.ref}", hosts)
        assert result.returncode == 0, result.stderr
        assert containerd.image_digest(f"docker.io/{index.ref}") == index.digest
        pull(lb.url, upstream.images["test/docker-v2s2:1.0"], tmp_path / "skopeo")
    redirected = sum(p.log_text().count("cache=redirect") for p in procs)
    assert (redirected > 0) == redirect, redirected


def test_a_corrupt_download_leaves_nothing_in_the_bucket(
    replicas: Replicas, ceph: Ceph, s3_bucket: str,
) -> None:
    with FakeUpstream() as fake:
        data = os.urandom(40 * 1024 * 1024)  # several parts of a multipart upload
        digest = fake.add_blob(data)
        fake.corrupt.add(digest)
        (proc,) = replicas(1, [("fake", fake.url)])
        with pytest.raises(httpx.HTTPError):
            response = httpx.get(f"{proc.url}/v2/owner/img/blobs/{digest}", timeout=60)
            response.raise_for_status()
            raise AssertionError("a corrupt blob was served whole")
        time.sleep(0.5)
        assert objects(ceph, s3_bucket) == {}
        uploads = ceph.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        assert uploads == [], uploads  # aborted, not left pending


async def pin(redis_url: str, digest: str) -> None:
    metadata = RedisMetadata(redis_url)
    await metadata.open()
    try:
        await metadata.pin("test", [digest])
    finally:
        await metadata.close()


def test_the_budget_covers_the_bucket_and_pins_hold(
    replicas: Replicas, ceph: Ceph, s3_bucket: str, redis_url: str, tmp_path: Path,
) -> None:
    with FakeUpstream() as fake:
        blobs = [fake.add_blob(os.urandom(3 * 1024 * 1024)) for _ in range(8)]
        procs = replicas(2, [("fake", fake.url)], args=("--max-cache-size", "10MiB"))
        asyncio.run(pin(redis_url, blobs[0]))  # in the metadata store the replicas share
        for i, digest in enumerate(blobs):
            proc = procs[i % 2]  # alternate: the last use is cluster-wide
            response = httpx.get(f"{proc.url}/v2/owner/img/blobs/{digest}", timeout=60)
            assert response.status_code == 200
            time.sleep(2.5)  # past the grace, so earlier blobs may go
        deadline = time.monotonic() + 30
        while sum(objects(ceph, s3_bucket).values()) > 10 * 1024 * 1024:
            assert time.monotonic() < deadline, objects(ceph, s3_bucket)
            time.sleep(0.5)
        kept = objects(ceph, s3_bucket)
        assert f"mirror/blobs/{blobs[0].replace(':', '/')}" in kept  # pinned
        assert f"mirror/blobs/{blobs[-1].replace(':', '/')}" in kept  # most recent
        assert f"mirror/blobs/{blobs[1].replace(':', '/')}" not in kept  # least recent


def test_a_proof_on_one_replica_holds_on_every_replica(
    upstream: Upstream, replicas: Replicas, tmp_path: Path,
) -> None:
    secret = upstream.images["private/secret:1.0"]
    first, second = replicas(2, [("docker.io", upstream.url)])
    skopeo("copy", "--all", "--src-tls-verify=false", "--src-creds", "alice:alicepw",
           f"docker://{first.host}/{secret.repo}:{secret.tag}", f"dir:{tmp_path / 'a'}")
    token = httpx.get(f"{second.url}/token", auth=("alice", "alicepw"),
                      params={"service": "docker.io"}).json()["token"]
    mark = upstream.registry.mark()
    with httpx.Client(base_url=second.url, timeout=30,
                      headers={"Authorization": f"Bearer {token}", "Accept": ACCEPT}) as client:
        for digest, _ in secret.blobs:
            assert client.get(f"/v2/{secret.repo}/blobs/{digest}").status_code == 200
    assert upstream.registry.requests(since=mark) == []  # no new proof, no fetch
    anonymous = httpx.get(f"{second.url}/v2/{secret.repo}/blobs/{secret.blobs[0][0]}")
    assert anonymous.status_code == 401
    ready = httpx.get(f"{second.url}/readyz").json()
    assert ready["object_store"] is True and ready["metadata"] is True, ready
