"""Validate the dockerd / containerd fixtures against a plain docker-registry used as mirror."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import daemons
from support.containerd import Containerd, remove_tree, write_hosts_toml
from support.daemons import DockerdFactory, require
from support.dockerd import docker_hub_credentials
from support.procs import free_port
from support.tinyimage import host_arch, push_tiny_image

# The fixtures under test (a conftest may import them too; this module's copies win here).
containerd_session = daemons.containerd_session
containerd = daemons.containerd
dockerd_factory = daemons.dockerd_factory

V2_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def manifest_digest(url: str, repo: str, ref: str) -> str:
    req = urllib.request.Request(f"{url}/v2/{repo}/manifests/{ref}", method="HEAD",
                                 headers={"Accept": V2_MANIFEST})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return str(resp.headers["Docker-Content-Digest"])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain, auth-less docker-registry holding library/small:latest; yields its URL."""
    require("docker-registry", "skopeo")
    work = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = work / "config.yml"
    config.write_text(
        "version: 0.1\nlog: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {work / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    url = f"http://127.0.0.1:{port}"
    with (work / "registry.log").open("wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/v2/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        push_tiny_image(work, f"127.0.0.1:{port}/library/small:latest")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        remove_tree(work)


def test_dockerd_pulls_through_mirror(dockerd_factory: DockerdFactory, registry: str,
                                      containerd: Containerd) -> None:
    # `containerd` runs at the same time, to show the two daemons do not collide.
    daemon = dockerd_factory(registry)
    assert daemon.startup_seconds < 10
    result = daemon.pull("small")
    assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
    expected = manifest_digest(registry, "library/small", "latest")
    assert daemon.image_digest("small") == expected
    assert daemon.image_digest("docker.io/library/small:latest") == expected
    assert dockerd_factory(registry) is daemon


def test_dockerd_fallback_stays_on_loopback(dockerd_factory: DockerdFactory,
                                            registry: str) -> None:
    daemon = dockerd_factory(registry)
    started = time.monotonic()
    result = daemon.pull("does-not-exist")  # mirror 404 -> Docker Hub -> dead proxy
    assert result.returncode != 0
    assert time.monotonic() - started < 30
    assert "127.0.0.1:9" in result.stderr + daemon.log(), result.stderr


def test_dockerd_credentials_login_push(dockerd_factory: DockerdFactory, registry: str,
                                        tmp_path: Path) -> None:
    daemon = dockerd_factory(registry)
    config = docker_hub_credentials(tmp_path / "cfg", "alice", "s3cret")
    auths = json.loads(config.read_text())["auths"]
    assert auths == {"https://index.docker.io/v1/": {"auth": "YWxpY2U6czNjcmV0"}}
    assert daemon.pull("small:latest", docker_config_dir=config.parent).returncode == 0

    host = registry.removeprefix("http://")
    login = daemon.login(host, "bob", "pw")  # the registry has no auth: any login works
    assert login.returncode == 0, login.stderr
    assert host in json.loads((daemon.config_dir / "config.json").read_text())["auths"]
    assert daemon.tag("small", f"{host}/pushed/small:1").returncode == 0
    pushed = daemon.push(f"{host}/pushed/small:1")
    assert pushed.returncode == 0, pushed.stderr
    assert manifest_digest(registry, "pushed/small", "1") == daemon.image_digest(
        f"{host}/pushed/small:1")
    assert daemon.rmi("small", f"{host}/pushed/small:1").returncode == 0
    assert daemon.image_id("small") is None


def test_containerd_pulls_via_hosts_dir(containerd: Containerd, registry: str,
                                        tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    toml = write_hosts_toml(hosts, mirror_url=registry)
    assert f'[host."{registry}"]' in toml.read_text()
    ref = "docker.io/library/small:latest"
    result = containerd.pull(ref, hosts, platform=f"linux/{host_arch()}")
    assert result.returncode == 0, result.stderr + containerd.log()[-3000:]
    assert containerd.image_digest(ref) == manifest_digest(registry, "library/small", "latest")
    result = containerd.pull(ref, hosts, user="u:p")  # credentials unused without a challenge
    assert result.returncode == 0, result.stderr


def test_containerd_fallback_stays_on_loopback(containerd: Containerd, registry: str,
                                               tmp_path: Path) -> None:
    for kind in ("images", "content"):  # cleaned per test
        assert containerd.ctr(kind, "ls", "-q").stdout.strip() == ""
    write_hosts_toml(tmp_path, mirror_url=registry)
    started = time.monotonic()
    result = containerd.pull("docker.io/library/does-not-exist:1", tmp_path)
    assert result.returncode != 0
    assert time.monotonic() - started < 30
    assert "127.0.0.1:9" in result.stderr, result.stderr
