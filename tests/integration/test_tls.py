"""HTTPS: skopeo, a real dockerd and a real containerd pull through a mirror serving TLS with a
certificate from a CA made in the test; certificates are rotated with a rolling restart."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path

import httpx
from conftest import StartMirror
from support.connectproxy import ConnectProxy
from support.containerd import Containerd, write_hosts_toml
from support.daemons import require
from support.dockerd import Dockerd
from support.images import sha256, skopeo
from support.registry import Upstream
from support.tls import ServerCert, fingerprint, make_server_cert

IMAGE = "test/oci-single:1.0"
DOCKER_CERTS_D = Path("/etc/docker/certs.d")  # dockerd 20.10 reads only this (when not rootless)


def test_skopeo_pulls_through_the_tls_mirror_with_the_ca(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    tls = make_server_cert(tmp_path / "tls")
    mirror = start_mirror(args=tls.flags, tls_ca=tls.ca)
    cert_dir = tmp_path / "skopeo-certs"
    cert_dir.mkdir()
    shutil.copy(tls.ca, cert_dir / "ca.crt")
    image = upstream.images[IMAGE]
    dest = tmp_path / "pulled"
    skopeo("copy", "--src-no-creds", "--src-cert-dir", str(cert_dir), "--preserve-digests",
           f"docker://{mirror.host}/{image.ref}", f"dir:{dest}")
    assert sha256((dest / "manifest.json").read_bytes()) == image.digest
    for digest, _ in image.blobs:
        assert sha256((dest / digest.removeprefix("sha256:")).read_bytes()) == digest
    # Without the CA the certificate is refused: the client really checked it.
    refused = skopeo("copy", "--src-no-creds", f"docker://{mirror.host}/{image.ref}",
                     f"dir:{tmp_path / 'refused'}", check=False)
    assert refused.returncode != 0
    assert "certificate" in refused.stderr, refused.stderr


def test_docker_daemon_checks_the_mirror_with_the_ca_in_certs_d(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    """dockerd skips TLS verification for any registry it resolves to 127.0.0.0/8, so it reaches
    the mirror by a name that does not resolve, `mirror.test`, through a loopback CONNECT proxy
    that tunnels only that name to the mirror."""
    require("dockerd", "docker", "containerd")
    tls = make_server_cert(tmp_path / "tls")
    mirror = start_mirror(args=tls.flags, tls_ca=tls.ca)
    name = f"mirror.test:{mirror.port}"
    certs = DOCKER_CERTS_D / name
    image = upstream.images["library/small:latest"]
    with ConnectProxy({name: ("127.0.0.1", mirror.port)}) as proxy:
        daemon = Dockerd(f"https://{name}", extra_config={"insecure-registries": []},
                         proxy=proxy.url)
        try:
            certs.mkdir(parents=True)
            shutil.copy(tls.ca, certs / "ca.crt")
            daemon.start()
            result = daemon.pull("small")
            assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
            assert daemon.image_digest("small") == image.digest
            assert name in proxy.tunnels
            # Without the CA the daemon refuses the mirror's certificate (and falls back to
            # Docker Hub, which the proxy refuses).
            (certs / "ca.crt").unlink()
            failed = daemon.pull("test/docker-v2s2:1.0")
            assert failed.returncode != 0
            assert "x509" in failed.stderr + daemon.log(), failed.stderr
        finally:
            daemon.stop()
            shutil.rmtree(certs, ignore_errors=True)


def test_containerd_pulls_through_the_tls_mirror_with_ca_in_hosts_toml(
    upstream: Upstream, start_mirror: StartMirror, containerd: Containerd, tmp_path: Path
) -> None:
    require("containerd", "ctr")
    tls = make_server_cert(tmp_path / "tls")
    mirror = start_mirror(args=tls.flags, tls_ca=tls.ca)
    image = upstream.images["library/small:latest"]
    ref = "docker.io/library/small:latest"
    without_ca = tmp_path / "without-ca"
    write_hosts_toml(without_ca, "docker.io", mirror_url=mirror.url)
    refused = containerd.pull(ref, without_ca)
    assert refused.returncode != 0
    assert "x509" in refused.stderr, refused.stderr
    hosts = tmp_path / "certs.d"
    write_hosts_toml(hosts, "docker.io", mirror_url=mirror.url, extra=f'  ca = "{tls.ca}"\n')
    result = containerd.pull(ref, hosts)
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(ref) == image.digest


# -- rotation ----------------------------------------------------------------------------------

def served_certificate(port: int) -> bytes:
    """SHA-256 fingerprint of the certificate a new connection is shown."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).digest()


def install(cert: ServerCert, live: Path) -> None:
    """Replace the live files as an operator should: new files renamed over the old ones."""
    for src, name in ((cert.cert, "server.crt"), (cert.key, "server.key")):
        tmp = live / f".{name}.new"
        shutil.copy(src, tmp)
        os.replace(tmp, live / name)


def test_certificates_are_rotated_by_sighup_without_refusing_a_request(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    old = make_server_cert(tmp_path / "old", label="old")
    new = make_server_cert(tmp_path / "new", label="new")
    live = tmp_path / "live"
    live.mkdir()
    install(old, live)
    both = tmp_path / "both-cas.crt"
    both.write_bytes(old.ca.read_bytes() + new.ca.read_bytes())
    mirror = start_mirror(workers=2, tls_ca=both, args=[
        "--tls-cert", str(live / "server.crt"), "--tls-key", str(live / "server.key")])
    assert mirror.proc is not None
    assert served_certificate(mirror.port) == fingerprint(old.cert.read_bytes())

    install(new, live)
    os.kill(mirror.proc.pid, signal.SIGHUP)  # uvicorn replaces its workers one by one
    started = time.monotonic()
    answered, failures, streak = 0, [], 0
    trusted = ssl.create_default_context(cafile=both)
    with httpx.Client(verify=trusted, trust_env=False, timeout=10) as client:
        while streak < 20:  # every new connection, whichever worker takes it, shows the new one
            assert time.monotonic() - started < 60, f"still the old certificate; {failures}"
            try:
                status = client.get(f"{mirror.url}/v2/", headers={"Connection": "close"})
                answered += 1
                if status.status_code not in (200, 401):
                    failures.append(status.status_code)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            shown = served_certificate(mirror.port)
            streak = streak + 1 if shown == fingerprint(new.cert.read_bytes()) else 0
    print(f"rotation: new certificate everywhere after {time.monotonic() - started:.2f}s, "
          f"{answered} requests answered meanwhile")
    assert failures == []
    assert mirror.alive
