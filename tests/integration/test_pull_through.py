"""Pulling real images through the mirror from a real upstream (distribution 2.8, token auth)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from conftest import StartMirror
from support.images import ImageInfo, inspect_raw, skopeo_copy_to_dir
from support.registry import Upstream

PUBLIC = ["library/small:latest", "test/oci-single:1.0", "test/oci-index:1.0",
          "test/docker-v2s2:1.0", "test/big:1.0"]
ALL_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


def copied_digests(dest: Path) -> set[str]:
    """sha256 of every file skopeo wrote (blobs and manifests), checked against their names."""
    digests = set()
    for path in dest.iterdir():
        name = path.name.removesuffix(".manifest.json")  # child manifests of an index
        if len(name) == 64:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == name
            digests.add("sha256:" + name)
    return digests


def slug(ref: str) -> str:
    return ref.replace("/", "_").replace(":", "_")


def pull_all(mirror_host: str, image: ImageInfo, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    skopeo_copy_to_dir(f"docker://{mirror_host}/{image.ref}", dest, all=True)
    manifest = (dest / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == image.digest
    got = copied_digests(dest)
    for digest, _ in image.blobs:
        assert digest in got
    for child, _ in image.manifests:
        assert child in got


def test_skopeo_pulls_every_image_then_pulls_again_without_upstream_blobs(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    mirror = start_mirror()
    for ref in PUBLIC:
        image = upstream.images[ref]
        pull_all(mirror.host, image, tmp_path / "first" / slug(ref))
        # The mirror's answer is byte-identical to the upstream's.
        assert inspect_raw(f"{mirror.host}/{ref}") == inspect_raw(f"{upstream.host}/{ref}")

    mark = upstream.registry.mark()
    for ref in PUBLIC:
        pull_all(mirror.host, upstream.images[ref], tmp_path / "again" / slug(ref))
    again = upstream.registry.requests(since=mark)
    assert [r for r in again if r.is_blob_get] == []
    assert [r for r in again if "/manifests/sha256:" in r.path] == []

    # The cache survives a restart: still no blob or digest request upstream.
    mirror.restart()
    mark = upstream.registry.mark()
    pull_all(mirror.host, upstream.images["test/oci-index:1.0"], tmp_path / "restarted")
    after = upstream.registry.requests(since=mark)
    assert [r for r in after if r.is_blob_get or "/manifests/sha256:" in r.path] == []


def test_manifest_headers_equal_for_get_and_head_and_digest_needs_no_upstream(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    image = upstream.images["test/oci-index:1.0"]
    with httpx.Client(base_url=mirror.url, headers={"Accept": ALL_TYPES}) as client:
        get = client.get(f"/v2/{image.repo}/manifests/{image.tag}")
        head = client.head(f"/v2/{image.repo}/manifests/{image.tag}")
        assert get.status_code == head.status_code == 200
        for name in ("docker-content-digest", "content-type", "content-length",
                     "docker-distribution-api-version"):
            assert get.headers[name] == head.headers[name], name
        assert get.headers["docker-content-digest"] == image.digest
        assert get.headers["content-type"] == image.media_type
        assert hashlib.sha256(get.content).hexdigest() == image.digest.removeprefix("sha256:")

        mark = upstream.registry.mark()
        for _ in range(3):
            by_digest = client.get(f"/v2/{image.repo}/manifests/{image.digest}")
            assert by_digest.content == get.content
            assert by_digest.headers["content-type"] == image.media_type
        assert upstream.registry.requests(since=mark) == []

        # Blob HEAD and GET agree too, and ranges work on a cached blob.
        digest, size = image.blobs[0]
        blob = client.get(f"/v2/{image.repo}/blobs/{digest}")
        blob_head = client.head(f"/v2/{image.repo}/blobs/{digest}")
        assert blob.status_code == blob_head.status_code == 200
        assert int(blob_head.headers["content-length"]) == size == len(blob.content)
        assert blob_head.headers["docker-content-digest"] == digest
        part = client.get(f"/v2/{image.repo}/blobs/{digest}", headers={"Range": "bytes=3-9"})
        assert part.status_code == 206
        assert part.content == blob.content[3:10]
        assert part.headers["content-range"] == f"bytes 3-9/{size}"
        bad = client.get(f"/v2/{image.repo}/blobs/{digest}",
                         headers={"Range": f"bytes={size + 5}-"})
        assert bad.status_code == 416
        assert bad.headers["content-range"] == f"bytes */{size}"
        assert bad.json()["errors"][0]["code"]


def test_tag_resolution_depends_on_accept(upstream: Upstream, start_mirror: StartMirror) -> None:
    """The reference registry answers an index tag with a platform manifest for clients that
    do not accept indexes: the mirror must keep those answers apart."""
    mirror = start_mirror()
    image = upstream.images["test/oci-index:1.0"]
    url = f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}"
    with httpx.Client() as client:
        index = client.get(url, headers={"Accept": ALL_TYPES})
        single = client.get(url, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        again = client.get(url, headers={"Accept": ALL_TYPES})
    assert index.headers["docker-content-digest"] == image.digest
    assert again.headers["docker-content-digest"] == image.digest
    direct = httpx.get(f"{upstream.url}/v2/", timeout=5)  # upstream is up (sanity)
    assert direct.status_code == 401
    if single.status_code == 200:
        assert single.headers["docker-content-digest"] != image.digest


def test_one_component_names_are_not_rewritten_off_docker_hub_and_errors_are_oci(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(args=["--tag-ttl", "0"])
    with httpx.Client(base_url=mirror.url) as client:
        cases = {
            "/v2/test/oci-single/manifests/nope": (404, "MANIFEST_UNKNOWN"),
            "/v2/test/oci-single/blobs/sha256:" + "0" * 64: (404, "BLOB_UNKNOWN"),
            "/v2/Test/x/manifests/1": (400, "NAME_INVALID"),
            "/v2/test/x/manifests/-bad": (400, "MANIFEST_INVALID"),
            "/v2/test/x/blobs/sha256:abc": (400, "DIGEST_INVALID"),
            "/v2/test/x/blobs/md5:" + "0" * 32: (400, "DIGEST_INVALID"),
            "/v2/test/x/manifests/1?ns=elsewhere.io": (404, "NAME_UNKNOWN"),
        }
        for path, (status, code) in cases.items():
            response = client.get(path)
            assert response.status_code == status, path
            assert response.json()["errors"][0]["code"] == code, path
            assert response.headers["docker-distribution-api-version"] == "registry/2.0"
        # containerd's ?ns=<registry> naming the upstream is accepted.
        ok = client.get("/v2/library/small/manifests/latest?ns=docker.io",
                        headers={"Accept": ALL_TYPES})
        assert ok.status_code == 200
        # `small` means `library/small` only on Docker Hub's convention (docker.io upstream).
        assert client.get("/v2/small/manifests/latest",
                          headers={"Accept": ALL_TYPES}).status_code == 200


def test_tags_list_passes_through_with_pagination(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    image = upstream.images["test/oci-single:1.0"]
    with httpx.Client(base_url=mirror.url) as client:
        full = client.get(f"/v2/{image.repo}/tags/list")
        assert full.status_code == 200
        assert full.json() == {"name": image.repo, "tags": [image.tag]}
        page = client.get("/v2/docker.io/test/oci-single/tags/list", params={"n": "1"})
        assert page.status_code == 200
        assert page.json()["tags"] == [image.tag]
        if "link" in page.headers:
            assert page.headers["link"].startswith("</v2/docker.io/test/oci-single/tags/list?")
        missing = client.get("/v2/test/nothing-here/tags/list")
        assert missing.status_code == 404
        assert missing.json()["errors"][0]["code"] == "NAME_UNKNOWN"


def test_unreachable_upstream_is_a_502_naming_it(start_mirror: StartMirror) -> None:
    from support.procs import free_port

    mirror = start_mirror(upstreams=[("deadhub", f"http://127.0.0.1:{free_port()}")])
    response = httpx.get(f"{mirror.url}/v2/some/image/manifests/1")
    assert response.status_code == 502
    error = response.json()["errors"][0]
    assert "deadhub" in error["message"]


def test_partials_left_behind_are_removed_at_start(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    mirror.stop()
    tmp = mirror.cache_dir / "tmp"
    stale = tmp / ("sha256-" + "1" * 64 + ".part")
    stale.write_bytes(b"half a blob")
    mirror.start()
    assert not stale.exists()
    # And nothing under the cache is served for it.
    response = httpx.get(f"{mirror.url}/v2/test/oci-single/blobs/sha256:" + "1" * 64)
    assert response.status_code == 404


@pytest.mark.parametrize("path", ["/v2/../../etc/passwd", "/v2/%2e%2e/x/blobs/sha256:" + "a" * 64,
                                  "/v2/a/blobs/sha256:..%2f..%2f" + "a" * 58])
def test_no_path_escapes(start_mirror: StartMirror, path: str) -> None:
    mirror = start_mirror()
    with httpx.Client() as client:
        response = client.get(mirror.url + path)
    assert response.status_code in (400, 404)
    json.loads(response.content)["errors"][0]["code"]
