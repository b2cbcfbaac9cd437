"""The integration-test infrastructure itself, against the upstream directly (no mirror)."""

from __future__ import annotations

import gzip
import json
import re
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.images import (
    HOST_ARCH,
    OCI_INDEX,
    OCI_LAYER_TAR,
    inspect_raw,
    sha256,
    skopeo,
    skopeo_copy_to_dir,
)
from support.procs import Proc, free_port, wait_http
from support.registry import Registry, TokenIssuer, Upstream

PUBLIC = ["library/small:latest", "test/oci-single:1.0", "test/oci-index:1.0",
          "test/docker-v2s2:1.0", "test/big:1.0"]
SECRET = "private/secret:1.0"


def anonymous_token(upstream: Upstream, repo: str) -> str:
    """Do the token dance by hand: 401 challenge from the registry, then GET the realm."""
    r = httpx.get(f"{upstream.url}/v2/", trust_env=False)
    assert r.status_code == 401
    params = dict(re.findall(r'(\w+)="([^"]*)"', r.headers["www-authenticate"]))
    t = httpx.get(params["realm"], params={"service": params["service"],
                                           "scope": f"repository:{repo}:pull"}, trust_env=False)
    t.raise_for_status()
    return str(t.json()["token"])


@pytest.mark.parametrize("ref", PUBLIC)
def test_public_image_anonymous_inspect(upstream: Upstream, ref: str) -> None:
    info = upstream.images[ref]
    raw = inspect_raw(f"{upstream.host}/{ref}")
    assert sha256(raw) == info.digest
    assert json.loads(raw)["mediaType"] == info.media_type
    for digest, size in info.manifests:  # children of an index, by digest
        child = inspect_raw(f"{upstream.host}/{info.repo}@{digest}")
        assert (sha256(child), len(child)) == (digest, size)


def test_images_are_as_described(upstream: Upstream) -> None:
    images = upstream.images
    assert set(images) == {*PUBLIC, SECRET}
    assert images["test/oci-index:1.0"].media_type == OCI_INDEX
    assert set(images["test/oci-index:1.0"].platforms) == {"linux/amd64", "linux/arm64"}
    assert images["test/big:1.0"].blob_bytes > 100_000_000
    for info in images.values():
        manifests = [info.read_blob(d) for d, _ in info.manifests] or [info.read_blob(info.digest)]
        for raw in manifests:
            m = json.loads(raw)
            config = json.loads(info.read_blob(m["config"]["digest"]))
            assert config["os"] == "linux"
            assert f"linux/{config['architecture']}" in info.platforms
            diff_ids = []
            for layer in m["layers"]:
                data = info.read_blob(layer["digest"])
                tar = data if layer["mediaType"] == OCI_LAYER_TAR else gzip.decompress(data)
                diff_ids.append(sha256(tar))
            assert config["rootfs"]["diff_ids"] == diff_ids
    host = json.loads(images["library/small:latest"].read_blob(images["library/small:latest"]
                                                               .digest))
    assert host["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert HOST_ARCH in ("amd64", "arm64")


def test_private_image_access(upstream: Upstream) -> None:
    ref = f"{upstream.host}/{SECRET}"
    anon = skopeo("inspect", "--raw", "--tls-verify=false", "--no-creds", f"docker://{ref}",
                  check=False)
    assert anon.returncode != 0
    assert "unauthorized" in anon.stderr.lower() or "denied" in anon.stderr.lower()
    assert sha256(inspect_raw(ref, creds="alice:alicepw")) == upstream.images[SECRET].digest
    bob = skopeo("inspect", "--raw", "--tls-verify=false", "--creds=bob:bobpw",
                 f"docker://{ref}", check=False)
    assert bob.returncode != 0
    wrong = skopeo("inspect", "--raw", "--tls-verify=false", "--creds=alice:nope",
                   f"docker://{ref}", check=False)
    assert wrong.returncode != 0
    assert upstream.issuer.count("bob") >= 1


def test_copy_to_dir(upstream: Upstream, tmp_path: Path) -> None:
    info = upstream.images["test/docker-v2s2:1.0"]
    skopeo_copy_to_dir(f"{upstream.host}/{info.ref}", tmp_path / "out")
    assert sha256((tmp_path / "out" / "manifest.json").read_bytes()) == info.digest
    for digest, size in info.blobs:
        assert (tmp_path / "out" / digest.removeprefix("sha256:")).stat().st_size == size


def test_registry_logs_blob_get(upstream: Upstream) -> None:
    info = upstream.images["test/oci-single:1.0"]
    digest, size = info.blobs[0]
    token = anonymous_token(upstream, info.repo)
    mark = upstream.registry.mark()
    r = httpx.get(f"{upstream.url}/v2/{info.repo}/blobs/{digest}",
                  headers={"Authorization": f"Bearer {token}"}, trust_env=False)
    assert r.status_code == 200
    assert sha256(r.content) == digest
    reqs = upstream.registry.requests(since=mark)
    blob_gets = [q for q in reqs if q.is_blob_get]
    assert len(blob_gets) == 1
    assert blob_gets[0].path == f"/v2/{info.repo}/blobs/{digest}"
    assert (blob_gets[0].status, blob_gets[0].bytes) == (200, size)
    # without a token: 401, and logged as such
    mark = upstream.registry.mark()
    assert httpx.get(f"{upstream.url}/v2/{info.repo}/blobs/{digest}",
                     trust_env=False).status_code == 401
    assert [q.status for q in upstream.registry.requests(since=mark)] == [401]


def test_token_issuer_forms(upstream: Upstream) -> None:
    issuer = upstream.issuer
    service = upstream.registry.service
    scope = "repository:private/secret:pull"
    r = httpx.post(issuer.realm, data={"grant_type": "password", "username": "alice",
                                       "password": "alicepw", "service": service,
                                       "scope": scope, "client_id": "containerd"},
                   trust_env=False)
    r.raise_for_status()
    body = r.json()
    assert body["access_token"] == body["token"] and body["expires_in"] == 300
    m = httpx.get(f"{upstream.url}/v2/private/secret/manifests/1.0",
                  headers={"Authorization": f"Bearer {body['access_token']}",
                           "Accept": upstream.images[SECRET].media_type}, trust_env=False)
    assert m.status_code == 200
    bad = httpx.post(issuer.realm, data={"grant_type": "password", "username": "alice",
                                         "password": "x", "service": service, "scope": scope},
                     trust_env=False)
    assert bad.status_code == 401
    basic = httpx.get(issuer.realm, params={"service": service, "scope": scope},
                      auth=("bob", "bobpw"), trust_env=False)
    assert basic.status_code == 200
    bob = httpx.get(f"{upstream.url}/v2/private/secret/manifests/1.0",
                    headers={"Authorization": f"Bearer {basic.json()['token']}"},
                    trust_env=False)
    assert bob.status_code == 401
    assert ("POST", "alice", [scope], service) in issuer.requests


def test_registry_restart_and_proxy_mode(upstream: Upstream, tmp_path: Path) -> None:
    """distribution's own pull-through cache (used by the benchmark), restarted in between."""
    proxy = Registry(tmp_path, proxy_remote=upstream.url, name="proxy").start()
    try:
        info = upstream.images["test/oci-single:1.0"]
        assert sha256(inspect_raw(f"{proxy.host}/{info.ref}")) == info.digest
        port = proxy.port
        proxy.restart()
        assert proxy.port == port
        skopeo_copy_to_dir(f"{proxy.host}/{info.ref}", tmp_path / "out")
        assert {q.status for q in proxy.requests() if q.is_blob_get} == {200}
        assert any(proxy.root.rglob("data"))  # blobs were stored
    finally:
        proxy.stop()


def test_token_issuer_standalone(tmp_path: Path) -> None:
    with TokenIssuer(tmp_path, users={"u": "p"}, ttl=5) as issuer:
        r = httpx.get(issuer.realm, params={"service": "s", "scope": "repository:a/b:pull,push"},
                      auth=("u", "p"), trust_env=False)
        assert r.status_code == 200 and r.json()["expires_in"] == 5
        assert issuer.requests[-1].account == "u"
        assert issuer.cert_path.read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_proc_stop_kills_group(tmp_path: Path) -> None:
    child = "import os, time; print('child', os.getpid(), flush=True); time.sleep(60)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]);" \
           " time.sleep(60)"
    with Proc([sys.executable, "-c", code], tmp_path, name="sleeper") as p:
        deadline = time.monotonic() + 10
        while "child" not in p.log_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.alive and "child" in p.log_text()
    assert not p.alive
    status = Path(f"/proc/{p.log_text().split()[1]}/status")
    deadline = time.monotonic() + 5
    while status.exists() and "zombie" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not status.exists() or "zombie" in status.read_text()


def test_wait_http_times_out() -> None:
    with pytest.raises(TimeoutError, match="did not answer"):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=0.3)
