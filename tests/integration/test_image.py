"""The container image: built by a real dockerd from the Dockerfile on a Debian base made here
(debootstrap, `docker import`), with no network during the build (dependencies from a
wheelhouse made on the host), then run with `docker run --network host` and pulled through
with skopeo."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.baseimage import key, rootfs_tarball, wheelhouse
from support.daemons import require
from support.dockerd import Dockerd
from support.images import sha256, skopeo
from support.procs import REPO_ROOT, free_port, wait_http
from support.registry import Upstream

BASE = f"mirror-test-base:{key()}"


@pytest.fixture
def dockerd(monkeypatch: pytest.MonkeyPatch) -> Iterator[Dockerd]:
    require("dockerd", "docker", "containerd", "debootstrap", "tar")
    monkeypatch.setenv("DOCKER_BUILDKIT", "0")  # the classic builder: no buildx needed
    with Dockerd(None) as daemon:
        yield daemon


def build_context(work: Path) -> Path:
    """What `docker build .` would see in the repository, plus wheels/."""
    context = work / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, context / name)
    shutil.copytree(REPO_ROOT / "mirror", context / "mirror",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheelhouse(context, context / "wheels")
    return context


def test_image_builds_offline_runs_and_serves(
    upstream: Upstream, dockerd: Dockerd, tmp_path: Path
) -> None:
    times: dict[str, float] = {}
    started = time.monotonic()
    tarball = rootfs_tarball()
    times["base rootfs (cached or debootstrap)"] = time.monotonic() - started

    mark = time.monotonic()
    imported = dockerd.docker("import", str(tarball), BASE, timeout=600)
    assert imported.returncode == 0, imported.stderr
    times["docker import"] = time.monotonic() - mark

    mark = time.monotonic()
    context = build_context(tmp_path)
    times["wheelhouse"] = time.monotonic() - mark

    mark = time.monotonic()
    built = dockerd.docker("build", "--network", "none", "--build-arg", f"BASE={BASE}",
                           "--build-arg", "WHEELS=wheels", "-t", "mirror-test:1", str(context),
                           timeout=900)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    times["docker build (no network)"] = time.monotonic() - mark

    [info] = json.loads(dockerd.docker("image", "inspect", "mirror-test:1").stdout)
    assert info["Config"]["User"] == "mirror"
    assert info["Config"]["Entrypoint"] == ["mirror"]

    port = free_port()
    mark = time.monotonic()
    run = dockerd.docker(
        "run", "-d", "--name", "mirror", "--network", "host",
        "-e", f"MIRROR_LISTEN=127.0.0.1:{port}",
        "-e", f"MIRROR_UPSTREAMS=docker.io={upstream.url}",
        "mirror-test:1")
    assert run.returncode == 0, run.stderr
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/", 60, ok=lambda s: s in (200, 401))
        times["container start until /v2/ answers"] = time.monotonic() - mark
        image = upstream.images["test/oci-single:1.0"]
        dest = tmp_path / "pulled"
        skopeo("copy", "--src-tls-verify=false", "--src-no-creds", "--preserve-digests",
               f"docker://127.0.0.1:{port}/{image.ref}", f"dir:{dest}")
        assert sha256((dest / "manifest.json").read_bytes()) == image.digest
        for digest, _ in image.blobs:
            assert sha256((dest / digest.removeprefix("sha256:")).read_bytes()) == digest
        # The image's own health check passes, and the server runs as `mirror`.
        health = json.loads(dockerd.docker("inspect", "mirror").stdout)[0]["Config"]["Healthcheck"]
        assert health["Test"][0] == "CMD"
        checked = dockerd.docker("exec", "mirror", *health["Test"][1:])
        assert checked.returncode == 0, checked.stderr
        assert dockerd.docker("exec", "mirror", "id", "-un").stdout.strip() == "mirror"
        # The cache is in the volume.
        listed = dockerd.docker("exec", "mirror", "find", "/var/cache/mirror/blobs", "-type", "f")
        assert len(listed.stdout.split()) >= len(image.blobs)
    finally:
        logs = dockerd.docker("logs", "mirror")
        print(f"--- container log ---\n{(logs.stdout + logs.stderr)[-3000:]}")
        dockerd.docker("rm", "-f", "mirror")
    print("\n" + "\n".join(f"{what}: {seconds:.1f}s" for what, seconds in times.items()))
