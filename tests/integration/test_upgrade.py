"""A cache written by the previous release (its metadata in a diskcache index) opens with
this release and serves everything with nothing fetched again.

The previous release's code comes from this repository's history (`PREVIOUS`), run as it
was, against the same upstream registry.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import StartMirror
from support.images import ImageInfo, skopeo
from support.procs import REPO_ROOT, MirrorProc, clean_env
from support.registry import Upstream

PREVIOUS = "6dfe8f2"  # the last release that kept metadata in a diskcache index
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's `mirror` package, from git."""
    root = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", PREVIOUS, "mirror"],
                             capture_output=True, check=False)
    assert archive.returncode == 0, (
        f"the previous release ({PREVIOUS}) must be in this clone's history: "
        f"{archive.stderr.decode()}")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def pull(mirror_url: str, image: ImageInfo, creds: str | None = None) -> None:
    args = ["copy", "--all", "--src-tls-verify=false"]
    if creds:
        args += ["--src-creds", creds]
    skopeo(*args, f"docker://{mirror_url.removeprefix('http://')}/{image.repo}:{image.tag}",
           f"dir:/tmp/upgrade-{image.repo.replace('/', '-')}-{id(args)}")


def cli(code: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *map(str, args)], cwd=code,
                          env=clean_env({"PYTHONPATH": str(code)}), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def old_cache(upstream: Upstream, previous: Path, tmp_path: Path) -> Iterator[Path]:
    """A cache filled by the previous release: public images pulled anonymously, a private
    one pulled by alice, and one seeded (pinned)."""
    cache = tmp_path / "cache"
    seeded = cli(previous, "seed", "--cache-dir", cache, "--upstream",
                 f"docker.io={upstream.url}", "test/docker-v2s2:1.0")
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    old = MirrorProc([("docker.io", upstream.url)], cache, tmp_path / "old-logs", code=previous)
    old.start()
    try:
        for ref in ("test/oci-single:1.0", "test/oci-index:1.0", "library/small:latest"):
            pull(old.url, upstream.images[ref])
        pull(old.url, upstream.images["private/secret:1.0"], "alice:alicepw")
    finally:
        old.stop()
    assert (cache / "index" / "cache.db").exists() and not (cache / "metadata.db").exists()
    yield cache


def test_a_previous_release_cache_serves_with_nothing_fetched_again(
    upstream: Upstream, old_cache: Path, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(cache_dir=old_cache)
    mark = upstream.registry.mark()
    for ref in ("test/oci-single:1.0", "test/oci-index:1.0", "library/small:latest",
                "test/docker-v2s2:1.0"):
        pull(mirror.url, upstream.images[ref])
    pull(mirror.url, upstream.images["private/secret:1.0"], "alice:alicepw")
    seen = upstream.registry.requests(since=mark)
    fetched = [r for r in seen if r.method == "GET" and ("/blobs/" in r.path
                                                          or "/manifests/sha256:" in r.path)]
    assert fetched == [], fetched
    # Access still follows the rules: the private image was never anyone's but alice's.
    secret = upstream.images["private/secret:1.0"]
    for digest, _ in secret.blobs:
        refused = httpx.get(f"{mirror.url}/v2/{secret.repo}/blobs/{digest}", timeout=30)
        assert refused.status_code == 401
    mirror.stop()
    for command in ("ls", "verify"):
        result = cli(REPO_ROOT, "cache", command, "--cache-dir", old_cache)
        assert result.returncode == 0, result.stdout + result.stderr
    listing = cli(REPO_ROOT, "cache", "ls", "--cache-dir", old_cache).stdout
    for name in ("docker.io/test/oci-single:1.0", "docker.io/library/small:latest",
                 "docker.io/private/secret:1.0", "docker.io/test/docker-v2s2:1.0"):
        assert name in listing, listing


def test_a_previous_release_cache_serves_its_seeded_images_offline(
    upstream: Upstream, old_cache: Path, start_mirror: StartMirror
) -> None:
    mirror = start_mirror(cache_dir=old_cache, args=["--offline"])
    image = upstream.images["test/docker-v2s2:1.0"]
    with httpx.Client(base_url=mirror.url, headers={"Accept": ACCEPT}, timeout=30) as client:
        manifest = client.get(f"/v2/{image.repo}/manifests/{image.tag}")
        assert manifest.status_code == 200, manifest.text
        for digest, _ in image.blobs:
            assert client.get(f"/v2/{image.repo}/blobs/{digest}").status_code == 200
        # Private content pulled with credentials: not for anyone offline.
        secret = upstream.images["private/secret:1.0"]
        assert client.get(f"/v2/{secret.repo}/manifests/{secret.tag}").status_code == 503
