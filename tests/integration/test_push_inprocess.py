"""The push path in process: the app on httpx's ASGI transport, a scriptable push upstream
(`support.fake_pushes`) on loopback behind it. Hostile and broken input that a real client
or registry will not produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.fake_pushes import PushUpstream, sha256

from mirror.app import create_app
from mirror.settings import Settings, Upstream

ALICE = {"Authorization": "Bearer token-alice"}
BOB = {"Authorization": "Bearer token-bob"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MiB = 1 << 20

Scope = dict[str, Any]
Message = dict[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                Awaitable[None]]


@pytest.fixture
def fake() -> Iterator[PushUpstream]:
    with PushUpstream() as upstream:
        yield upstream


@contextlib.asynccontextmanager
async def mirror(
    fake: PushUpstream, cache: Path, wrap: Callable[[ASGI], ASGI] | None = None,
    **settings: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running (background sweeps included), and a client of it."""
    app = create_app(Settings(upstreams=(Upstream("fake", fake.url),), cache_dir=cache,
                              **settings))
    transport = httpx.ASGITransport(app=wrap(app) if wrap else app,
                                    raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://mirror", timeout=30) as client:
        yield client


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


def error_of(response: httpx.Response) -> dict[str, str]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    first = response.json()["errors"][0]
    assert first["code"] and first["message"]
    return dict(first)


async def open_session(client: httpx.AsyncClient, repo: str = "team/app",
                       auth: dict[str, str] = ALICE) -> str:
    started = await client.post(f"/v2/{repo}/blobs/uploads/", headers=auth)
    assert started.status_code == 202, started.text
    return str(started.headers["location"])


def manifest_for(config: str, layers: list[str]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d,
                    "size": 1} for d in layers]}).encode()


def uploads_dir(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "tmp").glob("upload-*.part"))


# -- 2. a user's DELETE never evicts shared content ---------------------------------------------


def test_a_users_blob_delete_leaves_content_others_share(fake: PushUpstream,
                                                         tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = os.urandom(50_000)
    digest = sha256(data)

    async def scenario() -> None:
        async with mirror(fake, cache) as client:
            for repo, auth in (("alice/app", ALICE), ("bob/app", BOB)):
                location = await open_session(client, repo, auth)
                done = await client.put(location, content=data, headers=auth,
                                        params={"digest": digest})
                assert done.status_code == 201, done.text
            deleted = await client.delete(f"/v2/bob/app/blobs/{digest}", headers=BOB)
            assert deleted.status_code == 202, deleted.text
            hex_ = digest.removeprefix("sha256:")
            assert (cache / "blobs" / "sha256" / hex_[:2] / hex_).exists()
            gets = fake.count("GET", f"/blobs/{digest}")
            got = await client.get(f"/v2/alice/app/blobs/{digest}", headers=ALICE)
            assert got.status_code == 200 and got.content == data
            assert fake.count("GET", f"/blobs/{digest}") == gets  # a hit
            # Bob's repository does not hold it any more.
            gone = await client.get(f"/v2/bob/app/blobs/{digest}", headers=BOB)
            assert gone.status_code == 404
            assert error_of(gone)["code"] == "BLOB_UNKNOWN"

    run(scenario())


def test_a_users_manifest_delete_leaves_content_others_share(fake: PushUpstream,
                                                             tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    manifest = manifest_for(sha256(b"{}"), [])
    digest = sha256(manifest)
    accept = {"Accept": OCI_MANIFEST}

    async def scenario() -> None:
        async with mirror(fake, cache) as client:
            for repo, auth in (("alice/app", ALICE), ("bob/app", BOB)):
                pushed = await client.put(f"/v2/{repo}/manifests/1", content=manifest,
                                          headers={**auth, "Content-Type": OCI_MANIFEST})
                assert pushed.status_code == 201, pushed.text
                got = await client.get(f"/v2/{repo}/manifests/1", headers={**auth, **accept})
                assert got.status_code == 200 and got.content == manifest
            deleted = await client.delete(f"/v2/bob/app/manifests/{digest}", headers=BOB)
            assert deleted.status_code == 202, deleted.text
            hex_ = digest.removeprefix("sha256:")
            assert (cache / "blobs" / "sha256" / hex_[:2] / hex_).exists()
            gets = fake.count("GET", "/manifests/")
            got = await client.get(f"/v2/alice/app/manifests/{digest}",
                                   headers={**ALICE, **accept})
            assert got.status_code == 200 and got.content == manifest
            assert fake.count("GET", "/manifests/") == gets  # a hit
            # Bob's manifest and the tag that named it are gone, for him.
            for ref in (digest, "1"):
                gone = await client.get(f"/v2/bob/app/manifests/{ref}", headers={**BOB, **accept})
                assert gone.status_code == 404, (ref, gone.text)
                assert error_of(gone)["code"] == "MANIFEST_UNKNOWN"

    run(scenario())
