"""Reaching upstreams the way real sites do: through a forward proxy (HTTP(S)_PROXY and
NO_PROXY), and over TLS with a private CA and a client certificate (mTLS)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartMirror
from support.images import skopeo
from support.procs import Proc, free_port, wait_http
from support.registry import Upstream
from support.tls import make_client_cert, make_server_cert


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A forward proxy on loopback: (its URL, its log)."""
    if shutil.which("tinyproxy") is None:
        pytest.fail("missing: tinyproxy (tests/run installs it)")
    port, work = free_port(), tmp_path / "tinyproxy"
    work.mkdir()
    log = work / "tinyproxy.log"
    config = work / "tinyproxy.conf"
    config.write_text(f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 60\n"
                      f"LogFile \"{log}\"\nLogLevel Info\nMaxClients 50\n")
    proc = Proc(["tinyproxy", "-d", "-c", str(config)], work, name="tinyproxy")
    try:
        wait_http(f"http://127.0.0.1:{port}/", 10, proc=proc)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.stop()


def pull(mirror_host: str, image_ref: str, dest: Path) -> None:
    skopeo("copy", "--all", "--src-tls-verify=false", f"docker://{mirror_host}/{image_ref}",
           f"dir:{dest}")


def test_upstreams_are_reached_through_the_proxy_unless_no_proxy_says(
    upstream: Upstream, start_mirror: StartMirror, tinyproxy: tuple[str, Path],
    tmp_path: Path,
) -> None:
    proxy, log = tinyproxy
    image = upstream.images["test/oci-single:1.0"]
    proxied = start_mirror(env={"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "NO_PROXY": "",
                                "no_proxy": ""})
    pull(proxied.host, image.ref, tmp_path / "a")
    wanted = ("/v2/", "/token", f"/v2/{image.repo}/blobs/{image.blobs[0][0]}")
    deadline = time.monotonic() + 10  # the proxy writes its log lines on its own time
    while not all(what in log.read_text() for what in wanted) and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = log.read_text()
    for what in wanted:
        assert what in seen, seen[-3000:]
    before = len(seen)
    direct = start_mirror(env={"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy,
                               "NO_PROXY": "127.0.0.1,localhost"})
    pull(direct.host, upstream.images["library/small:latest"].ref, tmp_path / "b")
    assert "/v2/library/small" not in log.read_text()[before:]


def test_a_tls_upstream_with_a_private_ca_and_a_client_certificate(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path,
) -> None:
    server = make_server_cert(tmp_path / "server", label="upstream")
    client = make_client_cert(tmp_path / "client")
    port, work = free_port(), tmp_path / "nginx"
    work.mkdir()
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log {work}/error.log warn;
pid {work}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {server.cert}; ssl_certificate_key {server.key};
        ssl_client_certificate {client.ca}; ssl_verify_client on;
        client_max_body_size 0; proxy_buffering off;
        location / {{ proxy_pass {upstream.url}; proxy_set_header Host $http_host; }}
    }}
}}
""")
    nginx = Proc(["nginx", "-c", str(conf), "-p", str(work), "-g", "daemon off;"], work,
                 name="nginx")
    try:
        url = f"https://127.0.0.1:{port}"
        settings = tmp_path / "mirror.toml"
        settings.write_text(
            f'[[upstream]]\nname = "docker.io"\nurl = "{url}"\nca_file = "{server.ca}"\n'
            f'client_cert = "{client.cert}"\nclient_key = "{client.key}"\n')
        mirror = start_mirror(upstreams=[], args=["--config", str(settings)])
        image = upstream.images["test/oci-index:1.0"]
        pull(mirror.host, image.ref, tmp_path / "a")
        assert "/v2/test/oci-index" in (work / "access.log").read_text()
        # Without the client certificate the upstream refuses the connection: a clear error.
        settings.write_text(
            f'[[upstream]]\nname = "docker.io"\nurl = "{url}"\nca_file = "{server.ca}"\n')
        bare = start_mirror(upstreams=[], args=["--config", str(settings)])
        failed = skopeo("copy", "--src-tls-verify=false",
                        f"docker://{bare.host}/{upstream.images['library/small:latest'].ref}",
                        f"dir:{tmp_path / 'b'}", check=False)
        assert failed.returncode != 0
        assert "docker.io" in bare.log_text() or "docker.io" in failed.stderr
    finally:
        nginx.stop()
