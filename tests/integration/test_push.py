"""Pushes through the mirror to the real upstream, with the upload limits enforced."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import StartMirror
from support.daemons import DockerdFactory, require
from support.images import inspect_raw, skopeo
from support.registry import Upstream
from support.smallfs import fill_up, small_tmpfs
from support.tcpcount import CountingProxy

ALICE = "alice:alicepw"
BOB = "bob:bobpw"
MiB = 1 << 20
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


def bearer(mirror_url: str, repo: str, *also: str, user: str = ALICE) -> dict[str, str]:
    """A token from the mirror's realm (for alice by default), as a client would get for a
    push."""
    basic = base64.b64encode(user.encode()).decode()
    scopes = [f"repository:{repo}:pull,push,delete", *also]
    response = httpx.get(f"{mirror_url}/token", headers={"Authorization": f"Basic {basic}"},
                         params={"service": "docker.io", "scope": scopes})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


def copy(src: str, dest: str, *extra: str) -> None:
    skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--preserve-digests",
           *extra, src, dest)


def test_skopeo_pushes_an_image_and_an_index_with_identical_digests(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    for ref, target in (("test/oci-single:1.0", "team/single:1"),
                        ("test/oci-index:1.0", "team/index:1")):
        image = upstream.images[ref]
        copy(f"docker://{upstream.host}/{ref}", f"docker://{mirror.host}/{target}",
             "--all", "--dest-creds", ALICE)
        raw = inspect_raw(f"{upstream.host}/{target}")
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == image.digest
    # Write-through: what streamed up is a cache hit for the next pull.
    mark = upstream.registry.mark()
    image = upstream.images["test/oci-single:1.0"]
    with httpx.Client(base_url=mirror.url, headers=bearer(mirror.url, "team/single")) as c:
        for digest, _ in image.blobs:
            got = c.get(f"/v2/team/single/blobs/{digest}")
            assert got.status_code == 200
            assert got.content == image.read_blob(digest)
    assert [r for r in upstream.registry.requests(since=mark) if r.is_blob_get] == []


def test_chunked_upload_with_content_range_and_out_of_order_chunks(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(workers=2)  # chunks may land on either worker
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    parts = [data[i:i + 1024 * 1024] for i in range(0, len(data), 1024 * 1024)]
    auth = bearer(mirror.url, "team/chunked")
    with httpx.Client(base_url=mirror.url, headers=auth, timeout=60) as client:
        start = client.post("/v2/team/chunked/blobs/uploads/")
        assert start.status_code == 202
        location = start.headers["location"]
        assert location.startswith("/v2/team/chunked/blobs/uploads/")
        assert upstream.host not in location
        offset = 0
        for part in parts:
            response = client.patch(location, content=part, headers={
                "Content-Range": f"{offset}-{offset + len(part) - 1}",
                "Content-Type": "application/octet-stream"})
            assert response.status_code == 202, response.text
            assert response.headers["range"] == f"0-{offset + len(part) - 1}"
            location = response.headers["location"]
            offset += len(part)
        wrong = client.patch(location, content=b"xx", headers={"Content-Range": "5-6"})
        assert wrong.status_code == 416
        status = client.get(location)
        assert status.status_code == 204
        assert status.headers["range"] == f"0-{len(data) - 1}"
        done = client.put(location, params={"digest": digest})
        assert done.status_code == 201, done.text
        assert done.headers["docker-content-digest"] == digest
        # An upload URL reaches only its own session: not another repository's, not others.
        again = client.patch(location.replace("team/chunked", "team/other"), content=b"x")
        assert again.status_code in (401, 404)
        bogus = client.patch("/v2/team/chunked/blobs/uploads/" + "0" * 32, content=b"x")
        assert bogus.status_code == 404
        assert bogus.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    token = upstream.issuer.issue("alice", "upstream-registry",
                                  ["repository:team/chunked:pull"])["token"]
    direct = httpx.get(f"{upstream.url}/v2/team/chunked/blobs/{digest}",
                       headers={"Authorization": f"Bearer {token}"})
    assert direct.content == data


def test_a_chunked_upload_goes_on_through_another_replica_sharing_redis(
    upstream: Upstream, start_mirror: StartMirror, redis_url: str
) -> None:
    # Two replicas, each with its own cache directory, as behind a round-robin balancer.
    one, two = (start_mirror(env={"MIRROR_REDIS_URL": redis_url}) for _ in range(2))
    data = os.urandom(4 * MiB + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    auth = bearer(one.url, "team/replicated")  # the replicas share the secret it is MACed with
    with httpx.Client(headers=auth, timeout=60) as client:
        start = client.post(f"{one.url}/v2/team/replicated/blobs/uploads/")
        assert start.status_code == 202, start.text
        location = start.headers["location"]
        offset = 0
        for mirror in (two, one, two, one, two):
            part = data[offset:offset + MiB]
            response = client.patch(f"{mirror.url}{location}", content=part, headers={
                "Content-Range": f"{offset}-{offset + len(part) - 1}",
                "Content-Type": "application/octet-stream"})
            assert response.status_code == 202, response.text
            assert response.headers["range"] == f"0-{offset + len(part) - 1}"
            location = response.headers["location"]
            offset += len(part)
        bob = bearer(two.url, "team/replicated", user=BOB)
        assert client.get(f"{two.url}{location}", headers=bob).status_code == 404
        status = client.get(f"{one.url}{location}")
        assert status.status_code == 204, status.text
        assert status.headers["range"] == f"0-{len(data) - 1}"
        # Closed through the replica that wrote the first chunk through: it saw only some.
        done = client.put(f"{two.url}{location}", params={"digest": digest})
        assert done.status_code == 201, done.text
        assert done.headers["docker-content-digest"] == digest
        for mirror in (one, two):
            assert client.get(f"{mirror.url}{location}").status_code == 404
            assert [p for p in (mirror.cache_dir / "blobs").rglob("*") if p.is_file()] == []
            assert parts(mirror.cache_dir) == []
        for mirror in (one, two):  # pulls get the blob the upstream holds, nothing else
            got = client.get(f"{mirror.url}/v2/team/replicated/blobs/{digest}")
            assert got.status_code == 200 and got.content == data
    token = upstream.issuer.issue("alice", "upstream-registry",
                                  ["repository:team/replicated:pull"])["token"]
    direct = httpx.get(f"{upstream.url}/v2/team/replicated/blobs/{digest}",
                       headers={"Authorization": f"Bearer {token}"})
    assert direct.content == data
    for mirror in (one, two):
        log = mirror.log_text()
        assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_cross_repository_mount_and_monolithic_upload(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    image = upstream.images["test/oci-single:1.0"]
    digest, _ = image.blobs[0]
    auth = bearer(mirror.url, "team/mounted", f"repository:{image.repo}:pull")
    with httpx.Client(base_url=mirror.url, headers=auth) as client:
        mounted = client.post("/v2/team/mounted/blobs/uploads/",
                              params={"mount": digest, "from": image.repo})
        assert mounted.status_code in (201, 202), mounted.text
        if mounted.status_code == 201:
            assert mounted.headers["location"] == f"/v2/team/mounted/blobs/{digest}"
        data = b"monolithic blob"
        small = "sha256:" + hashlib.sha256(data).hexdigest()
        mono = client.post("/v2/team/mounted/blobs/uploads/", params={"digest": small},
                           content=data, headers={"Content-Type": "application/octet-stream"})
        if mono.status_code == 202:  # registries may decline a one-request upload (2.8 does)
            mono = client.put(mono.headers["location"], params={"digest": small}, content=data,
                              headers={"Content-Type": "application/octet-stream"})
        assert mono.status_code == 201, mono.text
        assert mono.headers["docker-content-digest"] == small
        assert client.get(f"/v2/team/mounted/blobs/{small}").content == data


def test_push_without_credentials_is_challenged(start_mirror: StartMirror) -> None:
    mirror = start_mirror()
    response = httpx.post(f"{mirror.url}/v2/team/app/blobs/uploads/")
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert f'realm="{mirror.url}/token"' in challenge
    assert 'scope="repository:team/app:pull,push"' in challenge
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
    upper = httpx.post(f"{mirror.url}/v2/Team/App/blobs/uploads/",
                       headers=bearer(mirror.url, "team/app"))
    assert upper.status_code == 400
    error = upper.json()["errors"][0]
    assert error["code"] == "NAME_INVALID"
    assert "lowercase" in error["message"]


def test_idle_and_stalled_uploads_are_cut_off_at_the_time_limit(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(args=["--upload-timeout", "2"])
    auth = bearer(mirror.url, "team/slow")
    with httpx.Client(base_url=mirror.url, headers=auth, timeout=30) as client:
        location = client.post("/v2/team/slow/blobs/uploads/").headers["location"]
        mark = upstream.registry.mark()
        time.sleep(2.5)
        late = client.patch(location, content=b"too late")
        assert late.status_code == 400
        error = late.json()["errors"][0]
        assert error["code"] == "BLOB_UPLOAD_INVALID"
        assert "time limit" in error["message"]
        assert any(r.method == "DELETE" for r in upstream.registry.requests(since=mark))

        location = client.post("/v2/team/slow/blobs/uploads/").headers["location"]

        def stalling() -> Iterator[bytes]:
            yield b"a" * 65536
            time.sleep(3)
            yield b"b" * 65536

        began = time.monotonic()
        try:
            stalled = client.patch(location, content=stalling())
            assert stalled.status_code == 400
            assert "time limit" in stalled.json()["errors"][0]["message"]
        except httpx.HTTPError:
            pass  # cut off mid-body: also an acceptable way to say no
        assert time.monotonic() - began < 10


def test_layer_over_the_limit_is_refused_early(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    host, port = upstream.host.split(":")
    proxy = CountingProxy(host, int(port))
    try:
        mirror = start_mirror(upstreams=[("docker.io", proxy.url)],
                              args=["--max-layer-size", "1MiB"])
        auth = bearer(mirror.url, "team/big")
        size = 64 * 1024 * 1024
        with httpx.Client(base_url=mirror.url, headers=auth, timeout=60) as client:
            location = client.post("/v2/team/big/blobs/uploads/").headers["location"]
            before = proxy.upstream_bytes
            declared = client.patch(location, content=b"x" * 2 * 1024 * 1024)
            assert declared.status_code == 413
            assert declared.json()["errors"][0]["code"] == "SIZE_INVALID"
            assert proxy.upstream_bytes - before < 64 * 1024

            location = client.post("/v2/team/big/blobs/uploads/").headers["location"]
            before = proxy.upstream_bytes

            def endless() -> Iterator[bytes]:  # no Content-Length: counted as it streams
                chunk = os.urandom(256 * 1024)
                for _ in range(size // len(chunk)):
                    yield chunk

            try:
                streamed = client.patch(location, content=endless())
                assert streamed.status_code == 413
                assert streamed.json()["errors"][0]["code"] == "SIZE_INVALID"
            except httpx.HTTPError:
                pass  # the mirror may close the connection on a body it refused
            assert proxy.upstream_bytes - before < 4 * 1024 * 1024  # far below 64 MiB

            big = {"schemaVersion": 2, "padding": "x" * (4 * 1024 * 1024)}
            manifest = client.put("/v2/team/big/manifests/1", content=json.dumps(big),
                                  headers={"Content-Type":
                                           "application/vnd.oci.image.manifest.v1+json"})
            assert manifest.status_code == 413
            assert manifest.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    finally:
        proxy.close()


@pytest.fixture
def pushed_twice(upstream: Upstream) -> tuple[str, str]:
    """Two different manifests (digests) that will be pushed to one tag in turn."""
    return (upstream.images["library/small:latest"].digest,
            upstream.images["test/docker-v2s2:1.0"].digest)


def test_a_pushed_manifest_is_seen_by_the_next_pull(
    upstream: Upstream, start_mirror: StartMirror, pushed_twice: tuple[str, str]
) -> None:
    mirror = start_mirror(workers=2, args=["--tag-ttl", "300"])
    first, second = pushed_twice
    copy(f"docker://{upstream.host}/library/small:latest",
         f"docker://{mirror.host}/team/moving:1", "--dest-creds", ALICE)
    url = f"{mirror.url}/v2/team/moving/manifests/1"
    for _ in range(6):  # remembered by both workers
        assert httpx.get(url, headers={"Accept": ACCEPT}).headers[
            "docker-content-digest"] == first
    copy(f"docker://{upstream.host}/test/docker-v2s2:1.0",
         f"docker://{mirror.host}/team/moving:1", "--dest-creds", ALICE)
    for _ in range(6):
        assert httpx.get(url, headers={"Accept": ACCEPT}).headers[
            "docker-content-digest"] == second


def test_delete_goes_upstream_and_leaves_the_cache(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    copy(f"docker://{upstream.host}/library/small:latest",
         f"docker://{mirror.host}/team/gone:1", "--dest-creds", ALICE)
    image = upstream.images["library/small:latest"]
    auth = bearer(mirror.url, "team/gone")
    with httpx.Client(base_url=mirror.url, headers={**auth, "Accept": ACCEPT}) as client:
        assert client.get(f"/v2/team/gone/manifests/{image.digest}").status_code == 200
        deleted = client.delete(f"/v2/team/gone/manifests/{image.digest}")
        assert deleted.status_code == 202, deleted.text
        assert client.get(f"/v2/team/gone/manifests/{image.digest}").status_code == 404
        digest = image.blobs[0][0]
        assert client.delete(f"/v2/team/gone/blobs/{digest}").status_code == 202
        assert client.get(f"/v2/team/gone/blobs/{digest}").status_code == 404


def test_docker_logs_in_to_the_mirror_and_pushes_through_it(
    upstream: Upstream, start_mirror: StartMirror, dockerd_factory: DockerdFactory,
    tmp_path: Path,
) -> None:
    require("dockerd", "docker")
    mirror = start_mirror()
    daemon = dockerd_factory(None, insecure_registries=[mirror.host])
    config = tmp_path / "docker-config"
    config.mkdir()
    pulled = daemon.pull(f"{mirror.host}/library/small:latest", docker_config_dir=config)
    assert pulled.returncode == 0, pulled.stderr
    target = f"{mirror.host}/team/from-docker:1"
    assert daemon.tag(f"{mirror.host}/library/small:latest", target).returncode == 0
    refused = daemon.push(target, docker_config_dir=config)
    assert refused.returncode != 0
    wrong = daemon.login(mirror.host, "alice", "wrong", docker_config_dir=config)
    assert wrong.returncode != 0
    login = daemon.login(mirror.host, "alice", "alicepw", docker_config_dir=config)
    assert login.returncode == 0, login.stderr
    pushed = daemon.push(target, docker_config_dir=config)
    assert pushed.returncode == 0, pushed.stderr + daemon.log()[-2000:]
    raw = inspect_raw(f"{upstream.host}/team/from-docker:1")
    assert json.loads(raw)["config"]["digest"] == json.loads(
        inspect_raw(f"{upstream.host}/library/small:latest"))["config"]["digest"]


# -- hardening: hostile input, broken clients, full disks, deletes, orphans, ownership --------


def request(port: int, method: str, target: str, headers: dict[str, str], body: bytes = b"",
            timeout: float = 30) -> tuple[int | None, dict[str, str], bytes]:
    """One raw HTTP/1.1 request (headers as latin-1, as sent), read to EOF."""
    head = f"{method} {target} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + body)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 16):
                data += chunk
    if not data:
        return None, {}, b""
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split(" ")[1]), fields, rest


def oci_error(body: bytes) -> dict[str, str]:
    first = json.loads(body)["errors"][0]
    assert first["code"] and first["message"]
    return dict(first)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def parts(cache: Path) -> list[Path]:
    return list((cache / "tmp").glob("upload-*.part"))


def test_hostile_push_headers_get_oci_errors_never_a_crash(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    auth = bearer(mirror.url, "team/hostile")
    location = httpx.post(f"{mirror.url}/v2/team/hostile/blobs/uploads/",
                          headers=auth).headers["location"]
    # '²' passes str.isdigit() and fails int().
    status, _, body = request(mirror.port, "PATCH", location, {
        **auth, "Content-Range": "\xb2-10", "Content-Length": "11"}, b"0123456789a")
    assert status in (400, 416), body
    assert oci_error(body)["code"] in ("SIZE_INVALID", "BLOB_UPLOAD_INVALID")
    status, _, body = request(mirror.port, "POST", "/v2/team/hostile/blobs/uploads/"
                              "?digest=sha256:%C2%B2", {**auth, "Content-Length": "1"}, b"x")
    assert status == 400 and oci_error(body)["code"] == "DIGEST_INVALID", body
    document = json.dumps({"schemaVersion": 2, "mediaType": "caf\u00e9"}).encode()
    for content_type in ("caf\xe9+json", "application/vnd.oci.image.manifest.v1+json\xe9"):
        status, _, body = request(mirror.port, "PUT", "/v2/team/hostile/manifests/1", {
            **auth, "Content-Type": content_type, "Content-Length": str(len(document))},
            document)
        assert status == 400 and oci_error(body)["code"] == "MANIFEST_INVALID", body
    log = mirror.log_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_a_client_dropping_mid_patch_is_one_log_line_and_a_cancelled_session(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    auth = bearer(mirror.url, "team/dropped")
    with httpx.Client(base_url=mirror.url, headers=auth, timeout=30) as client:
        location = client.post("/v2/team/dropped/blobs/uploads/").headers["location"]
        mark = upstream.registry.mark()
        head = (f"PATCH {location} HTTP/1.1\r\nHost: mirror\r\nAuthorization: "
                f"{auth['Authorization']}\r\nContent-Length: {8 * MiB}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", mirror.port)) as sock:
            sock.sendall(head + os.urandom(2 * MiB))
            # Mid-body for sure: the first MiB was written through.
            wait_for(lambda: any(p.stat().st_size >= MiB for p in parts(mirror.cache_dir)),
                     "the write-through file")
        wait_for(lambda: "went away" in mirror.log_text(), "the log line")
        assert client.get(location).status_code == 404

        def upstream_methods() -> list[str]:
            return sorted(r.method for r in upstream.registry.requests(since=mark)
                          if "/team/dropped/blobs/uploads/" in r.path)

        # The registry logs a request as it ends: the cut PATCH may end after the DELETE.
        wait_for(lambda: upstream_methods() == ["DELETE", "PATCH"],
                 "the PATCH and the DELETE cancelling it upstream")
        assert parts(mirror.cache_dir) == []
        # The next push works.
        data = os.urandom(100_000)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        location = client.post("/v2/team/dropped/blobs/uploads/").headers["location"]
        done = client.put(location, params={"digest": digest}, content=data)
        assert done.status_code == 201, done.text
    log = mirror.log_text()
    assert len([line for line in log.splitlines() if "went away" in line]) == 1, log[-3000:]
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_a_body_shorter_than_its_content_length_is_answered_400_not_left_hanging(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(env={"MIRROR_READ_TIMEOUT": "1"})
    auth = bearer(mirror.url, "team/short")
    location = httpx.post(f"{mirror.url}/v2/team/short/blobs/uploads/",
                          headers=auth).headers["location"]
    began = time.monotonic()
    status, _, body = request(mirror.port, "PATCH", location,
                              {**auth, "Content-Length": "100"}, b"x" * 10)
    assert status == 400, body
    error = oci_error(body)
    assert error["code"] == "BLOB_UPLOAD_INVALID" and "sent nothing" in error["message"]
    status, _, body = request(mirror.port, "PUT", "/v2/team/short/manifests/1", {
        **auth, "Content-Length": "100", "Content-Type": "application/json"}, b"{" * 10)
    assert status == 400 and oci_error(body)["code"] == "MANIFEST_INVALID", body
    assert time.monotonic() - began < 15
    assert httpx.get(f"{mirror.url}{location}", headers=auth).status_code == 404


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small-fs") as path:
        yield path


def test_a_push_onto_a_full_disk_succeeds_and_is_simply_not_cached(
    upstream: Upstream, start_mirror: StartMirror, small_fs: Path
) -> None:
    cache = small_fs / "cache"
    mirror = start_mirror(cache_dir=cache)
    filler = small_fs / "filler"
    fill_up(filler)
    image = upstream.images["test/oci-single:1.0"]
    copy(f"docker://{upstream.host}/{image.ref}", f"docker://{mirror.host}/team/full:1",
         "--dest-creds", ALICE)
    raw = inspect_raw(f"{upstream.host}/team/full:1")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == image.digest
    assert [p for p in (cache / "blobs").rglob("*") if p.is_file()] == []
    assert parts(cache) == []
    # Room again, but a blob bigger than the whole disk: pushed, and not cached either.
    filler.unlink()
    data = os.urandom(30 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=mirror.url, headers=bearer(mirror.url, "team/full"),
                      timeout=60) as client:
        location = client.post("/v2/team/full/blobs/uploads/").headers["location"]
        patched = client.patch(location, content=data)
        assert patched.status_code == 202, patched.text
        done = client.put(patched.headers["location"], params={"digest": digest})
        assert done.status_code == 201, done.text
        assert parts(cache) == []
        assert [p for p in (cache / "blobs").rglob("*") if p.is_file()] == []
        got = client.get(f"/v2/team/full/blobs/{digest}")
        assert got.status_code == 200 and got.content == data
    log = mirror.log_text()
    assert "cache disk full" in log
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_a_users_delete_leaves_content_another_repository_shares_cached(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    image = upstream.images["library/small:latest"]
    for repo, creds in (("alice/app", ALICE), ("bob/app", BOB)):
        copy(f"docker://{upstream.host}/{image.ref}", f"docker://{mirror.host}/{repo}:1",
             "--dest-creds", creds)
    layer = image.blobs[-1][0]
    alice = {**bearer(mirror.url, "alice/app"), "Accept": ACCEPT}
    bob = {**bearer(mirror.url, "bob/app", user=BOB), "Accept": ACCEPT}
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        deleted = client.delete(f"/v2/bob/app/blobs/{layer}", headers=bob)
        assert deleted.status_code == 202, deleted.text
        deleted = client.delete(f"/v2/bob/app/manifests/{image.digest}", headers=bob)
        assert deleted.status_code == 202, deleted.text
        mark = upstream.registry.mark()
        blob = client.get(f"/v2/alice/app/blobs/{layer}", headers=alice)
        assert blob.status_code == 200 and blob.content == image.read_blob(layer)
        manifest = client.get(f"/v2/alice/app/manifests/{image.digest}", headers=alice)
        assert manifest.status_code == 200
        gets = [r for r in upstream.registry.requests(since=mark) if r.method == "GET"]
        assert gets == [], gets  # both from the cache
        for path in (f"/v2/bob/app/blobs/{layer}", f"/v2/bob/app/manifests/{image.digest}"):
            gone = client.get(path, headers=bob)
            assert gone.status_code == 404, (path, gone.text)


def test_uploads_left_by_a_killed_mirror_are_swept_after_restart(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(args=["--upload-timeout", "3"])
    auth = bearer(mirror.url, "team/orphan")
    location = httpx.post(f"{mirror.url}/v2/team/orphan/blobs/uploads/",
                          headers=auth).headers["location"]
    mark = upstream.registry.mark()
    release = threading.Event()

    def body() -> Iterator[bytes]:
        yield os.urandom(2 * MiB)
        release.wait(30)

    def patch() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.patch(f"{mirror.url}{location}", headers=auth, content=body(), timeout=30)

    sender = threading.Thread(target=patch)
    sender.start()
    try:
        wait_for(lambda: any(p.stat().st_size >= MiB for p in parts(mirror.cache_dir)),
                 "the write-through file")
        mirror.kill()  # SIGKILL, mid-PATCH
    finally:
        release.set()
        sender.join(30)
    assert parts(mirror.cache_dir)
    patched = [r.path for r in upstream.registry.requests(since=mark) if r.method == "PATCH"]
    assert patched, "the upstream saw no PATCH"
    session_path = patched[0].split("?")[0]
    mirror.start()
    wait_for(lambda: not parts(mirror.cache_dir), "the orphan's file to go")
    wait_for(lambda: any(r.method == "DELETE" and r.path.split("?")[0] == session_path
                         for r in upstream.registry.requests(since=mark)),
             "a DELETE of the orphaned upstream session")
    # The session says why it is gone.
    late = httpx.get(f"{mirror.url}{location}", headers=auth)
    assert late.status_code == 400 and "time limit" in late.json()["errors"][0]["message"]


def test_an_upload_session_belongs_to_the_account_that_opened_it(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    alice = bearer(mirror.url, "team/shared")
    bob = bearer(mirror.url, "team/shared", user=BOB)  # bob may push there too
    location = httpx.post(f"{mirror.url}/v2/team/shared/blobs/uploads/",
                          headers=alice).headers["location"]
    mark = upstream.registry.mark()
    data = b"alice's blob"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=mirror.url) as client:
        for method in ("GET", "PATCH", "PUT", "DELETE"):
            stolen = client.request(method, location, headers=bob, content=b"bob's",
                                    params={"digest": digest})
            assert stolen.status_code == 404, (method, stolen.text)
            assert stolen.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        assert [r for r in upstream.registry.requests(since=mark)
                if "/blobs/uploads/" in r.path] == []
        # Alice with other credentials for her account (as after a token refresh
        # mid-push) still owns it.
        fresh = {"Authorization": "Basic " + base64.b64encode(ALICE.encode()).decode()}
        done = client.put(location, headers=fresh, content=data, params={"digest": digest})
        assert done.status_code == 201, done.text
