"""The distribution spec to the letter: upstream 4xx answers passed on the same whether the
cache is cold or warm, the catalog, tag lists named as asked, and stale answers marked."""

from __future__ import annotations

import httpx
from conftest import StartMirror
from support.registry import Upstream

from mirror.errors import SPEC_CODES

OCI_ONLY = "application/vnd.oci.image.manifest.v1+json"
ALL = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


def answer(response: httpx.Response) -> tuple[int, str | None]:
    if response.status_code < 400:
        return response.status_code, response.headers.get("docker-content-digest")
    code = response.json()["errors"][0]["code"]
    assert code in SPEC_CODES, response.text
    return response.status_code, code


def test_an_upstream_answer_is_the_same_cold_or_warm(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    image = upstream.images["test/docker-v2s2:1.0"]
    path = f"/v2/{image.repo}/manifests/{image.tag}"
    cold_mirror = start_mirror()
    cold = httpx.get(f"{cold_mirror.url}{path}", headers={"Accept": OCI_ONLY}, timeout=30)
    warm_mirror = start_mirror()
    assert httpx.get(f"{warm_mirror.url}{path}", headers={"Accept": ALL},
                     timeout=30).status_code == 200
    warm = httpx.get(f"{warm_mirror.url}{path}", headers={"Accept": OCI_ONLY}, timeout=30)
    assert answer(cold) == answer(warm)


def test_the_catalog_lists_what_the_caller_may_read(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    public = [upstream.images[r] for r in ("test/oci-single:1.0", "library/small:latest")]
    secret = upstream.images["private/secret:1.0"]
    with httpx.Client(base_url=mirror.url, headers={"Accept": ALL}, timeout=30) as client:
        for image in public:
            assert client.get(f"/v2/{image.repo}/manifests/{image.tag}").status_code == 200
        token = client.get("/token", params={"service": "docker.io", "scope":
                                             f"repository:{secret.repo}:pull"},
                           auth=("alice", "alicepw")).json()["token"]
        alice = {"Authorization": f"Bearer {token}"}
        assert client.get(f"/v2/{secret.repo}/manifests/{secret.tag}",
                          headers=alice).status_code == 200
        anonymous = client.get("/v2/_catalog").json()["repositories"]
        assert anonymous == sorted(i.repo for i in public)
        everything = client.get("/v2/_catalog", headers=alice).json()["repositories"]
        assert everything == sorted([*(i.repo for i in public), secret.repo])
        first = client.get("/v2/_catalog", params={"n": "1"})
        assert first.json()["repositories"] == [min(i.repo for i in public)]
        link = first.headers["link"]
        assert link.startswith("</v2/_catalog?n=1&last=") and 'rel="next"' in link
        rest = client.get(link.partition("<")[2].partition(">")[0]).json()["repositories"]
        assert rest == [max(i.repo for i in public)]
        assert client.get("/v2/_catalog", params={"n": "x"}).status_code == 405


def test_a_tag_list_names_the_repository_as_the_client_did(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    for name in ("docker.io/library/small", "library/small", "small"):
        listed = httpx.get(f"{mirror.url}/v2/{name}/tags/list", timeout=30)
        assert listed.status_code == 200, listed.text
        assert listed.json()["name"] == name
        assert "latest" in listed.json()["tags"]
