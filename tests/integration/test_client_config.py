"""The output of `mirror client-config`, unchanged, makes real clients pull through the mirror:
dockerd (daemon.json), containerd (`ctr --hosts-dir`) and skopeo (podman's registries.conf).
The mirror has two upstreams, `docker.io` and `local`, both the test registry."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

from conftest import StartMirror
from support.containerd import Containerd
from support.daemons import require
from support.dockerd import Dockerd
from support.images import sha256, skopeo
from support.procs import REPO_ROOT, MirrorProc, clean_env
from support.registry import Upstream


def client_config(client: str, mirror: MirrorProc) -> str:
    argv = [sys.executable, "-m", "mirror", "client-config", client, "--mirror", mirror.url]
    for name, url in mirror.upstreams:
        argv += ["--upstream", f"{name}={url}"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                          env=clean_env({"PYTHONPATH": str(REPO_ROOT)}), check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def two_upstreams(upstream: Upstream, start_mirror: StartMirror) -> MirrorProc:
    return start_mirror(upstreams=[("docker.io", upstream.url), ("local", upstream.url)])


def logged(mirror: MirrorProc, fragment: str) -> bool:
    """Whether an access-log line of the mirror holds `fragment` (waiting out the batching)."""
    deadline = time.monotonic() + 5
    while fragment not in mirror.log_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_docker_daemon_json(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    require("dockerd", "docker", "containerd")
    mirror = two_upstreams(upstream, start_mirror)
    config = json.loads(client_config("docker", mirror))
    image = upstream.images["library/small:latest"]
    with Dockerd(None, extra_config=config) as daemon:
        result = daemon.pull("small")
        assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
        assert daemon.image_digest("small") == image.digest
    assert logged(mirror, '"GET /v2/library/small/manifests/')


def test_containerd_hosts_toml(
    upstream: Upstream, start_mirror: StartMirror, containerd: Containerd, tmp_path: Path
) -> None:
    require("containerd", "ctr")
    mirror = two_upstreams(upstream, start_mirror)
    text = client_config("containerd", mirror)
    hosts = tmp_path / "certs.d"
    # Split as a shell script would: each "# file: NAME" line starts the file NAME.
    script = ('awk -v dir="$1" \'/^# file: /{f = dir "/" $3; d = f; sub("/[^/]*$", "", d); '
              'system("mkdir -p \\"" d "\\""); next} f {print > f}\'')
    subprocess.run(["sh", "-c", script, "split", str(hosts)], input=text, text=True,
                   check=True, timeout=30)
    registry = upstream.host
    assert sorted(p.relative_to(hosts).as_posix() for p in hosts.rglob("hosts.toml")) == [
        f"{registry}/hosts.toml", "docker.io/hosts.toml"]
    for ref, key, ns in [("docker.io/library/small:latest", "library/small:latest",
                          "docker.io"),
                         (f"{registry}/test/oci-single:1.0", "test/oci-single:1.0", registry)]:
        result = containerd.pull(ref, hosts)
        assert result.returncode == 0, result.stderr
        assert containerd.image_digest(ref) == upstream.images[key].digest
        # through the mirror, routed by ?ns= (both upstreams are one registry: the first
        # matching its host answers)
        assert logged(mirror, f"ns={quote(ns, safe='')}")


def test_podman_registries_conf_with_skopeo(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    mirror = two_upstreams(upstream, start_mirror)
    conf = tmp_path / "registries.conf"
    conf.write_text(client_config("podman", mirror))
    for ref, key, prefix in [("docker.io/library/small:latest", "library/small:latest",
                              "/v2/docker.io/library/small/"),
                             (f"{upstream.host}/test/oci-single:1.0", "test/oci-single:1.0",
                              "/v2/local/test/oci-single/")]:
        dest = tmp_path / key.replace("/", "_")
        skopeo("--registries-conf", str(conf), "copy", "--src-no-creds", "--preserve-digests",
               f"docker://{ref}", f"dir:{dest}")
        assert sha256((dest / "manifest.json").read_bytes()) == upstream.images[key].digest
        assert logged(mirror, prefix)  # through the mirror, routed by path prefix
