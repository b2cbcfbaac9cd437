"""Private images through the mirror, and no leaks of cached private content."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import httpx
import pytest
from conftest import StartMirror
from support.containerd import Containerd, write_hosts_toml
from support.daemons import DockerdFactory, require
from support.dockerd import docker_hub_credentials
from support.images import SkopeoError, skopeo, skopeo_copy_to_dir
from support.registry import Registry, Upstream

PRIVATE = "private/secret:1.0"
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def token_for(mirror_url: str, user: str, password: str, repo: str) -> str:
    """Log in as a client would: our realm, Basic credentials, a pull scope."""
    response = httpx.get(f"{mirror_url}/token", headers=basic(user, password),
                         params={"service": "docker.io", "scope": f"repository:{repo}:pull"})
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


def test_ping_challenges_and_anonymous_token_reads_public(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    ping = httpx.get(f"{mirror.url}/v2/")
    assert ping.status_code == 401
    challenge = ping.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{mirror.url}/token"' in challenge
    assert 'service="docker.io"' in challenge
    anonymous = httpx.get(f"{mirror.url}/token",
                          params={"service": "docker.io", "scope": "repository:test/x:pull"})
    assert anonymous.status_code == 200
    token = anonymous.json()["token"]
    auth = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    assert httpx.get(f"{mirror.url}/v2/", headers=auth).status_code == 200
    image = upstream.images["test/oci-single:1.0"]
    response = httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}", headers=auth)
    assert response.status_code == 200
    # No Authorization at all still gets public content.
    plain = httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}",
                      headers={"Accept": ACCEPT})
    assert plain.headers["docker-content-digest"] == image.digest
    # Wrong credentials at the token endpoint are refused, naming the upstream.
    refused = httpx.get(f"{mirror.url}/token", headers=basic("alice", "nope"),
                        params={"service": "docker.io", "scope": "repository:test/x:pull"})
    assert refused.status_code == 401
    assert "docker.io" in refused.json()["errors"][0]["message"]


def test_private_image_needs_the_right_credentials(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    mirror = start_mirror()
    image = upstream.images[PRIVATE]
    anonymous = httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}",
                          headers={"Accept": ACCEPT})
    assert anonymous.status_code == 401
    assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
    challenge = anonymous.headers["www-authenticate"]
    assert f'realm="{mirror.url}/token"' in challenge
    assert f'scope="repository:{image.repo}:pull"' in challenge

    dest = tmp_path / "alice"
    skopeo_copy_to_dir(f"docker://{mirror.host}/{PRIVATE}", dest, creds="alice:alicepw")
    manifest = (dest / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == image.digest

    with pytest.raises(SkopeoError):
        skopeo_copy_to_dir(f"docker://{mirror.host}/{PRIVATE}", tmp_path / "bob",
                           creds="bob:bobpw")
    with pytest.raises(SkopeoError):
        skopeo_copy_to_dir(f"docker://{mirror.host}/{PRIVATE}", tmp_path / "anon")

    bob = {"Authorization": f"Bearer {token_for(mirror.url, 'bob', 'bobpw', image.repo)}",
           "Accept": ACCEPT}
    denied = httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}", headers=bob)
    assert denied.status_code == 403
    assert denied.json()["errors"][0]["code"] == "DENIED"
    assert "docker.io" in denied.json()["errors"][0]["message"]


def test_cached_private_content_is_never_served_without_proven_access(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    mirror = start_mirror()
    image = upstream.images[PRIVATE]
    public = upstream.images["test/oci-single:1.0"]
    skopeo_copy_to_dir(f"docker://{mirror.host}/{PRIVATE}", tmp_path / "alice",
                       creds="alice:alicepw")  # now everything of it is in the cache
    bob_token = token_for(mirror.url, "bob", "bobpw", image.repo)
    callers = {
        "nobody": {},
        "anonymous token": {"Authorization": "Bearer anonymous"},
        "bob": {"Authorization": f"Bearer {bob_token}"},
        "bob basic": basic("bob", "bobpw"),
        "forged": {"Authorization": "Bearer not-a-real-token"},
    }
    paths = [f"/v2/{image.repo}/manifests/{image.tag}",
             f"/v2/{image.repo}/manifests/{image.digest}"]
    for digest, _ in image.blobs:
        paths.append(f"/v2/{image.repo}/blobs/{digest}")
        paths.append(f"/v2/{public.repo}/blobs/{digest}")  # fished out under a public name
    paths.append(f"/v2/{public.repo}/manifests/{image.digest}")
    secret_blobs = {image.read_blob(d) for d, _ in image.blobs}
    for who, headers in callers.items():
        for path in paths:
            for method in ("GET", "HEAD"):
                response = httpx.request(method, mirror.url + path,
                                         headers={"Accept": ACCEPT, **headers})
                assert response.status_code in (401, 403, 404), (who, method, path)
                assert response.content not in secret_blobs
                assert response.headers.get("docker-content-digest") is None, (who, path)
                if method == "GET":
                    assert response.json()["errors"][0]["code"] in (
                        "UNAUTHORIZED", "DENIED", "BLOB_UNKNOWN", "MANIFEST_UNKNOWN"), who
    # alice still can.
    alice = {"Authorization": f"Bearer {token_for(mirror.url, 'alice', 'alicepw', image.repo)}"}
    for digest, _ in image.blobs:
        got = httpx.get(f"{mirror.url}/v2/{image.repo}/blobs/{digest}", headers=alice)
        assert got.status_code == 200
        assert got.content == image.read_blob(digest)


def test_docker_daemon_with_hub_credentials_pulls_private_through_the_mirror(
    upstream: Upstream, start_mirror: StartMirror, dockerd_factory: DockerdFactory,
    tmp_path: Path,
) -> None:
    require("dockerd", "docker")
    mirror = start_mirror()
    daemon = dockerd_factory(mirror.url, insecure_registries=[mirror.host])
    image = upstream.images[PRIVATE]
    without = daemon.pull(PRIVATE)
    assert without.returncode != 0
    config = tmp_path / "docker-config"
    docker_hub_credentials(config, "alice", "alicepw")
    result = daemon.pull(PRIVATE, docker_config_dir=config)
    assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
    assert daemon.image_digest(PRIVATE) == image.digest


def test_containerd_with_user_pulls_private(
    upstream: Upstream, start_mirror: StartMirror, containerd: Containerd, tmp_path: Path
) -> None:
    require("containerd", "ctr")
    mirror = start_mirror()
    hosts = tmp_path / "certs.d"
    write_hosts_toml(hosts, "docker.io", mirror_url=mirror.url)
    ref = f"docker.io/{PRIVATE}"
    assert containerd.pull(ref, hosts).returncode != 0
    result = containerd.pull(ref, hosts, user="alice:alicepw")
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(ref) == upstream.images[PRIVATE].digest


@pytest.fixture
def second(tmp_path: Path, upstream: Upstream) -> Registry:
    """A second upstream (no auth) holding a different image under a name the first has."""
    with Registry(tmp_path / "second", name="second") as registry:
        skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
               f"docker://{upstream.host}/library/small:latest",
               f"docker://{registry.host}/test/oci-single:1.0")
        yield registry


def test_two_upstreams_route_by_prefix_ns_and_default_without_collisions(
    upstream: Upstream, second: Registry, start_mirror: StartMirror, tmp_path: Path
) -> None:
    mirror = start_mirror(upstreams=[("docker.io", upstream.url), ("second", second.url)])
    first_digest = upstream.images["test/oci-single:1.0"].digest
    second_digest = upstream.images["library/small:latest"].digest
    assert first_digest != second_digest
    expected = {
        "/v2/test/oci-single/manifests/1.0": first_digest,
        "/v2/second/test/oci-single/manifests/1.0": second_digest,
        "/v2/test/oci-single/manifests/1.0?ns=second": second_digest,
        "/v2/test/oci-single/manifests/1.0?ns=docker.io": first_digest,
        f"/v2/test/oci-single/manifests/1.0?ns={second.host}": second_digest,
        "/v2/docker.io/test/oci-single/manifests/1.0": first_digest,
    }
    with httpx.Client(base_url=mirror.url, headers={"Accept": ACCEPT}) as client:
        for _ in range(2):  # cold, then from the caches: the same answers
            for path, digest in expected.items():
                response = client.get(path)
                assert response.status_code == 200, path
                assert response.headers["docker-content-digest"] == digest, path
        unknown = client.get("/v2/test/oci-single/manifests/1.0?ns=ghcr.io")
        assert unknown.status_code == 404
        assert unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    # podman's mirror location `mirror/second` works with a real client.
    skopeo_copy_to_dir(f"docker://{mirror.host}/second/test/oci-single:1.0", tmp_path / "p")
    manifest = (tmp_path / "p" / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == second_digest


def config_file(path: Path, url: str, **options: object) -> Path:
    lines = ["[[upstreams]]", 'name = "docker.io"', f'url = "{url}"']
    for key, value in options.items():
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}")
    path.write_text("\n".join(lines).replace("'", '"') + "\n")
    return path


def test_configured_credentials_fetch_public_content_but_expose_nothing_private(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    config = config_file(tmp_path / "m.toml", upstream.url, username="alice",
                         password="alicepw")
    mirror = start_mirror(upstreams=[], args=["--config", str(config)])
    public = upstream.images["test/oci-single:1.0"]
    upstream.issuer.requests.clear()
    response = httpx.get(f"{mirror.url}/v2/{public.repo}/blobs/{public.blobs[0][0]}")
    assert response.status_code == 200
    assert any(r.account == "alice" for r in upstream.issuer.requests)  # content fetched as alice
    private = upstream.images[PRIVATE]
    refused = httpx.get(f"{mirror.url}/v2/{private.repo}/manifests/{private.tag}",
                        headers={"Accept": ACCEPT})
    assert refused.status_code == 401

    exposed = config_file(tmp_path / "e.toml", upstream.url, username="alice",
                          password="alicepw", expose_private=True)
    mirror = start_mirror(upstreams=[], args=["--config", str(exposed)])
    allowed = httpx.get(f"{mirror.url}/v2/{private.repo}/manifests/{private.tag}",
                        headers={"Accept": ACCEPT})
    assert allowed.status_code == 200
    assert allowed.headers["docker-content-digest"] == private.digest


def test_auth_passthrough_sends_the_upstreams_own_challenge(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    config = config_file(tmp_path / "p.toml", upstream.url, auth_passthrough=True)
    mirror = start_mirror(upstreams=[], args=["--config", str(config)])
    ping = httpx.get(f"{mirror.url}/v2/")
    assert ping.status_code == 401
    assert f'realm="{upstream.issuer.realm}"' in ping.headers["www-authenticate"]
    private = upstream.images[PRIVATE]
    refused = httpx.get(f"{mirror.url}/v2/{private.repo}/manifests/{private.tag}")
    assert f'realm="{upstream.issuer.realm}"' in refused.headers["www-authenticate"]
    # A client that fetched its token from the upstream itself is served.
    token = httpx.get(upstream.issuer.realm, auth=("alice", "alicepw"), params={
        "service": "upstream-registry", "scope": f"repository:{private.repo}:pull"}).json()
    ok = httpx.get(f"{mirror.url}/v2/{private.repo}/manifests/{private.tag}",
                   headers={"Authorization": f"Bearer {token['token']}", "Accept": ACCEPT})
    assert ok.status_code == 200
    assert ok.headers["docker-content-digest"] == private.digest
