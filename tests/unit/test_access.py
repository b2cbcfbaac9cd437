"""The access model (`mirror.access`), in process: the mirror app against a token-auth upstream
on loopback. Each attack found against the previous release has a test here, named after it,
that gave the attacker bytes or credentials before the model was rebuilt."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.authfake import AuthUpstream, Image, digest_of
from support.inproc import Mirror, basic, running

from mirror.settings import Settings, Upstream

SECRET = "private/secret"


@pytest.fixture
def fake() -> Iterator[AuthUpstream]:
    with AuthUpstream() as upstream:
        yield upstream


def settings(tmp_path: Path, *upstreams: Upstream, **extra: object) -> Settings:
    values: dict[str, object] = {"cache_dir": tmp_path / "cache", "scrub_rate": 0,
                                 "upstreams": upstreams, **extra}
    return Settings(**values)  # type: ignore[arg-type]


def secret_image(fake: AuthUpstream) -> Image:
    return fake.add_image(SECRET, "1.0", [b"secret layer " * 100], private=True,
                          readers={"alice"})


async def pull(mirror: Mirror, user: str | None, repo: str, tag: str,
               service: str | None = None) -> dict[str, int]:
    """Pull an image as a client would; returns the status of each request by its digest."""
    caller = mirror.caller(user, service)
    prefix = f"/v2/{repo}"
    manifest = await caller.get(f"{prefix}/manifests/{tag}")
    statuses = {"manifest": manifest.status_code}
    if manifest.status_code == 200:
        doc = json.loads(manifest.content)
        for desc in [doc["config"], *doc["layers"]]:
            blob = await caller.get(f"{prefix}/blobs/{desc['digest']}")
            statuses[desc["digest"]] = blob.status_code
            if blob.status_code == 200:
                assert digest_of(blob.content) == desc["digest"]
    return statuses


def leaked(response_bytes: bytes, image: Image, fake: AuthUpstream) -> bool:
    """Whether a body holds any of the image's private bytes."""
    secrets = [image.manifest, *(fake.blobs[d] for d in image.blobs)]
    return any(s and s in response_bytes for s in secrets)


async def fish(mirror: Mirror, user: str | None, image: Image, fake: AuthUpstream,
               names: list[str]) -> None:
    """Ask for every digest of `image` under each name: no private byte may come back."""
    caller = mirror.caller(user)
    for name in names:
        for digest in [image.digest, *image.blobs]:
            kind = "manifests" if digest == image.digest else "blobs"
            response = await caller.get(f"/v2/{name}/{kind}/{digest}")
            assert response.status_code != 200 or not leaked(response.content, image, fake), (
                user, name, digest)
        response = await caller.get(f"/v2/{name}/manifests/{image.tag}")
        assert response.status_code != 200 or not leaked(response.content, image, fake)


# -- 1. a 404 seen by an authorized caller opens the repository to everyone ----------------


def test_a_404_never_grants_access(fake: AuthUpstream, tmp_path: Path) -> None:
    image = secret_image(fake)
    fake.add_image(SECRET, "2.0", [b"never pulled " * 100], private=True, readers={"alice"})
    upstream = Upstream("fake", fake.url, username="alice", password="alicepw")

    async def scenario() -> None:
        async with running(settings(tmp_path, upstream, negative_ttl=60)) as mirror:
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            alice, anonymous = mirror.caller("alice"), mirror.caller()
            assert (await alice.get(f"/v2/{SECRET}/manifests/latest")).status_code == 404
            # The cached 404 is not proof for anyone else, nor is the upstream's 404.
            missing = await anonymous.get(f"/v2/{SECRET}/manifests/latest")
            assert missing.status_code == 401
            assert (await pull(mirror, None, SECRET, "1.0"))["manifest"] == 401
            # With the mirror's own account configured, still nothing never pulled.
            assert (await pull(mirror, None, SECRET, "2.0"))["manifest"] == 401
            await fish(mirror, None, image, fake, [SECRET, "public/any"])
            fake.down = True  # and the public flag that was never set is not honoured now
            await fish(mirror, None, image, fake, [SECRET])
            granted = await mirror.app.state.services.metadata.granted("fake", SECRET,
                                                                        "anonymous")
            assert granted is None

    asyncio.run(scenario())


# -- 2. a pushed manifest attaching any cached digest to the pusher's repository ------------


def test_a_pushed_manifest_links_nothing(fake: AuthUpstream, tmp_path: Path) -> None:
    image = secret_image(fake)
    with AuthUpstream(service="open") as open_upstream:
        open_upstream.no_auth = True
        upstreams = (Upstream("fake", fake.url), Upstream("open", open_upstream.url,
                                                          client_credentials=True))

        async def scenario() -> None:
            async with running(settings(tmp_path, *upstreams)) as mirror:
                await pull(mirror, "alice", SECRET, "1.0")
                layer = image.layers[0]
                # Registries validate config and layers on push; unknown fields they ignore.
                config = {"mediaType": "application/vnd.oci.image.config.v1+json",
                          "digest": digest_of(b"{}"), "size": 2}
                attack = json.dumps({"schemaVersion": 2, "mediaType":
                                     "application/vnd.oci.image.manifest.v1+json",
                                     "config": config, "layers": [],
                                     "blobs": [{"digest": layer}]}).encode()
                for service, name in (("fake", "redteam/pl"), ("open", "open/redteam/pl")):
                    bob = mirror.caller("bob", service)
                    if service == "open":  # made-up credentials: the upstream takes anything
                        bob.tokens["open"] = (await mirror.http.get(
                            "/token", params={"service": "open"},
                            headers={"Authorization": basic("eve", "made-up")})).json()["token"]
                    pushed = await bob.request(
                        "PUT", f"/v2/{name}/manifests/1", content=attack,
                        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
                    assert pushed.status_code == 201, pushed.text
                    for reader in (None, "bob"):
                        caller = mirror.caller(reader, service)
                        got = await caller.get(f"/v2/{name}/manifests/1")
                        assert got.status_code == 200 and got.content == attack
                        blob = await caller.get(f"/v2/{name}/blobs/{layer}")
                        assert blob.status_code != 200 and not leaked(blob.content, image, fake)

        asyncio.run(scenario())


# -- 3. offline serves private content under any name ---------------------------------------


def test_offline_keeps_private_content_private(fake: AuthUpstream, tmp_path: Path) -> None:
    image = secret_image(fake)
    fake.add_image("public/app", "1", [b"public layer " * 100])
    upstream = Upstream("fake", fake.url)

    async def scenario() -> None:
        async with running(settings(tmp_path, upstream)) as mirror:
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            assert set((await pull(mirror, None, "public/app", "1")).values()) == {200}
        fake.down = True
        async with running(settings(tmp_path, upstream, offline=True)) as mirror:
            await fish(mirror, None, image, fake, [SECRET, "public/app", "other/name"])
            await fish(mirror, "bob", image, fake, [SECRET, "public/app"])
            # Who proved access before still reads it (a token minted offline names them).
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            assert set((await pull(mirror, None, "public/app", "1")).values()) == {200}
            # A wrong password is another identity: nothing.
            await fish(mirror, "mallory", image, fake, [SECRET])

    asyncio.run(scenario())


# -- 4. a CDN answering 401 takes over the token realm ---------------------------------------


def test_a_redirect_target_never_changes_the_realm(fake: AuthUpstream, tmp_path: Path) -> None:
    fake.add_image("public/app", "1", [b"public layer " * 100])
    fake.cdn_challenges = True

    async def scenario() -> None:
        async with running(settings(tmp_path, Upstream("fake", fake.url))) as mirror:
            statuses = await pull(mirror, None, "public/app", "1")
            assert statuses["manifest"] == 200 and 200 not in list(statuses.values())[1:]
            # The next logins still go to the upstream's own realm, never to the CDN's.
            fake.seen.clear()
            assert set((await pull(mirror, "alice", "public/app", "1")).values()) & {200}
            assert not [s for s in fake.seen if s.path == "/cdn-realm"]
            logins = [s for s in fake.seen if s.path == "/token" and s.authorization]
            assert logins and all(s.authorization.startswith("Basic") for s in logins)
            client = mirror.app.state.clients["fake"]
            assert client.challenge is not None and client.challenge.realm == f"{fake.url}/token"

    asyncio.run(scenario())


# -- 5. one upstream vouching for another's content ------------------------------------------


def test_an_upstream_cannot_vouch_for_another_upstreams_content(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = secret_image(fake)
    with AuthUpstream(service="evil") as evil:
        evil.no_auth = True
        evil.head_any_blob = True  # "yes, I have every blob"
        upstreams = (Upstream("fake", fake.url), Upstream("evil", evil.url))

        async def scenario() -> None:
            async with running(settings(tmp_path, *upstreams)) as mirror:
                await pull(mirror, "alice", SECRET, "1.0")
                await fish(mirror, None, image, fake, ["evil/evil/x", "evil/anything"])
                # What evil really holds it may serve: its own bytes, fetched from it.
                evil.put_manifest("evil/x", "1", image.manifest)
                got = await mirror.caller().get(f"/v2/evil/evil/x/manifests/{image.digest}")
                assert got.status_code == 200
                assert evil.count("GET", f"/manifests/{image.digest}") == 1

        asyncio.run(scenario())


# -- 6. tag_ttl stretching anonymous access ---------------------------------------------------


def test_anonymous_access_lasts_access_ttl_not_tag_ttl(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = fake.add_image("team/app", "1", [b"soon private " * 100])

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url), tag_ttl=300, access_ttl=0.5)
        async with running(config) as mirror:
            assert set((await pull(mirror, None, "team/app", "1")).values()) == {200}
            fake.repos["team/app"].private = True
            await asyncio.sleep(0.6)  # past access_ttl (injected), far within tag_ttl
            assert (await pull(mirror, None, "team/app", "1"))["manifest"] == 401
            await fish(mirror, None, image, fake, ["team/app"])

    asyncio.run(scenario())


# -- 7. credentials not bound to one upstream -----------------------------------------------


def test_credentials_and_tokens_are_bound_to_one_upstream(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    fake.add_image("public/app", "1", [b"layer " * 100])
    with AuthUpstream(service="other") as other:
        other.add_image("public/app", "1", [b"other layer " * 100])
        upstreams = (Upstream("fake", fake.url), Upstream("other", other.url))

        async def scenario() -> None:
            async with running(settings(tmp_path, *upstreams)) as mirror:
                # alice's password goes nowhere but the default upstream.
                refused = await mirror.http.get("/token", params={"service": "other"},
                                                headers={"Authorization": basic("alice",
                                                                                "alicepw")})
                assert refused.status_code == 401
                assert not [s for s in other.seen if s.authorization.startswith("Basic")]
                # A token for one upstream is not forwarded to another.
                alice = mirror.caller("alice")
                token = await alice.login()
                response = await mirror.http.get(
                    "/v2/other/public/app/manifests/1",
                    headers={"Authorization": f"Bearer {token}"})
                assert response.status_code == 401
                assert "other" in response.headers["www-authenticate"]
                assert not [s for s in other.seen if "t-alice" in s.authorization]
                # A token the mirror did not mint is not forwarded either.
                raw = await mirror.http.get("/v2/public/app/manifests/1",
                                            headers={"Authorization": "Bearer t-alice-0"})
                assert raw.status_code == 401
                # Basic credentials sent straight to another upstream are not used there.
                direct = await mirror.http.get("/v2/other/public/app/manifests/1",
                                               headers={"Authorization": basic("alice",
                                                                               "alicepw")})
                assert direct.status_code == 401
                assert not [s for s in other.seen if s.authorization.startswith("Basic")]

        asyncio.run(scenario())


# -- the rules, one by one -------------------------------------------------------------------


def test_only_descriptors_registries_validate_are_linked() -> None:
    """Rule 2: config and layers of an image manifest, manifests of an index; not foreign
    layers, unknown fields, `subject`, artifact `blobs`, nor a document that contradicts its
    own media type."""
    from mirror.access import linked_descriptors

    image = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": "sha256:" + "c" * 64},
        "layers": [{"digest": "sha256:" + "1" * 64},
                   {"digest": "sha256:" + "2" * 64, "urls": ["https://cdn.example/x"]},
                   {"digest": "sha256:" + "3" * 64, "mediaType":
                    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}],
        "blobs": [{"digest": "sha256:" + "4" * 64}],
        "subject": {"digest": "sha256:" + "5" * 64}}).encode()
    assert linked_descriptors(image, "application/vnd.oci.image.manifest.v1+json") == [
        "sha256:" + "c" * 64, "sha256:" + "1" * 64]
    index = json.dumps({"mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"digest": "sha256:" + "6" * 64}],
                        "layers": [{"digest": "sha256:" + "7" * 64}]}).encode()
    assert linked_descriptors(index, "application/vnd.oci.image.index.v1+json") == [
        "sha256:" + "6" * 64]
    # Served as an index but saying it is an image manifest: nothing.
    assert linked_descriptors(image, "application/vnd.oci.image.index.v1+json") == []
    artifact = json.dumps({"blobs": [{"digest": "sha256:" + "8" * 64}]}).encode()
    assert linked_descriptors(artifact, "application/vnd.oci.artifact.manifest.v1+json") == []
    assert linked_descriptors(b"not json", "application/vnd.oci.image.manifest.v1+json") == []


def test_a_token_minted_offline_is_refused_online(fake: AuthUpstream, tmp_path: Path) -> None:
    """Rule 6: a token minted offline names an identity, not an upstream token: online it
    proves nothing, and the caller must log in again."""
    fake.add_image("public/app", "1", [b"layer " * 100])
    upstream = Upstream("fake", fake.url)

    async def scenario() -> None:
        async with running(settings(tmp_path, upstream, offline=True)) as mirror:
            token = await mirror.caller("alice").login()
        async with running(settings(tmp_path, upstream)) as mirror:
            response = await mirror.http.get("/v2/public/app/manifests/1",
                                             headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 401
            assert "log in again" in response.json()["errors"][0]["message"]

    asyncio.run(scenario())


def test_a_minted_token_cannot_be_altered(fake: AuthUpstream, tmp_path: Path) -> None:
    """Rule 6: the identity and the upstream a token names are under a MAC."""
    import base64 as b64

    fake.add_image("public/app", "1", [b"layer " * 100])

    async def scenario() -> None:
        async with running(settings(tmp_path, Upstream("fake", fake.url))) as mirror:
            token = await mirror.caller("alice").login()
            assert token is not None
            prefix, payload, mac = token.split(".")[0], token.split(".")[1], \
                token.split(".")[-1]
            doc = json.loads(b64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            doc["i"] = "b:" + "0" * 40  # someone else's identity
            forged = b64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")
            response = await mirror.http.get(
                "/v2/public/app/manifests/1",
                headers={"Authorization": f"Bearer {prefix}.{forged}.{mac}"})
            assert response.status_code == 401

    asyncio.run(scenario())


# -- 8. the cache browser showing another upstream's content under a lying upstream's name ---


def test_the_cache_browser_shows_only_content_its_upstream_delivered(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    """Rule 1 holds for the pages too: an upstream that claims (a tag's HEAD, a descriptor of
    a manifest it serves) a digest it never delivered shows nothing of another upstream's
    cached bytes: no annotation, no config label, no layer."""
    title = "TOP SECRET TITLE"
    image = fake.add_image(SECRET, "1.0", [b"secret layer " * 100], private=True,
                           readers={"alice"},
                           extra={"annotations": {"org.opencontainers.image.title": title}})
    with AuthUpstream(service="evil") as evil:
        evil.no_auth = True
        # A tag whose HEAD names the private manifest; evil never has its bytes.
        evil.repo("evil/x").tags["1"] = image.digest
        evil.repo("evil/x").content.add(image.digest)
        evil.manifests[image.digest] = ("application/vnd.oci.image.manifest.v1+json", b"{}")
        # A manifest evil really serves, whose config and layers are the private ones.
        wrapper = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": image.config, "size": len(fake.blobs[image.config])},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": image.layers[0],
                        "size": len(fake.blobs[image.layers[0]])}]}).encode()
        evil.put_manifest("evil/y", "1", wrapper)
        upstreams = (Upstream("fake", fake.url), Upstream("evil", evil.url))

        async def scenario() -> None:
            async with running(settings(tmp_path, *upstreams)) as mirror:
                assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
                anonymous = mirror.caller(None, "evil")
                assert (await anonymous.request(
                    "HEAD", "/v2/evil/evil/x/manifests/1")).status_code == 200
                assert (await anonymous.get("/v2/evil/evil/y/manifests/1")).status_code == 200
                pages = ["/ui/evil/evil/x", "/ui/evil/evil/x:1",
                         f"/ui/evil/evil/x@{image.digest}", "/ui/evil/evil/y",
                         "/ui/evil/evil/y:1"]
                for path in pages:
                    page = await mirror.http.get(path)
                    assert title not in page.text, path
                    assert "linux/amd64" not in page.text, path  # the private config's
                    assert image.config not in page.text or path.endswith("y:1"), path

        asyncio.run(scenario())


# -- 9. a media type learnt elsewhere turning a manifest's unvalidated field into links ------


def test_a_media_type_from_elsewhere_links_nothing_unvalidated(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    """Rule 2: a document without a `mediaType` of its own is linked by the type its bytes
    were served with, which the cache keeps once per digest, whoever delivered or pushed
    them last. A document that has fields of two kinds (an image's config and layers and
    an index's manifests) links only what every reading validates: nothing beyond itself."""
    image = secret_image(fake)
    with AuthUpstream(service="open") as open_upstream:
        open_upstream.no_auth = True
        upstreams = (Upstream("fake", fake.url), Upstream("open", open_upstream.url,
                                                          client_credentials=True))
        config = b'{"architecture":"amd64","os":"linux"}'
        fake.add_blob("bob/pub", config)
        # No mediaType: as an image manifest (how bob pushes it to fake, which validates
        # config and layers) the `manifests` field is unknown and unvalidated.
        ambiguous = json.dumps({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digest_of(config), "size": len(config)},
            "layers": [],
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": image.digest, "size": len(image.manifest)}]}).encode()

        async def scenario() -> None:
            async with running(settings(tmp_path, *upstreams)) as mirror:
                assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
                bob = mirror.caller("bob")
                pushed = await bob.request(
                    "PUT", "/v2/bob/pub/manifests/1", content=ambiguous,
                    headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
                assert pushed.status_code == 201, pushed.text
                # The same bytes pushed to an upstream that takes anything, as an index.
                eve = mirror.caller("bob", "open")  # made-up credentials: it takes anything
                eve.tokens["open"] = (await mirror.http.get(
                    "/token", params={"service": "open"},
                    headers={"Authorization": basic("eve", "made-up")})).json()["token"]
                again = await eve.request(
                    "PUT", "/v2/open/eve/z/manifests/1", content=ambiguous,
                    headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
                assert again.status_code == 201, again.text
                anonymous = mirror.caller()
                got = await anonymous.get("/v2/bob/pub/manifests/1")
                assert got.status_code == 200 and got.content == ambiguous
                stolen = await anonymous.get(f"/v2/bob/pub/manifests/{image.digest}")
                assert stolen.status_code != 200 and not leaked(stolen.content, image, fake)
                await fish(mirror, None, image, fake, ["bob/pub"])

        asyncio.run(scenario())


def test_a_document_of_two_kinds_links_nothing_without_its_own_media_type() -> None:
    from mirror.access import linked_descriptors

    config, layer, child = ("sha256:" + c * 64 for c in "c1d")
    both = json.dumps({"config": {"digest": config}, "layers": [{"digest": layer}],
                       "manifests": [{"digest": child}]}).encode()
    for media_type in ("application/vnd.oci.image.manifest.v1+json",
                       "application/vnd.oci.image.index.v1+json",
                       "application/vnd.docker.distribution.manifest.v1+json"):
        assert linked_descriptors(both, media_type) == [], media_type
    schema1 = json.dumps({"schemaVersion": 1, "fsLayers": [{"blobSum": layer}],
                          "layers": [{"digest": child}]}).encode()
    assert linked_descriptors(
        schema1, "application/vnd.docker.distribution.manifest.v1+prettyjws") == []
    # One kind only, without a mediaType of its own: linked as before.
    image = json.dumps({"config": {"digest": config}, "layers": [{"digest": layer}]}).encode()
    assert linked_descriptors(image, "application/vnd.oci.image.manifest.v1+json") == [
        config, layer]
    index = json.dumps({"manifests": [{"digest": child}]}).encode()
    assert linked_descriptors(index, "application/vnd.oci.image.index.v1+json") == [child]


def test_another_upstream_cannot_change_the_media_type_a_manifest_is_served_with(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    """The media type kept per digest is the document's own when it names one, and else
    the first one learnt: a push of the same bytes elsewhere under another type does not
    change what the upstream's callers get (a client refuses a manifest of the wrong type)."""
    image = fake.add_image("public/app", "1", [b"public layer " * 100])
    untyped = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    fake.put_manifest("public/app", "2", untyped, "application/vnd.oci.image.index.v1+json")
    with AuthUpstream(service="open") as open_upstream:
        open_upstream.no_auth = True
        upstreams = (Upstream("fake", fake.url), Upstream("open", open_upstream.url,
                                                          client_credentials=True))

        async def scenario() -> None:
            async with running(settings(tmp_path, *upstreams)) as mirror:
                anonymous = mirror.caller()
                for tag in ("1", "2"):
                    assert (await anonymous.get(f"/v2/public/app/manifests/{tag}")
                            ).status_code == 200
                eve = mirror.caller("bob", "open")  # made-up credentials: it takes anything
                eve.tokens["open"] = (await mirror.http.get(
                    "/token", params={"service": "open"},
                    headers={"Authorization": basic("eve", "made-up")})).json()["token"]
                for data in (image.manifest, untyped):
                    pushed = await eve.request(
                        "PUT", "/v2/open/eve/z/manifests/1", content=data,
                        headers={"Content-Type": "application/vnd.docker.container.image.v1+json"})
                    assert pushed.status_code == 201, pushed.text
                for tag, media_type in (("1", "application/vnd.oci.image.manifest.v1+json"),
                                        ("2", "application/vnd.oci.image.index.v1+json")):
                    got = await anonymous.get(f"/v2/public/app/manifests/{tag}")
                    assert got.status_code == 200
                    assert got.headers["content-type"] == media_type, tag

        asyncio.run(scenario())
def test_concurrent_probes_are_shared_only_by_one_credential(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = secret_image(fake)
    layer = image.layers[0]
    path = f"/v2/{SECRET}/blobs/{layer}"

    async def scenario() -> None:
        async with running(settings(tmp_path, Upstream("fake", fake.url))) as mirror:
            alice, bob = mirror.caller("alice"), mirror.caller("bob")
            await alice.login()
            await bob.login()
            got = await asyncio.gather(*(alice.get(path) for _ in range(4)),
                                       *(bob.get(path) for _ in range(3)))
            assert [r.status_code for r in got[:4]] == [200] * 4
            assert all(r.status_code in (401, 403) for r in got[4:])
            assert not any(leaked(r.content, image, fake) for r in got[4:])
            heads = [s for s in fake.seen if s.method == "HEAD" and layer in s.path]
            assert len([s for s in heads if s.user == "alice"]) == 1  # one probe for four
            assert len([s for s in heads if s.user == "bob"]) == 1  # bob's own, not alice's

    asyncio.run(scenario())


def test_concurrent_probes_are_not_shared_across_upstreams(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = secret_image(fake)
    layer = image.layers[0]
    with AuthUpstream(service="evil") as evil:
        evil.no_auth = True
        evil.head_any_blob = True  # "yes" to every HEAD, for anyone
        upstreams = (Upstream("fake", fake.url), Upstream("evil", evil.url))

        async def scenario() -> None:
            async with running(settings(tmp_path, *upstreams)) as mirror:
                assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
                anonymous = mirror.caller()
                # The same repository, digest and (anonymous) identity on both upstreams,
                # at once: evil's "yes" is evil's alone.
                for _ in range(3):
                    got = await asyncio.gather(
                        *(anonymous.get(f"/v2/evil/{SECRET}/blobs/{layer}") for _ in range(3)),
                        *(anonymous.get(f"/v2/{SECRET}/blobs/{layer}") for _ in range(3)))
                    assert all(r.status_code in (401, 403) for r in got[3:])
                    assert not any(leaked(r.content, image, fake) for r in got)
                heads = [s for s in fake.seen if s.method == "HEAD" and layer in s.path]
                assert heads and all(s.user is None for s in heads)

        asyncio.run(scenario())


def test_equal_accept_sets_never_share_a_tag_resolution_with_an_unproven_caller(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = secret_image(fake)
    accept = ("application/vnd.oci.image.manifest.v1+json, "
              "application/vnd.docker.distribution.manifest.v2+json")
    variants = [accept, ", ".join(reversed(accept.split(", "))), accept.upper(),
                "application/vnd.oci.image.manifest.v1+json;q=0.9, "
                "application/vnd.docker.distribution.manifest.v2+json; q=0.5"]

    async def scenario() -> None:
        async with running(settings(tmp_path, Upstream("fake", fake.url), tag_ttl=300,
                                    negative_ttl=60)) as mirror:
            alice = mirror.caller("alice")
            for header in variants:  # one Accept key, one cached resolution, for alice
                got = await alice.get(f"/v2/{SECRET}/manifests/1.0",
                                      headers={"Accept": header})
                assert got.status_code == 200 and got.content == image.manifest
            for user in (None, "bob"):
                caller = mirror.caller(user)
                for header in variants:
                    for method in ("GET", "HEAD"):
                        got = await caller.request(method, f"/v2/{SECRET}/manifests/1.0",
                                                   headers={"Accept": header})
                        assert got.status_code in (401, 403), (user, header, method)
                        assert image.digest not in got.headers.get("docker-content-digest",
                                                                   "")
                        assert not leaked(got.content, image, fake)
            # A refusal cached for others is not alice's answer either.
            got = await alice.get(f"/v2/{SECRET}/manifests/1.0", headers={"Accept": accept})
            assert got.status_code == 200 and got.content == image.manifest

    asyncio.run(scenario())


def test_an_expired_grant_reads_no_cached_digest_once_access_is_lost(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = secret_image(fake)

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url), tag_ttl=300, access_ttl=0.5)
        async with running(config) as mirror:
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            # Granted, linked and held: all three facts are there, the grant is stale.
            fake.repos[SECRET].readers.discard("alice")
            await asyncio.sleep(0.6)
            await fish(mirror, "alice", image, fake, [SECRET])
            assert await _identities(mirror, SECRET) == []  # the refusal revoked it

    asyncio.run(scenario())


async def _identities(mirror: Mirror, repo: str) -> list[str]:
    """The identities holding a grant for `repo`."""
    db = mirror.app.state.services.metadata.db
    return [row[0] for row in db.execute("SELECT identity FROM grants WHERE repo = ?",
                                         (repo,)).fetchall()]


def test_an_outage_serves_a_digest_only_under_the_repository_it_is_linked_to(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = secret_image(fake)
    fake.add_image("public/app", "1", [b"public layer " * 100])

    async def scenario() -> None:
        async with running(settings(tmp_path, Upstream("fake", fake.url))) as mirror:
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            assert set((await pull(mirror, None, "public/app", "1")).values()) == {200}
            assert set((await pull(mirror, "bob", "public/app", "1")).values()) == {200}
            fake.down = True  # online, but the upstream cannot answer: old grants count
            await fish(mirror, None, image, fake, ["public/app", SECRET])
            await fish(mirror, "bob", image, fake, ["public/app", SECRET])
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}

    asyncio.run(scenario())


# -- what a worker read lately (rule 3, `access_recheck`) ------------------------------------


def test_a_refusal_ends_access_at_once_in_its_worker_and_soon_in_the_others(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = secret_image(fake)

    async def scenario() -> None:
        # Two workers over one cache; every tag request asks the upstream (tag_ttl 0).
        config = settings(tmp_path, Upstream("fake", fake.url), tag_ttl=0, access_recheck=0.3)
        async with running(config) as one, running(config) as other:
            for worker in (one, other, one):  # each read alice's grant, links and holdings
                assert set((await pull(worker, "alice", SECRET, "1.0")).values()) == {200}
            fake.repos[SECRET].readers.discard("alice")
            tag = await one.caller("alice").get(f"/v2/{SECRET}/manifests/1.0")
            assert tag.status_code in (401, 403)
            await fish(one, "alice", image, fake, [SECRET])  # at once in that worker
            await asyncio.sleep(0.35)  # past access_recheck (injected)
            await fish(other, "alice", image, fake, [SECRET])  # and then in the other

    asyncio.run(scenario())


def test_what_a_worker_read_lately_never_stretches_a_grant(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = secret_image(fake)

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url), tag_ttl=300, access_ttl=0.5,
                          access_recheck=300)
        async with running(config) as mirror:
            for _ in range(2):  # the second pull reads it all from the cache
                assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            fake.repos[SECRET].readers.discard("alice")
            await asyncio.sleep(0.6)  # past access_ttl, far within access_recheck
            await fish(mirror, "alice", image, fake, [SECRET])

    asyncio.run(scenario())


def test_a_hit_reads_access_facts_once_per_access_recheck(
    fake: AuthUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = secret_image(fake)

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url), access_recheck=300)
        async with running(config) as mirror:
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            metadata = mirror.app.state.services.metadata
            reads: list[tuple[str, ...]] = []
            for name in ("readable", "granted"):
                real = getattr(metadata, name)

                async def counted(*args: str, real: Any = real, name: str = name) -> Any:
                    reads.append((name, *args))
                    return await real(*args)

                monkeypatch.setattr(metadata, name, counted)
            caller = mirror.caller("alice")
            digests = [image.digest, *image.blobs]
            for _ in range(5):
                for digest in digests:
                    kind = "manifests" if digest == image.digest else "blobs"
                    response = await caller.get(f"/v2/{SECRET}/{kind}/{digest}")
                    assert response.status_code == 200
            # Once each, now that all is cached (the pull read them before they were held).
            assert sorted(r[-1] for r in reads) == sorted(digests)
            # Bob, who never proved access, reads the metadata (and is refused) every time.
            for _ in range(2):
                response = await mirror.caller("bob").get(f"/v2/{SECRET}/blobs/{image.blobs[0]}")
                assert response.status_code in (401, 403)
            assert len(reads) == len(digests) + 2

    asyncio.run(scenario())


def _held_up(monkeypatch: pytest.MonkeyPatch, metadata: Any, name: str, when: Any,
             after: bool) -> tuple[asyncio.Event, asyncio.Event]:
    """Make `metadata.<name>` wait, when `when(*args)`, for the second event (set it to go
    on), having set the first: before its work, or `after` it (an answer on its way back, as
    with a store across the network)."""
    real = getattr(metadata, name)
    reached, gate = asyncio.Event(), asyncio.Event()

    async def held(*args: Any) -> Any:
        if not after and when(*args):
            reached.set()
            await gate.wait()
        result = await real(*args)
        if after and when(*args):
            reached.set()
            await gate.wait()
        return result

    monkeypatch.setattr(metadata, name, held)
    return reached, gate


def test_a_read_begun_before_a_refusal_is_not_kept_past_it(
    fake: AuthUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = secret_image(fake)
    layer = image.layers[0]

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url), tag_ttl=0, access_recheck=300)
        async with running(config) as mirror:
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            answered, gate = _held_up(
                monkeypatch, mirror.app.state.services.metadata, "readable",
                lambda *args: args[-1] == layer, after=True)
            alice = mirror.caller("alice")
            await alice.login()
            # A read of the layer: its facts read before the refusal, its answer delayed.
            reading = asyncio.create_task(alice.get(f"/v2/{SECRET}/blobs/{layer}"))
            await answered.wait()
            fake.repos[SECRET].readers.discard("alice")
            assert (await alice.get(f"/v2/{SECRET}/manifests/1.0")).status_code in (401, 403)
            gate.set()
            await reading  # begun before the refusal: it may end as it always could
            # The refusal was seen in this worker: from now on, nothing read before it counts.
            after = await alice.get(f"/v2/{SECRET}/blobs/{layer}")
            assert after.status_code != 200 or not leaked(after.content, image, fake)
            await fish(mirror, "alice", image, fake, [SECRET])

    asyncio.run(scenario())


def test_a_read_while_a_refusal_is_written_is_not_kept_past_it(
    fake: AuthUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = secret_image(fake)
    layer = image.layers[0]

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url), tag_ttl=0, access_recheck=300)
        async with running(config) as mirror:
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            revoking, gate = _held_up(monkeypatch, mirror.app.state.services.metadata,
                                      "revoke", lambda *args: True, after=False)
            alice = mirror.caller("alice")
            await alice.login()
            fake.repos[SECRET].readers.discard("alice")
            refusal = asyncio.create_task(alice.get(f"/v2/{SECRET}/manifests/1.0"))
            await revoking.wait()  # the worker saw the refusal; its revocation is on its way
            await alice.get(f"/v2/{SECRET}/blobs/{layer}")  # reads the grant not yet revoked
            gate.set()
            assert (await refusal).status_code in (401, 403)
            after = await alice.get(f"/v2/{SECRET}/blobs/{layer}")
            assert after.status_code != 200 or not leaked(after.content, image, fake)
            await fish(mirror, "alice", image, fake, [SECRET])

    asyncio.run(scenario())


def test_a_read_while_an_unlink_is_written_is_not_kept_past_it(
    fake: AuthUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = secret_image(fake)
    layer = image.layers[0]

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url), access_recheck=300)
        async with running(config) as mirror:
            assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            unlinking, gate = _held_up(monkeypatch, mirror.app.state.services.metadata,
                                       "unlink", lambda *args: True, after=False)
            alice, bob = mirror.caller("alice"), mirror.caller("bob")
            await alice.login()
            # Bob deletes the layer from the repository upstream; we unlink it from there.
            deleting = asyncio.create_task(bob.request("DELETE",
                                                       f"/v2/{SECRET}/blobs/{layer}"))
            await unlinking.wait()
            await alice.get(f"/v2/{SECRET}/blobs/{layer}")  # reads the link not yet dropped
            gate.set()
            assert (await deleting).status_code == 202
            # Not linked any more, and the upstream says the repository lacks it.
            after = await alice.get(f"/v2/{SECRET}/blobs/{layer}")
            assert after.status_code == 404, after.status_code

    asyncio.run(scenario())


def test_a_slow_read_in_another_worker_is_not_kept_past_access_recheck(
    fake: AuthUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = secret_image(fake)
    layer = image.layers[0]

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url), tag_ttl=0, access_recheck=0.5)
        async with running(config) as one, running(config) as other:
            for worker in (one, other):
                assert set((await pull(worker, "alice", SECRET, "1.0")).values()) == {200}
            await asyncio.sleep(0.55)  # what the other read in its pull has lapsed
            answered, gate = _held_up(
                monkeypatch, other.app.state.services.metadata, "readable",
                lambda *args: args[-1] == layer, after=True)
            alice = other.caller("alice")
            await alice.login()
            reading = asyncio.create_task(alice.get(f"/v2/{SECRET}/blobs/{layer}"))
            await answered.wait()  # read before the refusal, answered slowly
            fake.repos[SECRET].readers.discard("alice")
            refused = asyncio.get_running_loop().time()
            tag = await one.caller("alice").get(f"/v2/{SECRET}/manifests/1.0")
            assert tag.status_code in (401, 403)
            await asyncio.sleep(0.4)
            gate.set()
            await reading
            await asyncio.sleep(0.55 - (asyncio.get_running_loop().time() - refused))
            # Past access_recheck since the refusal: the other worker has noticed.
            after = await alice.get(f"/v2/{SECRET}/blobs/{layer}")
            assert after.status_code != 200 or not leaked(after.content, image, fake)
            await fish(other, "alice", image, fake, [SECRET])

    asyncio.run(scenario())


def test_a_grant_found_gone_is_not_honoured_from_memory_in_an_outage(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = secret_image(fake)

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url), tag_ttl=0, access_ttl=0.5,
                          access_recheck=300)
        async with running(config) as mirror:
            for _ in range(2):  # this worker keeps alice's grant in memory
                assert set((await pull(mirror, "alice", SECRET, "1.0")).values()) == {200}
            # Another worker saw the upstream refuse alice and revoked her grant.
            metadata = mirror.app.state.services.metadata
            identity = (await _identities(mirror, SECRET))[0]
            await metadata.revoke("fake", SECRET, identity)
            await asyncio.sleep(0.6)  # past access_ttl: this worker asks the metadata again
            fake.down = True  # and finds no grant; then the upstream is out of reach
            await fish(mirror, "alice", image, fake, [SECRET])

    asyncio.run(scenario())


def test_a_worker_that_missed_another_workers_proof_does_not_ask_again(
    fake: AuthUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_image(fake)
    tag = "/manifests/1.0"

    async def scenario() -> None:
        config = settings(tmp_path, Upstream("fake", fake.url))
        async with running(config) as one, running(config) as other:
            # The other worker looks for alice's grant before the first worker has proved
            # it, and goes on to ask the upstream only once the first worker is done.
            access = other.app.state.services.access
            real = access.granted
            looked, done = asyncio.Event(), asyncio.Event()

            async def late(*args: Any, **kwargs: Any) -> bool:
                result = await real(*args, **kwargs)
                if not looked.is_set():
                    looked.set()
                    await done.wait()
                return result

            monkeypatch.setattr(access, "granted", late)
            alice_one, alice_other = one.caller("alice"), other.caller("alice")
            await alice_one.login()
            await alice_other.login()
            second = asyncio.create_task(alice_other.get(f"/v2/{SECRET}{tag}"))
            await looked.wait()
            asked = fake.count("HEAD", tag) + fake.count("GET", tag)
            assert (await alice_one.get(f"/v2/{SECRET}{tag}")).status_code == 200
            done.set()
            assert (await second).status_code == 200
            # One proof, one upstream answer for the tag, shared by both workers.
            assert fake.count("HEAD", tag) + fake.count("GET", tag) - asked == 1

    asyncio.run(scenario())
