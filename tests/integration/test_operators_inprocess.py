"""Operators in control, in process (the app on httpx's ASGI transport, scriptable upstreams
on loopback): the repository policy on every request naming a repository, audit entries,
the admin API, tags deleted upstream, and the rate-limit reserve."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.authfake import AuthUpstream, digest_of
from support.fake_upstream import FakeUpstream
from support.inproc import Mirror, basic, running

from mirror.routes import DELETED_WARNING, RESERVE_WARNING
from mirror.settings import Settings, Upstream

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
TOKEN = "s3cret-admin-token"


@pytest.fixture
def fake() -> Iterator[AuthUpstream]:
    with AuthUpstream() as upstream:
        yield upstream


def settings(tmp_path: Path, upstream: Upstream, **extra: Any) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", scrub_rate=0, upstreams=(upstream,),
                    **extra)


def run(coroutine: Any) -> None:
    asyncio.run(coroutine)


async def pull(mirror: Mirror, user: str | None, repo: str, tag: str) -> httpx.Response:
    """A whole pull; returns the manifest's answer."""
    caller = mirror.caller(user)
    manifest = await caller.get(f"/v2/{repo}/manifests/{tag}")
    if manifest.status_code == 200:
        doc = json.loads(manifest.content)
        for desc in [doc["config"], *doc["layers"]]:
            blob = await caller.get(f"/v2/{repo}/blobs/{desc['digest']}")
            assert blob.status_code == 200, blob.text
    return manifest


def denied(response: httpx.Response, rule: str) -> None:
    assert response.status_code == 403, (response.status_code, response.text)
    [error] = response.json()["errors"]
    assert error["code"] == "DENIED", error
    assert rule in error["message"], error


# -- the repository policy ---------------------------------------------------------------------


def test_policy_refuses_every_request_naming_the_repository_even_cached(
    fake: AuthUpstream, tmp_path: Path,
) -> None:
    evil = fake.add_image("team/evil", "1", [b"evil layer " * 50])
    good = fake.add_image("team/app", "1", [b"good layer " * 50])
    fake.add_image("other/thing", "1", [b"other"])

    async def main() -> None:
        async with running(settings(tmp_path, Upstream("fake", fake.url))) as mirror:
            for user in (None, "alice"):  # cached, and linked for both callers
                assert (await pull(mirror, user, "team/evil", "1")).status_code == 200
        rules = Upstream("fake", fake.url, allow=("team/**",), deny=("team/evil*",))
        async with running(settings(tmp_path, rules)) as mirror:
            seen = len(fake.seen)
            rule = "deny = 'team/evil*'"
            for user in (None, "alice"):
                caller = mirror.caller(user)
                base = "/v2/team/evil"
                for method, path in [
                    ("GET", f"{base}/manifests/1"), ("HEAD", f"{base}/manifests/1"),
                    ("GET", f"{base}/manifests/{evil.digest}"),
                    ("GET", f"{base}/blobs/{evil.layers[0]}"),
                    ("HEAD", f"{base}/blobs/{evil.config}"),
                    ("GET", f"{base}/tags/list"),
                    ("GET", f"{base}/referrers/{evil.digest}"),
                    ("POST", f"{base}/blobs/uploads/"),
                    ("PUT", f"{base}/manifests/2"),
                    ("DELETE", f"{base}/manifests/{evil.digest}"),
                    ("DELETE", f"{base}/blobs/{evil.layers[0]}"),
                    ("GET", "/v2/fake/team/evil/manifests/1"),  # by prefix too
                ]:
                    response = await caller.request(method, path, content=b"{}" if method in (
                        "PUT", "POST") else None)
                    if method == "HEAD":
                        assert response.status_code == 403, (method, path)
                    else:
                        denied(response, rule)
                denied(await caller.get("/v2/other/thing/manifests/1"), "allow list ('team/**')")
            forwarded = [s.path for s in fake.seen[seen:] if s.path != "/token"]
            assert forwarded == [], "nothing refused reached the upstream (logins do)"
            assert (await pull(mirror, "alice", "team/app", "1")).status_code == 200
            catalog = await mirror.caller("alice").get("/v2/_catalog")
            assert catalog.json()["repositories"] == ["team/app"]
            assert good.repo == "team/app"

    run(main())


# -- the audit log -----------------------------------------------------------------------------


def test_audit_entries_for_pulls_pushes_and_denials(fake: AuthUpstream, tmp_path: Path) -> None:
    image = fake.add_image("team/app", "1", [b"layer " * 100])
    audit = tmp_path / "audit.log"
    rules = Upstream("fake", fake.url, deny=("team/evil",))

    async def main() -> None:
        async with running(settings(tmp_path, rules, audit_log=str(audit))) as mirror:
            assert (await pull(mirror, None, "team/app", "1")).status_code == 200
            assert (await pull(mirror, "alice", "team/app", "1")).status_code == 200
            alice = mirror.caller("alice")
            data = b"pushed layer"
            pushed = await alice.request("POST", "/v2/team/new/blobs/uploads/",
                                         params={"digest": digest_of(data)}, content=data)
            assert pushed.status_code == 201, pushed.text
            put = await alice.request("PUT", "/v2/team/new/manifests/v1", content=image.manifest,
                                      headers={"Content-Type": OCI_MANIFEST})
            assert put.status_code == 201, put.text
            gone = await alice.request("DELETE", f"/v2/team/new/manifests/{image.digest}")
            assert gone.status_code == 202, gone.text
            denied(await mirror.caller("bob").get("/v2/team/evil/manifests/1"), "team/evil")
            denied(await mirror.caller(None).get("/v2/team/evil/blobs/" + image.config),
                   "team/evil")
            # With Basic credentials on the request itself (as some clients send them).
            response = await mirror.http.get(f"/v2/team/app/manifests/{image.digest}",
                                             headers={"Authorization": basic("alice", "alicepw"),
                                                      "Accept": OCI_MANIFEST})
            assert response.status_code == 200

    run(main())
    text = audit.read_text()
    assert "alicepw" not in text and "Bearer" not in text and "Basic" not in text
    entries = [json.loads(line) for line in text.splitlines()]
    fields = {"time", "client", "user", "action", "upstream", "repository", "reference",
              "digest", "cache", "status", "bytes"}
    assert all(set(e) == fields for e in entries)

    def find(**want: Any) -> list[dict[str, Any]]:
        return [e for e in entries if all(e[k] == v for k, v in want.items())]

    # Anonymous pull: the manifest by tag, from the upstream (miss), then its blobs.
    [anon] = find(user="anonymous", action="pull-manifest", status=200, reference="1")
    assert anon["digest"] == image.digest and anon["cache"] == "miss"
    assert anon["upstream"] == "fake" and anon["repository"] == "team/app"
    assert anon["bytes"] == len(image.manifest)
    assert {e["reference"] for e in find(user="anonymous", action="pull-blob", status=200)} \
        == set(image.blobs)
    # Alice's pull of the same: from the cache.
    [hers] = find(user="alice", action="pull-manifest", status=200, reference="1")
    assert hers["cache"] == "hit"
    assert all(e["cache"] == "hit" for e in find(user="alice", action="pull-blob"))
    # Her push and delete.
    [blob] = find(user="alice", action="push-blob", status=201)
    assert blob["repository"] == "team/new" and blob["reference"].startswith("sha256:")
    [manifest] = find(user="alice", action="push-manifest")
    assert manifest["reference"] == "v1" and manifest["digest"] == image.digest
    assert manifest["status"] == 201
    assert find(user="alice", action="delete", status=202, reference=image.digest)
    # The denials: who was refused, though the policy refuses before anyone is asked.
    assert {e["user"] for e in find(action="denied", repository="team/evil")} == \
        {"bob", "anonymous"}
    assert find(user="alice", action="pull-manifest", reference=image.digest, status=200)


# -- the admin API -----------------------------------------------------------------------------


def admin(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_api(fake: AuthUpstream, tmp_path: Path) -> None:
    image = fake.add_image("team/app", "1", [b"layer " * 100])
    upstream = Upstream("fake", fake.url)

    async def main() -> None:
        async with running(settings(tmp_path, upstream)) as mirror:  # no token: no API
            assert (await mirror.http.get("/admin/stats", headers=admin())).status_code == 404
        async with running(settings(tmp_path, upstream, admin_token=TOKEN,
                                    tag_ttl=3600)) as mirror:
            http = mirror.http
            for headers in ({}, admin("wrong"), {"Authorization": f"Basic {TOKEN}"}):
                refused = await http.get("/admin/stats", headers=headers)
                assert refused.status_code == 401
                assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
                assert "mirror-admin" in refused.headers["www-authenticate"]
            assert (await pull(mirror, None, "team/app", "1")).status_code == 200
            ref = {"ref": "fake/team/app:1"}
            pinned = await http.post("/admin/pin", headers=admin(), json=ref)
            assert pinned.json() == {"ref": "fake/team/app:1", "pinned": 3}, pinned.text
            metadata = mirror.app.state.services.metadata
            assert all([await metadata.pinned(d) for d in (image.digest, *image.blobs)])
            unpinned = await http.post("/admin/unpin", headers=admin(), json=ref)
            assert unpinned.json()["unpinned"] == 3
            assert not await metadata.pinned(image.digest)
            again = await http.post("/admin/unpin", headers=admin(), json=ref)
            assert again.status_code == 404
            # Refresh: the tag moved upstream; the cache (tag_ttl 3600) would not notice.
            moved = fake.add_image("team/app", "1", [b"new layer " * 100])
            assert (await pull(mirror, None, "team/app", "1")).headers[
                "docker-content-digest"] == image.digest
            refreshed = await http.post("/admin/refresh", headers=admin(), json=ref)
            assert refreshed.json() == {"ref": "fake/team/app:1", "dropped": [image.digest]}
            assert (await pull(mirror, None, "team/app", "1")).headers[
                "docker-content-digest"] == moved.digest
            stats = (await http.get("/admin/stats", headers=admin())).json()
            assert stats["content"]["entries"] >= 5 and stats["content"]["bytes"] > 0
            assert stats["lookups"]["blob"]["miss"] >= 3 and "hit" in stats["lookups"]["tag"]
            assert stats["fills_in_progress"] == 0 and stats["ratelimits"] == {"fake": {
                "limit": 0, "remaining": 0}}
            forgotten = await http.request("DELETE", "/admin/cache", headers=admin(), json=ref)
            assert forgotten.json()["removed"] == 3, forgotten.text
            for body, status, code in [
                    (b"not json", 400, "UNSUPPORTED"), (b'{"ref": 3}', 400, "UNSUPPORTED"),
                    (b'{"ref": "Bad Name"}', 400, "NAME_INVALID"),
                    (b'{"ref": "fake/team/none:1"}', 404, "MANIFEST_UNKNOWN")]:
                answer = await http.post("/admin/pin", headers=admin(), content=body)
                assert answer.status_code == status, (body, answer.text)
                assert answer.json()["errors"][0]["code"] == code
            digest_ref = {"ref": f"fake/team/app@{moved.digest}"}
            answer = await http.post("/admin/refresh", headers=admin(), json=digest_ref)
            assert answer.status_code == 400

    run(main())


# -- tags deleted upstream ---------------------------------------------------------------------


@pytest.mark.parametrize("serve_deleted", [True, False])
def test_deleted_tags_are_served_only_when_enabled(
    fake: AuthUpstream, tmp_path: Path, serve_deleted: bool,
) -> None:
    image = fake.add_image("team/app", "1", [b"layer " * 100])
    upstream = Upstream("fake", fake.url, serve_deleted=serve_deleted)

    async def main() -> None:
        # tag_ttl 0: every pull asks the upstream; access_ttl 0: every pull proves access
        # again (the 404 then comes to a caller with an expired grant).
        for access_ttl in (60.0, 0.0):
            async with running(settings(tmp_path, upstream, tag_ttl=0,
                                        access_ttl=access_ttl)) as mirror:
                fake.repo("team/app").tags["1"] = image.digest
                assert (await pull(mirror, None, "team/app", "1")).status_code == 200
                del fake.repos["team/app"].tags["1"]  # deleted upstream
                again = await pull(mirror, None, "team/app", "1")
                if serve_deleted:
                    assert again.status_code == 200
                    assert again.headers["docker-content-digest"] == image.digest
                    assert again.headers["warning"] == DELETED_WARNING
                else:
                    assert again.status_code == 404
                    assert "warning" not in again.headers
                metrics = mirror.app.state.metrics
                [(_, count)] = [(labels, value) for labels, value in
                                metrics.samples("mirror_cache_lookups_total")
                                if labels == {"kind": "tag", "result": "deleted"}]
                assert count == (1 if serve_deleted else 0)
                # Someone who never proved access gets nothing from the cache.
                assert (await mirror.caller("bob").get(
                    "/v2/team/app/manifests/1")).status_code == 404

    run(main())


# -- the rate-limit reserve --------------------------------------------------------------------


def add_image(fake: FakeUpstream, tag: str, layer: bytes) -> str:
    config = json.dumps({"os": "linux", "architecture": "amd64", "tag": tag}).encode()
    blobs = [fake.add_blob(config), fake.add_blob(layer)]
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blobs[0], "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": blobs[1], "size": len(layer)}],
    }).encode()
    digest = digest_of(manifest)
    fake.manifests[tag] = fake.manifests[digest] = (OCI_MANIFEST, manifest)
    return digest


def test_below_the_reserve_cached_tags_are_not_revalidated(tmp_path: Path) -> None:
    with FakeUpstream(ratelimit=(100, 50)) as fake:
        first = add_image(fake, "a", b"layer a")
        add_image(fake, "b", b"layer b")

        async def main() -> None:
            async with running(settings(tmp_path, Upstream("fake", fake.url),
                                        tag_ttl=0)) as mirror:
                metrics = mirror.app.state.metrics

                def gauge(name: str) -> float:
                    return dict((lbl["upstream"], v) for lbl, v in metrics.samples(
                        f"mirror_upstream_ratelimit_{name}"))["fake"]

                assert gauge("limit") == 0  # exported before any upstream answer
                assert (await pull(mirror, None, "owner/img", "a")).status_code == 200
                assert (gauge("limit"), gauge("remaining")) == (100, 49)  # one GET spent
                fake.ratelimit = (100, 5)  # someone else spent it
                revalidated = await pull(mirror, None, "owner/img", "a")
                assert "warning" not in revalidated.headers
                assert gauge("remaining") == 5
                heads = fake.count("HEAD", "/manifests/a")
                served = await pull(mirror, None, "owner/img", "a")
                assert served.status_code == 200
                assert served.headers["docker-content-digest"] == first
                assert served.headers["warning"] == RESERVE_WARNING
                assert fake.count("HEAD", "/manifests/a") == heads, "no revalidation"
                # What the cache lacks is still fetched (and shows the budget again).
                assert (await pull(mirror, None, "owner/img", "b")).status_code == 200
                assert fake.count("GET", "/manifests/sha256:") >= 2
                fake.ratelimit = (100, 80)
                add_image(fake, "c", b"layer c")
                assert (await pull(mirror, None, "owner/img", "c")).status_code == 200
                assert gauge("remaining") == 79
                fresh = await pull(mirror, None, "owner/img", "a")
                assert "warning" not in fresh.headers
                assert fake.count("HEAD", "/manifests/a") > heads

        run(main())
