"""Hardening against hostile clients and upstreams, and damaged caches, in process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.authfake import AuthUpstream, digest_of
from support.inproc import running

from mirror.metadata import SqliteMetadata
from mirror.reference import parse_digest
from mirror.settings import Settings, Upstream


@pytest.fixture
def fake() -> Iterator[AuthUpstream]:
    with AuthUpstream() as upstream:
        yield upstream


def config(tmp_path: Path, fake: AuthUpstream, **extra: object) -> Settings:
    values: dict[str, object] = {"cache_dir": tmp_path / "cache", "scrub_rate": 0,
                                 "upstreams": (Upstream("fake", fake.url),), **extra}
    return Settings(**values)  # type: ignore[arg-type]


def test_requests_for_unknown_names_leave_no_permanent_record(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with running(config(tmp_path, fake, token_cache_entries=50)) as mirror:
            anonymous = mirror.caller()
            for i in range(300):
                response = await anonymous.get(f"/v2/nothing/n{i}/manifests/latest")
                assert response.status_code == 404
            metadata = mirror.app.state.services.metadata
            assert isinstance(metadata, SqliteMetadata)
            for table in ("grants", "tags", "repos", "links", "content"):
                assert metadata.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
            tokens = mirror.app.state.clients["fake"].tokens
            assert len(tokens._tokens) <= 50  # one per repository scope, bounded

    asyncio.run(scenario())


def test_a_blob_of_unknown_length_is_cut_at_the_layer_limit(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    digest = fake.add_blob("public/app", b"the real bytes")
    fake.endless.add(digest)

    async def scenario() -> None:
        settings = config(tmp_path, fake, max_layer_size=4 * 2**20)
        async with running(settings) as mirror:
            with pytest.raises(Exception):  # noqa: B017 - the stream is cut, whatever way
                response = await mirror.caller().get(f"/v2/public/app/blobs/{digest}")
                response.raise_for_status()
            # The 4 MiB cap, plus what the queue and the sockets held in flight.
            assert fake.sent <= 16 * 2**20, fake.sent
            sent = fake.sent
            await asyncio.sleep(0.3)
            assert fake.sent == sent  # and nothing more afterwards
            assert not mirror.app.state.store.has(parse_digest(digest))

    asyncio.run(scenario())


def test_a_dripping_upstream_is_cut_at_the_deadline(fake: AuthUpstream, tmp_path: Path) -> None:
    digest = fake.add_blob("public/app", b"the real bytes")
    fake.endless.add(digest)
    fake.drip = 0.05

    async def scenario() -> None:
        async with running(config(tmp_path, fake, upstream_deadline=1.0)) as mirror:
            started = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017 - any cut: the client gets no 200 body
                response = await mirror.caller().get(f"/v2/public/app/blobs/{digest}")
                response.raise_for_status()
                raise AssertionError("served")
            assert time.monotonic() - started < 10

    asyncio.run(scenario())


def test_damaged_files_are_misses_and_fetched_again(fake: AuthUpstream, tmp_path: Path) -> None:
    image = fake.add_image("public/app", "1", [b"a layer " * 1000])

    async def scenario() -> None:
        async with running(config(tmp_path, fake)) as mirror:
            client = mirror.caller()
            store = mirror.app.state.store
            layer = image.layers[0]
            assert (await client.get(f"/v2/public/app/blobs/{layer}")).status_code == 200
            path = store.path(parse_digest(layer))
            path.write_bytes(path.read_bytes()[:100])  # truncated
            again = await client.get(f"/v2/public/app/blobs/{layer}")
            assert again.status_code == 200 and digest_of(again.content) == layer
            assert fake.count("GET", f"/blobs/{layer}") == 2
            manifest = await client.get(f"/v2/public/app/manifests/{image.digest}")
            assert manifest.status_code == 200
            mirror.app.state.services.manifests._hot.clear()  # a restart, as far as memory goes
            store.path(parse_digest(image.digest)).write_bytes(b"")  # emptied
            again = await client.get(f"/v2/public/app/manifests/{image.digest}")
            assert again.status_code == 200 and again.content == image.manifest

    asyncio.run(scenario())


def test_the_scrub_evicts_content_that_no_longer_hashes(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    image = fake.add_image("public/app", "1", [b"a layer " * 1000])

    async def scenario() -> None:
        async with running(config(tmp_path, fake)) as mirror:
            client = mirror.caller()
            layer = image.layers[0]
            assert (await client.get(f"/v2/public/app/blobs/{layer}")).status_code == 200
            store = mirror.app.state.store
            path = store.path(parse_digest(layer))
            data = bytearray(path.read_bytes())
            data[10] ^= 0xFF  # same length: only a hash can tell
            path.write_bytes(bytes(data))
            scrubber = mirror.app.state.scrubber
            scrubber.rate = 1 << 30  # fast, for the test
            await scrubber.scrub_all()
            assert scrubber.bad == 1 and not path.exists()
            again = await client.get(f"/v2/public/app/blobs/{layer}")
            assert again.status_code == 200 and digest_of(again.content) == layer

    asyncio.run(scenario())


@pytest.mark.parametrize("value", [b"Basic \xff\xfe", b"Bearer \xff", b"Basic ", b"Digest x",
                                   b"Basic " + b"A" * 20000])
def test_undecodable_credentials_are_a_401_on_every_route(
    fake: AuthUpstream, tmp_path: Path, value: bytes
) -> None:
    fake.add_image("public/app", "1", [b"layer"])

    async def scenario() -> None:
        async with running(config(tmp_path, fake)) as mirror:
            routes = [("GET", "/v2/"), ("GET", "/v2/public/app/manifests/1"),
                      ("GET", "/v2/public/app/tags/list"),
                      ("POST", "/v2/public/app/blobs/uploads/")]
            if value.startswith(b"Basic"):  # the token endpoint reads only Basic
                routes.append(("GET", "/token"))
            for method, path in routes:
                response = await mirror.http.request(
                    method, path, headers=[(b"authorization", value)])
                assert response.status_code == 401, (path, response.text)
                assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"

    asyncio.run(scenario())


def test_a_non_ascii_manifest_content_type_is_no_500(fake: AuthUpstream, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(config(tmp_path, fake)) as mirror:
            token = await mirror.caller("alice").login()
            response = await mirror.http.put(
                "/v2/team/app/manifests/1", content=b'{"schemaVersion": 2}',
                headers=[(b"authorization", f"Bearer {token}".encode()),
                         (b"content-type", "application/vnd.caf\xe9+json".encode("latin-1"))])
            assert response.status_code in (201, 400), response.text

    asyncio.run(scenario())


def test_the_realm_is_public_url_whatever_the_host_header(
    fake: AuthUpstream, tmp_path: Path
) -> None:
    async def scenario() -> None:
        settings = config(tmp_path, fake, public_url="https://mirror.example.com")
        async with running(settings) as mirror:
            response = await mirror.http.get("/v2/", headers={"Host": "evil.example"})
            assert response.status_code == 401
            challenge = response.headers["www-authenticate"]
            assert 'realm="https://mirror.example.com/token"' in challenge
            assert "evil" not in challenge

    asyncio.run(scenario())


def test_a_token_form_is_refused_while_it_streams(fake: AuthUpstream, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(config(tmp_path, fake)) as mirror:
            async def body() -> object:
                for _ in range(1 << 14):  # 1 GiB if read whole; refused after 64 KiB
                    yield b"x" * 65536

            response = await mirror.http.post("/token", content=body(),  # type: ignore[arg-type]
                                              headers={"Content-Type":
                                                       "application/x-www-form-urlencoded"})
            assert response.status_code == 400
            assert response.json()["errors"][0]["code"] == "SIZE_INVALID"

    asyncio.run(scenario())

