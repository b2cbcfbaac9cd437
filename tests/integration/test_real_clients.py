"""A real Docker daemon (registry-mirrors) and a real containerd (hosts.toml) pull through
the mirror."""

from __future__ import annotations

from pathlib import Path

from conftest import StartMirror
from support.containerd import Containerd, write_hosts_toml
from support.daemons import DockerdFactory, require
from support.registry import Upstream


def test_docker_daemon_pulls_small_through_the_mirror(
    upstream: Upstream, start_mirror: StartMirror, dockerd_factory: DockerdFactory
) -> None:
    require("dockerd", "docker")
    mirror = start_mirror()
    daemon = dockerd_factory(mirror.url, insecure_registries=[mirror.host])
    mark = upstream.registry.mark()
    result = daemon.pull("small")
    assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
    image = upstream.images["library/small:latest"]
    assert daemon.image_digest("small") == image.digest
    # It really went through the mirror to the upstream.
    seen = upstream.registry.requests(since=mark)
    fetched = [r.path for r in seen if r.is_blob_get and r.status == 200]
    assert len(fetched) == len(image.blobs)


def test_containerd_pulls_through_hosts_toml(
    upstream: Upstream, start_mirror: StartMirror, containerd: Containerd, tmp_path: Path
) -> None:
    require("containerd", "ctr")
    mirror = start_mirror()
    hosts = tmp_path / "certs.d"
    write_hosts_toml(hosts, "docker.io", mirror_url=mirror.url)
    image = upstream.images["library/small:latest"]
    result = containerd.pull("docker.io/library/small:latest", hosts)
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest("docker.io/library/small:latest") == image.digest
    # Pull an index too: containerd asks for the host platform's child only.
    index = upstream.images["test/oci-index:1.0"]
    result = containerd.pull(f"docker.io/{index.ref}", hosts)
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(f"docker.io/{index.ref}") == index.digest
