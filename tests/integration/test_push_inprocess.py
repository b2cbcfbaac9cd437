"""The push path in process: the app on httpx's ASGI transport, a scriptable push upstream
(`support.fake_pushes`) on loopback behind it. Hostile and broken input that a real client
or registry will not produce on demand."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.fake_pushes import PushUpstream, sha256
from support.smallfs import fill_up, small_tmpfs

from mirror import upload_sessions
from mirror.app import create_app
from mirror.metadata.sqlite_db import database_path
from mirror.routes_push import MEDIA_TYPE
from mirror.settings import Settings, Upstream

ALICE = {"Authorization": "Basic " + base64.b64encode(b"alice:alicepw").decode()}
BOB = {"Authorization": "Basic " + base64.b64encode(b"bob:bobpw").decode()}
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


# -- 1. bad headers are OCI errors, never a 500 -------------------------------------------------


def test_non_ascii_digits_in_push_headers_are_oci_errors(fake: PushUpstream,
                                                         tmp_path: Path) -> None:
    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache") as client:
            location = await open_session(client)
            # '²'.isdigit() is true, int('²') fails: each must be a 4xx with an OCI body.
            bad_range = await client.patch(location, content=b"0123456789a", headers={
                **ALICE, "Content-Range": "\xb2-10".encode("latin-1")})
            assert bad_range.status_code in (400, 416), bad_range.text
            assert error_of(bad_range)["code"] in ("BLOB_UPLOAD_INVALID", "SIZE_INVALID")
            bad_length = await client.patch(location, content=b"x", headers={
                **ALICE, "Content-Length": "\xb2".encode("latin-1")})
            assert bad_length.status_code == 400, bad_length.text
            assert error_of(bad_length)["code"] == "SIZE_INVALID"
            bad_digest = await client.post(
                "/v2/team/app/blobs/uploads/", headers=ALICE, content=b"x",
                params={"digest": "sha256:" + "\xb2" * 64})
            assert bad_digest.status_code == 400, bad_digest.text
            assert error_of(bad_digest)["code"] == "DIGEST_INVALID"
            bad_mount = await client.post(
                "/v2/team/app/blobs/uploads/", headers=ALICE,
                params={"mount": "sha256:\xb2", "from": "team/other"})
            assert bad_mount.status_code == 400, bad_mount.text
            assert error_of(bad_mount)["code"] == "DIGEST_INVALID"
            # The session survived all that.
            good = await client.patch(location, content=b"abc", headers={
                **ALICE, "Content-Range": "0-2"})
            assert good.status_code == 202, good.text
            assert good.headers["range"] == "0-2"
            # Out of order: 416 with an OCI body, and where the upload really is.
            wrong = await client.patch(good.headers["location"], content=b"de", headers={
                **ALICE, "Content-Range": "7-8"})
            assert wrong.status_code == 416
            assert error_of(wrong)["code"] == "SIZE_INVALID"
            assert wrong.headers["range"] == "0-2"

    run(scenario())


def test_a_garbled_range_from_the_upstream_is_not_a_crash(fake: PushUpstream,
                                                           tmp_path: Path) -> None:
    fake.patch_range = "0-\xb2\xb3"

    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache") as client:
            location = await open_session(client)
            patched = await client.patch(location, content=b"abcd", headers=ALICE)
            assert patched.status_code == 202, patched.text
            assert patched.headers["range"] == "0-3"  # what we forwarded, counted here
            status = await client.get(patched.headers["location"], headers=ALICE)
            assert status.status_code == 204, status.text
            assert status.headers["range"] == "0-3"
            done = await client.put(patched.headers["location"], headers=ALICE,
                                    params={"digest": sha256(b"abcd")})
            assert done.status_code == 201, done.text

    run(scenario())


@pytest.mark.parametrize("content_type", [b"application/vnd.oci.image.manifest.v1+json\xe9",
                                          b"caf\xe9+json", b"\xe9/x"])
def test_a_non_ascii_manifest_content_type_is_manifest_invalid(
    fake: PushUpstream, tmp_path: Path, content_type: bytes
) -> None:
    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache") as client:
            data = json.dumps({"schemaVersion": 2, "mediaType": "caf\u00e9"}).encode()
            pushed = await client.put("/v2/team/app/manifests/1", content=data,
                                      headers={**ALICE, "Content-Type": content_type})
            # Refused, or pushed under a plain media type (the document's is none either).
            assert pushed.status_code in (201, 400), pushed.text
            if pushed.status_code == 400:
                assert error_of(pushed)["code"] == "MANIFEST_INVALID"
                assert fake.count("PUT", "/manifests/") == 0
            else:
                sent = fake.manifests[("team/app", "1")][0]
                assert sent.isascii() and MEDIA_TYPE.fullmatch(sent), sent

    run(scenario())


def disconnecting(after: int) -> Callable[[ASGI], ASGI]:
    """Wrap an app: its client goes away once `after` request body bytes came through,
    as uvicorn tells an app whose client dropped the connection."""

    def wrap(app: ASGI) -> ASGI:
        async def wrapped(scope: Scope, receive: Callable[[], Awaitable[Message]],
                          send: Callable[[Message], Awaitable[None]]) -> None:
            if scope["type"] != "http" or scope["method"] != "PATCH":
                await app(scope, receive, send)
                return
            seen = 0

            async def cut_receive() -> Message:
                nonlocal seen
                if seen >= after:
                    return {"type": "http.disconnect"}
                message = await receive()
                seen += len(message.get("body", b""))
                return message

            await app(scope, cut_receive, send)

        return wrapped

    return wrap


def test_a_client_dropping_mid_patch_cancels_the_session_and_logs_one_line(
    fake: PushUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield os.urandom(256 * 1024)

    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache", wrap=disconnecting(512 * 1024)) as client:
            location = await open_session(client)
            caplog.clear()
            with caplog.at_level(logging.INFO):
                await client.patch(location, content=body(), headers=ALICE)
            mine = [r for r in caplog.records if r.name.startswith("mirror")]
            assert len(mine) == 1, [r.getMessage() for r in mine]
            assert mine[0].levelno == logging.WARNING and not mine[0].exc_info
            assert "went away" in mine[0].getMessage()
            # The upstream session is cancelled, so is ours, and nothing is left in tmp/.
            assert fake.count("DELETE", "/blobs/uploads/") == 1
            assert fake.uploads == {}
            again = await client.get(location, headers=ALICE)
            assert again.status_code == 404
            assert uploads_dir(tmp_path / "cache") == []
            # The next push works.
            data = os.urandom(100_000)
            location = await open_session(client)
            done = await client.put(location, content=data, headers=ALICE,
                                    params={"digest": sha256(data)})
            assert done.status_code == 201, done.text

    run(scenario())


# -- 1. a full disk: the push succeeds, caching it is best effort ---------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small-fs") as path:
        yield path


def test_a_push_onto_a_full_disk_succeeds_uncached(
    fake: PushUpstream, small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = small_fs / "cache"

    async def scenario() -> None:
        async with mirror(fake, cache) as client:
            fill_up(small_fs / "filler")
            config, layer = b"{}", os.urandom(3 * MiB)
            for data in (config, layer):
                location = await open_session(client)
                patched = await client.patch(location, content=data, headers=ALICE)
                assert patched.status_code == 202, patched.text
                done = await client.put(patched.headers["location"], headers=ALICE,
                                        params={"digest": sha256(data)})
                assert done.status_code == 201, done.text
            manifest = manifest_for(sha256(config), [sha256(layer)])
            pushed = await client.put("/v2/team/app/manifests/1", content=manifest,
                                      headers={**ALICE, "Content-Type": OCI_MANIFEST})
            assert pushed.status_code == 201, pushed.text
            assert pushed.headers["docker-content-digest"] == sha256(manifest)
            assert fake.manifests[("team/app", "1")][1] == manifest
            assert [p for p in (cache / "blobs").rglob("*") if p.is_file()] == []
            assert uploads_dir(cache) == []
            # Pulls still work (from the upstream).
            got = await client.get("/v2/team/app/manifests/1",
                                   headers={**ALICE, "Accept": OCI_MANIFEST})
            assert got.status_code == 200 and got.content == manifest
            assert "cache disk full" in caplog.text
            assert "internal error" not in caplog.text

    run(scenario())


def test_a_written_through_blob_bigger_than_the_disk_is_simply_not_cached(
    fake: PushUpstream, small_fs: Path
) -> None:
    cache = small_fs / "cache"
    data = os.urandom(30 * MiB)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), MiB):
            yield data[start:start + MiB]

    async def scenario() -> None:
        async with mirror(fake, cache) as client:
            location = await open_session(client)
            patched = await client.patch(location, content=chunks(), headers=ALICE)
            assert patched.status_code == 202, patched.text
            done = await client.put(patched.headers["location"], headers=ALICE,
                                    params={"digest": sha256(data)})
            assert done.status_code == 201, done.text
            assert fake.blobs[sha256(data)] == data
            assert uploads_dir(cache) == []
            # The room is back: a small one is written through again.
            small = os.urandom(1000)
            location = await open_session(client)
            done = await client.put(location, content=small, headers=ALICE,
                                    params={"digest": sha256(small)})
            assert done.status_code == 201
            hex_ = sha256(small).removeprefix("sha256:")
            assert (cache / "blobs" / "sha256" / hex_[:2] / hex_).read_bytes() == small

    run(scenario())


def test_a_write_through_that_fails_for_any_reason_leaves_the_push_alone(
    fake: PushUpstream, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    data = os.urandom(2 * MiB)

    async def scenario() -> None:
        async with mirror(fake, cache) as client:
            location = await open_session(client)
            session_id = location.rsplit("/", 1)[1]
            # Something the tee cannot write to (EISDIR: neither ENOSPC nor a lost file).
            (cache / "tmp" / f"upload-{session_id}.part").mkdir()
            patched = await client.patch(location, content=data, headers=ALICE)
            assert patched.status_code == 202, patched.text
            done = await client.put(patched.headers["location"], headers=ALICE,
                                    params={"digest": sha256(data)})
            assert done.status_code == 201, done.text
            assert fake.blobs[sha256(data)] == data
            hex_ = sha256(data).removeprefix("sha256:")
            assert not (cache / "blobs" / "sha256" / hex_[:2] / hex_).exists()

    run(scenario())


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


# -- 3. sessions are shared by the processes sharing the metadata -----------------------------


def test_a_session_opened_through_one_process_is_continued_through_another(
    fake: PushUpstream, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"  # one SQLite metadata store, and one tmp/ for write-through
    data = os.urandom(3 * MiB + 5)
    digest = sha256(data)

    async def scenario() -> None:
        async with mirror(fake, cache) as one, mirror(fake, cache) as two:
            location = await open_session(one)
            offset = 0
            for client in (two, one, two, one):
                part = data[offset:offset + MiB]
                patched = await client.patch(location, content=part, headers={
                    **ALICE, "Content-Range": f"{offset}-{offset + len(part) - 1}"})
                assert patched.status_code == 202, patched.text
                assert patched.headers["range"] == f"0-{offset + len(part) - 1}"
                location = patched.headers["location"]
                offset += len(part)
            for client in (one, two):  # still its caller's only, wherever it is asked for
                stolen = await client.get(location, headers=BOB)
                assert stolen.status_code == 404, stolen.text
                status = await client.get(location, headers=ALICE)
                assert status.status_code == 204, status.text
                assert status.headers["range"] == f"0-{len(data) - 1}"
            done = await two.put(location, headers=ALICE, params={"digest": digest})
            assert done.status_code == 201, done.text
            assert fake.blobs[digest] == data
            for client in (one, two):
                assert (await client.get(location, headers=ALICE)).status_code == 404
            # Both wrote their chunks through into the one cache: the blob is cached.
            hex_ = digest.removeprefix("sha256:")
            assert (cache / "blobs" / "sha256" / hex_[:2] / hex_).read_bytes() == data
            assert uploads_dir(cache) == []

    run(scenario())


# -- 4. orphans ---------------------------------------------------------------------------------


def test_upload_files_and_sessions_left_by_a_dead_worker_are_swept(
    fake: PushUpstream, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"

    async def scenario() -> None:
        # A worker opens a session, writes some of it through, and is gone (whatever it
        # held in memory with it).
        async with mirror(fake, cache, upload_timeout=1.0) as client:
            location = await open_session(client)
            patched = await client.patch(location, content=b"x" * 1000, headers=ALICE)
            assert patched.status_code == 202
        assert len(uploads_dir(cache)) == 1
        assert len(fake.uploads) == 1
        # The next worker sweeps them once they are past the time limit.
        async with mirror(fake, cache, upload_timeout=1.0):
            deadline = time.monotonic() + 20
            while uploads_dir(cache) or fake.count("DELETE", "/blobs/uploads/") == 0:
                assert time.monotonic() < deadline, (uploads_dir(cache), fake.seen[-3:])
                await asyncio.sleep(0.05)

    run(scenario())


def expiry(cache: Path, session_id: str) -> float:
    """When the session's record expires, as the SQLite metadata store keeps it."""
    with contextlib.closing(sqlite3.connect(database_path(cache))) as db:
        row = db.execute("SELECT expires FROM uploads WHERE id = ?", (session_id,)).fetchone()
    assert row is not None and isinstance(row[0], float)
    return row[0]


def test_a_session_record_expires_with_its_time_limit_not_later(
    fake: PushUpstream, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"

    async def scenario() -> None:
        async with mirror(fake, cache, upload_timeout=30.0) as client:
            started = time.time()
            location = await open_session(client)
            session_id = location.rsplit("/", 1)[1]
            first = expiry(cache, session_id)
            assert started + 30.0 <= first <= time.time() + 30.0 + upload_sessions.EXPIRED_KEPT
            for _ in range(3):  # saving a session again must not push its expiry back
                location = (await client.patch(location, content=b"ab",
                                               headers=ALICE)).headers["location"]
                await asyncio.sleep(0.01)
                assert abs(expiry(cache, session_id) - first) < 0.001

    run(scenario())


# -- 5. bodies: counted while they stream, and their declared length checked -----------------


def test_a_body_longer_or_shorter_than_its_content_length_is_size_invalid(
    fake: PushUpstream, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache") as client:
            for declared, sent in ((5, 10), (100, 10)):
                location = await open_session(client)
                lying = await client.patch(location, content=b"y" * sent, headers={
                    **ALICE, "Content-Length": str(declared)})
                assert lying.status_code == 400, lying.text
                assert error_of(lying)["code"] == "SIZE_INVALID"
                # The upstream got a broken body: its session is cancelled.
                gone = await client.get(location, headers=ALICE)
                assert gone.status_code == 404
            assert fake.uploads == {}
            for declared, sent in ((5, 10), (100, 10)):
                manifest = await client.put("/v2/team/app/manifests/1", content=b"{" * sent,
                                            headers={**ALICE, "Content-Type": OCI_MANIFEST,
                                                     "Content-Length": str(declared)})
                assert manifest.status_code == 400, manifest.text
                assert error_of(manifest)["code"] in ("SIZE_INVALID", "MANIFEST_INVALID")
            assert fake.count("PUT", "/manifests/") == 0

    run(scenario())


def test_a_client_silent_mid_body_is_answered_400(fake: PushUpstream, tmp_path: Path) -> None:
    async def stalling() -> AsyncIterator[bytes]:
        yield b"{"
        await asyncio.sleep(30)

    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache", read_timeout=0.5) as client:
            began = time.monotonic()
            manifest = await client.put("/v2/team/app/manifests/1", content=stalling(),
                                        headers={**ALICE, "Content-Type": OCI_MANIFEST})
            assert manifest.status_code == 400, manifest.text
            assert "sent nothing" in error_of(manifest)["message"]
            location = await open_session(client)
            patched = await client.patch(location, content=stalling(), headers=ALICE)
            assert patched.status_code == 400, patched.text
            assert error_of(patched)["code"] == "BLOB_UPLOAD_INVALID"
            assert time.monotonic() - began < 10

    run(scenario())


def test_chunked_bodies_are_forwarded_and_counted(fake: PushUpstream, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for start in range(0, len(data), MiB):
            yield data[start:start + MiB]

    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache", max_layer_size=2 * MiB) as client:
            location = await open_session(client)
            closed = await client.put(location, content=chunks(), headers=ALICE,
                                      params={"digest": sha256(data)})
            assert closed.status_code == 413, closed.text
            assert error_of(closed)["code"] == "SIZE_INVALID"
        async with mirror(fake, tmp_path / "cache") as client:
            location = await open_session(client)
            closed = await client.put(location, content=chunks(), headers=ALICE,
                                      params={"digest": sha256(data)})
            assert closed.status_code == 201, closed.text
            assert fake.blobs[sha256(data)] == data

    run(scenario())


# -- 6. sessions belong to their caller; the upstream's Location stays on its origin ----------


def test_an_upload_session_is_usable_only_by_the_caller_that_opened_it(
    fake: PushUpstream, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache") as client:
            location = await open_session(client, "team/shared")
            for method in ("GET", "PATCH", "PUT", "DELETE"):
                stolen = await client.request(method, location, headers=BOB, content=b"evil",
                                              params={"digest": sha256(b"evil")})
                assert stolen.status_code == 404, (method, stolen.text)
                assert error_of(stolen)["code"] == "BLOB_UPLOAD_UNKNOWN"
            assert fake.count("PATCH") == fake.count("PUT") == fake.count("DELETE") == 0
            done = await client.put(location, content=b"mine", headers=ALICE,
                                    params={"digest": sha256(b"mine")})
            assert done.status_code == 201, done.text

    run(scenario())


def test_open_sessions_per_caller_are_bounded(fake: PushUpstream, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache") as client:
            locations = [await open_session(client)
                         for _ in range(upload_sessions.MAX_SESSIONS_PER_CALLER)]
            refused = await client.post("/v2/team/app/blobs/uploads/", headers=ALICE)
            assert refused.status_code == 429, refused.text
            assert error_of(refused)["code"] == "TOOMANYREQUESTS"
            # Refused before going upstream.
            opened = [x for x in fake.seen if x.method == "POST" and x.status == 202]
            assert len(opened) == len(locations)
            await open_session(client, auth=BOB)  # others are not held back
            # A cancelled one makes room again.
            assert (await client.delete(locations[0], headers=ALICE)).status_code == 204
            await open_session(client)

    run(scenario())


@pytest.mark.parametrize("location", ["{other}/v2/{name}/blobs/uploads/{id}",
                                      "//evil.example/v2/{name}/blobs/uploads/{id}",
                                      "http://127.0.0.1@evil.example/{id}"])
def test_an_upload_location_on_another_origin_is_refused(
    fake: PushUpstream, tmp_path: Path, location: str
) -> None:
    fake.upload_location = location

    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache") as client:
            started = await client.post("/v2/team/app/blobs/uploads/", headers=ALICE)
            assert started.status_code == 502, started.text
            assert error_of(started)["code"] == "NAME_UNKNOWN"
            assert "another host" in error_of(started)["message"]
        assert fake.count("PATCH") == 0

    run(scenario())


def test_a_location_moving_to_another_origin_after_a_patch_is_refused(
    fake: PushUpstream, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with mirror(fake, tmp_path / "cache") as client:
            location = await open_session(client)
            fake.upload_location = "{other}/v2/{name}/blobs/uploads/{id}"
            patched = await client.patch(location, content=b"abc", headers=ALICE)
            assert patched.status_code == 502, patched.text
            assert "another host" in error_of(patched)["message"]
            hashed = hashlib.sha256(b"abc").hexdigest()
            after = await client.put(location, headers=ALICE,
                                     params={"digest": f"sha256:{hashed}"})
            assert after.status_code in (400, 404), after.text

    run(scenario())
