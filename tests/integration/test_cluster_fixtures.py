"""The object store (Ceph radosgw) and Redis fixtures work for real, with both S3 clients the
replicas may use: obstore and aiobotocore."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import obstore
import pytest
import redis.asyncio
from botocore.exceptions import ClientError
from obstore.exceptions import AlreadyExistsError
from obstore.store import S3Store
from support.ceph import Ceph
from support.cluster_fixtures import bucket_name
from support.redisd import RedisServer
from support.s3 import aiobotocore_client, obstore_store

MiB = 1 << 20
TIMEOUT = httpx.Timeout(10)


T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await asyncio.wait_for(coro, 120)

    return asyncio.run(wrapper())


async def chunks(count: int, size: int, *, fail_at: int | None = None,
                 seed: bytes = b"") -> AsyncIterator[bytes]:
    """`count` chunks of `size` deterministic bytes (`data(count, size)`); raise before chunk
    `fail_at`."""
    for i in range(count):
        if i == fail_at:
            raise RuntimeError("source broke")
        yield chunk(i, size, seed)
        await asyncio.sleep(0)


def chunk(i: int, size: int, seed: bytes = b"") -> bytes:
    block = hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
    return (block * (size // len(block) + 1))[:size]


def data(count: int, size: int, seed: bytes = b"") -> bytes:
    return b"".join(chunk(i, size, seed) for i in range(count))


def pending_uploads(ceph: Ceph, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = ceph.client().list_multipart_uploads(
        Bucket=bucket).get("Uploads", [])
    return uploads


def keys(ceph: Ceph, bucket: str) -> list[str]:
    return [o["Key"] for o in ceph.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code"))


# -- the fixtures themselves ------------------------------------------------------------------


def test_ceph_fixture(ceph: Ceph) -> None:
    assert 0 < ceph.startup_seconds < 30
    assert ceph.endpoint == f"http://127.0.0.1:{ceph.rgw_port}"
    env = ceph.env()
    assert env["AWS_ENDPOINT_URL"] == ceph.endpoint
    assert env["AWS_ACCESS_KEY_ID"] == ceph.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == ceph.secret_key
    assert env["AWS_REGION"] == ceph.region
    assert set(ceph.rss_bytes()) == {"ceph-mon", "ceph-osd", "radosgw"}
    # anonymous requests are refused
    r = httpx.get(f"{ceph.endpoint}/nonexistent-bucket/key", timeout=TIMEOUT, trust_env=False)
    assert r.status_code in (403, 404)


def test_ceph_restarts_on_its_data(ceph: Ceph, s3_bucket: str) -> None:
    ceph.client().put_object(Bucket=s3_bucket, Key="kept", Body=b"kept")
    ceph.stop()
    assert ceph.rgw is None and ceph.osd is None and ceph.mon is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(ceph.endpoint, timeout=TIMEOUT, trust_env=False)
    ceph.start()
    assert ceph.startup_seconds < 30
    got = ceph.client().get_object(Bucket=s3_bucket, Key="kept")
    assert got["Body"].read() == b"kept"


def test_s3_bucket_fixture_is_fresh_and_empty(ceph: Ceph, s3_bucket: str) -> None:
    assert s3_bucket.startswith("test-s3-bucket-fixture-is-fresh-and-empty-")
    s3 = ceph.client()
    s3.head_bucket(Bucket=s3_bucket)
    assert keys(ceph, s3_bucket) == []
    assert pending_uploads(ceph, s3_bucket) == []


def test_delete_bucket_removes_objects_and_pending_uploads(ceph: Ceph) -> None:
    name = bucket_name("delete me")
    ceph.create_bucket(name)
    s3 = ceph.client()
    s3.put_object(Bucket=name, Key="a/b", Body=b"x")
    s3.create_multipart_upload(Bucket=name, Key="pending")
    ceph.delete_bucket(name)
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket=name)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    ceph.delete_bucket(name)  # a missing bucket is fine


def test_bucket_names_are_valid() -> None:
    for test_name in ("test_x[param-1]", "T" * 200, "___"):
        name = bucket_name(test_name)
        assert 3 <= len(name) <= 63
        assert name[0].isalnum() and name[-1].isalnum()
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


def test_env_configures_both_clients(ceph: Ceph, s3_bucket: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ceph.env().items():
        monkeypatch.setenv(key, value)

    async def scenario() -> bytes:
        store = S3Store(s3_bucket, client_options={"allow_http": True})
        await obstore.put_async(store, "from-env", b"env")
        from aiobotocore.session import get_session

        async with get_session().create_client("s3") as s3:
            resp = await s3.get_object(Bucket=s3_bucket, Key="from-env")
            body: bytes = await resp["Body"].read()
            return body

    assert run(scenario()) == b"env"


# -- put / get / delete ------------------------------------------------------------------------


def test_put_get_head_list_delete_obstore(ceph: Ceph, s3_bucket: str) -> None:
    store = obstore_store(ceph, s3_bucket)

    async def scenario() -> None:
        body = data(3, 1000)
        result = await obstore.put_async(store, "dir/obj", body)
        assert result["e_tag"] == f'"{hashlib.md5(body).hexdigest()}"'
        got = await obstore.get_async(store, "dir/obj")
        assert bytes(await got.bytes_async()) == body
        meta = await obstore.head_async(store, "dir/obj")
        assert meta["size"] == len(body) and meta["e_tag"] == result["e_tag"]
        listed = [m["path"] async for batch in obstore.list(store, prefix="dir")
                  for m in batch]
        assert listed == ["dir/obj"]
        await obstore.delete_async(store, "dir/obj")
        with pytest.raises(FileNotFoundError):  # obstore's NotFoundError is raised as this
            await obstore.head_async(store, "dir/obj")
        with pytest.raises(FileNotFoundError):
            await obstore.get_async(store, "dir/obj")

    run(scenario())
    assert keys(ceph, s3_bucket) == []


def test_put_get_head_list_delete_aiobotocore(ceph: Ceph, s3_bucket: str) -> None:
    async def scenario() -> None:
        body = data(3, 1000)
        async with aiobotocore_client(ceph) as s3:
            put = await s3.put_object(Bucket=s3_bucket, Key="dir/obj", Body=body)
            assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
            got = await s3.get_object(Bucket=s3_bucket, Key="dir/obj")
            async with got["Body"] as stream:
                assert await stream.read() == body
            head = await s3.head_object(Bucket=s3_bucket, Key="dir/obj")
            assert head["ContentLength"] == len(body)
            listed = await s3.list_objects_v2(Bucket=s3_bucket, Prefix="dir/")
            assert [o["Key"] for o in listed["Contents"]] == ["dir/obj"]
            await s3.delete_object(Bucket=s3_bucket, Key="dir/obj")
            with pytest.raises(ClientError) as e:
                await s3.head_object(Bucket=s3_bucket, Key="dir/obj")
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
            with pytest.raises(ClientError) as e:
                await s3.get_object(Bucket=s3_bucket, Key="dir/obj")
            assert error_code(e.value) == "NoSuchKey"

    run(scenario())
    assert keys(ceph, s3_bucket) == []


# -- multipart ---------------------------------------------------------------------------------


def test_multipart_invisible_until_completed_and_abort_leaves_nothing(
        ceph: Ceph, s3_bucket: str) -> None:
    part = 5 * MiB  # the smallest part size S3 allows (but for the last part)

    async def scenario() -> None:
        async with aiobotocore_client(ceph) as s3:
            up = await s3.create_multipart_upload(Bucket=s3_bucket, Key="mp")
            parts = []
            for n, body in enumerate((chunk(0, part), chunk(1, 1000)), start=1):
                r = await s3.upload_part(Bucket=s3_bucket, Key="mp", UploadId=up["UploadId"],
                                         PartNumber=n, Body=body)
                parts.append({"PartNumber": n, "ETag": r["ETag"]})
            # uploaded but not completed: no object, only a pending upload
            with pytest.raises(ClientError):
                await s3.head_object(Bucket=s3_bucket, Key="mp")
            assert keys(ceph, s3_bucket) == []
            assert [u["Key"] for u in pending_uploads(ceph, s3_bucket)] == ["mp"]

            done = await s3.complete_multipart_upload(
                Bucket=s3_bucket, Key="mp", UploadId=up["UploadId"],
                MultipartUpload={"Parts": parts})
            assert done["ETag"] == ""  # radosgw 16 leaves it empty; HEAD has it
            head = await s3.head_object(Bucket=s3_bucket, Key="mp")
            assert head["ETag"].endswith('-2"') and head["ContentLength"] == part + 1000
            got = await s3.get_object(Bucket=s3_bucket, Key="mp")
            assert await got["Body"].read() == chunk(0, part) + chunk(1, 1000)
            assert pending_uploads(ceph, s3_bucket) == []

            # an aborted upload leaves no object, no pending upload, no parts
            up = await s3.create_multipart_upload(Bucket=s3_bucket, Key="gone")
            await s3.upload_part(Bucket=s3_bucket, Key="gone", UploadId=up["UploadId"],
                                 PartNumber=1, Body=chunk(2, part))
            await s3.abort_multipart_upload(Bucket=s3_bucket, Key="gone",
                                            UploadId=up["UploadId"])
            assert pending_uploads(ceph, s3_bucket) == []
            assert keys(ceph, s3_bucket) == ["mp"]
            with pytest.raises(ClientError) as e:
                await s3.list_parts(Bucket=s3_bucket, Key="gone", UploadId=up["UploadId"])
            # radosgw 16 answers NoSuchKey where S3 answers NoSuchUpload
            assert error_code(e.value) in ("NoSuchUpload", "NoSuchKey")

    run(scenario())


def test_obstore_streams_multipart_from_async_iterator(ceph: Ceph, s3_bucket: str) -> None:
    store = obstore_store(ceph, s3_bucket)
    count, size = 12, 1 * MiB  # unknown length to obstore; three 5 MiB-or-less parts

    async def scenario() -> None:
        await obstore.put_async(store, "streamed", chunks(count, size), chunk_size=5 * MiB,
                                max_concurrency=2)
        meta = await obstore.head_async(store, "streamed")
        assert meta["size"] == count * size
        assert str(meta["e_tag"]).endswith('-3"')  # three parts
        digest = hashlib.sha256()
        got = await obstore.get_async(store, "streamed")
        async for piece in got.stream(min_chunk_size=MiB):
            digest.update(piece)
        assert digest.hexdigest() == hashlib.sha256(data(count, size)).hexdigest()

    run(scenario())
    assert pending_uploads(ceph, s3_bucket) == []


def test_obstore_aborts_multipart_when_the_source_fails(ceph: Ceph, s3_bucket: str) -> None:
    store = obstore_store(ceph, s3_bucket)

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="source broke"):
            await obstore.put_async(store, "broken", chunks(12, MiB, fail_at=11),
                                    chunk_size=5 * MiB, max_concurrency=2)

    run(scenario())
    assert keys(ceph, s3_bucket) == []
    # the abort is sent before put_async returns
    assert pending_uploads(ceph, s3_bucket) == []


def test_obstore_writer_aborts_on_error_and_on_cancellation(ceph: Ceph,
                                                            s3_bucket: str) -> None:
    """`open_writer_async` aborts its multipart upload when the `async with` body raises or
    is cancelled (a cancelled `put_async` leaves its upload pending: see
    tests/bench/s3_clients.py)."""
    store = obstore_store(ceph, s3_bucket)

    async def write(key: str, fail: bool) -> None:
        async with obstore.open_writer_async(store, key, buffer_size=5 * MiB,
                                             max_concurrency=2) as writer:
            async for piece in chunks(64, MiB):
                await writer.write(piece)
                await asyncio.sleep(0.01)
                if fail and piece == chunk(11, MiB):
                    raise RuntimeError("relay broke")

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="relay broke"):
            await write("failed", fail=True)
        task = asyncio.create_task(write("cancelled", fail=False))
        await asyncio.sleep(0.5)  # past the first part
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await write("written", fail=False)

    run(scenario())
    assert pending_uploads(ceph, s3_bucket) == []
    assert keys(ceph, s3_bucket) == ["written"]
    head = ceph.client().head_object(Bucket=s3_bucket, Key="written")
    assert head["ContentLength"] == 64 * MiB and head["ETag"].endswith('-13"')


# -- ranged GET --------------------------------------------------------------------------------


def test_ranged_get(ceph: Ceph, s3_bucket: str) -> None:
    body = data(4, 256 * 1024)
    size = len(body)
    ceph.client().put_object(Bucket=s3_bucket, Key="r", Body=body)
    store = obstore_store(ceph, s3_bucket)

    async def scenario() -> None:
        # obstore: as a stream, a bounded range
        got = await obstore.get_async(store, "r", options={"range": (100, 300_100)})
        assert got.range == (100, 300_100)
        pieces = [bytes(p) async for p in got.stream(min_chunk_size=64 * 1024)]
        assert b"".join(pieces) == body[100:300_100]
        # obstore: suffix and open-ended ranges, and get_range
        got = await obstore.get_async(store, "r", options={"range": {"suffix": 10}})
        assert bytes(await got.bytes_async()) == body[-10:]
        got = await obstore.get_async(store, "r", options={"range": {"offset": size - 7}})
        assert bytes(await got.bytes_async()) == body[-7:]
        assert bytes(await obstore.get_range_async(store, "r", start=5, length=5)) == body[5:10]

        async with aiobotocore_client(ceph) as s3:
            for header, expected, content_range in (
                ("bytes=100-199", body[100:200], f"bytes 100-199/{size}"),
                ("bytes=-10", body[-10:], f"bytes {size - 10}-{size - 1}/{size}"),
                (f"bytes={size - 7}-", body[-7:], f"bytes {size - 7}-{size - 1}/{size}"),
            ):
                resp = await s3.get_object(Bucket=s3_bucket, Key="r", Range=header)
                assert resp["ResponseMetadata"]["HTTPStatusCode"] == 206
                assert resp["ContentRange"] == content_range
                assert await resp["Body"].read() == expected
            with pytest.raises(ClientError) as e:
                await s3.get_object(Bucket=s3_bucket, Key="r", Range=f"bytes={size}-")
            assert error_code(e.value) == "InvalidRange"

    run(scenario())


# -- presigned URLs ----------------------------------------------------------------------------


async def presign_obstore(ceph: Ceph, bucket: str, key: str, seconds: int) -> str:
    return await obstore.sign_async(obstore_store(ceph, bucket), "GET", key,
                                    timedelta(seconds=seconds))


async def presign_aiobotocore(ceph: Ceph, bucket: str, key: str, seconds: int) -> str:
    async with aiobotocore_client(ceph) as s3:  # signature_version="s3v4" (support.s3)
        url: str = await s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds)
        return url


PRESIGNERS: dict[str, Callable[[Ceph, str, str, int], Awaitable[str]]] = {
    "obstore": presign_obstore,
    "aiobotocore": presign_aiobotocore,
}


@pytest.mark.parametrize("client", sorted(PRESIGNERS))
def test_presigned_get_is_host_bound_and_expires(ceph: Ceph, s3_bucket: str,
                                                 client: str) -> None:
    presign = PRESIGNERS[client]
    body = data(1, 4096)
    ceph.client().put_object(Bucket=s3_bucket, Key="p/q", Body=body)
    url = run(presign(ceph, s3_bucket, "p/q", 60))
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-SignedHeaders=host" in url

    with httpx.Client(timeout=TIMEOUT, trust_env=False) as http:
        r = http.get(url)
        assert r.status_code == 200 and r.content == body
        r = http.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == body[10:20]
        # the same URL presented under another host name: the signature no longer matches
        r = http.get(url, headers={"Host": f"localhost:{ceph.rgw_port}"})
        assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
        # another key under the same signature
        assert http.get(url.replace("/p/q?", "/p/r?")).status_code == 403
        # without the signature: anonymous, refused
        assert http.get(url.split("?")[0]).status_code == 403
        # valid for 3 s (X-Amz-Date counts whole seconds, so 2 to 3 s): works, then expires;
        # signed again if a busy machine took 2 s to get from signing to the GET
        for _ in range(3):
            before = time.time()
            short = run(presign(ceph, s3_bucket, "p/q", 3))
            signed_at = time.time()
            status = http.get(short).status_code
            if status == 200 or time.time() - before < 2:
                break
        assert status == 200
        time.sleep(max(0.0, signed_at + 4.2 - time.time()))
        r = http.get(short)
        assert r.status_code == 403 and b"AccessDenied" in r.content


# -- conditional puts --------------------------------------------------------------------------


def test_put_if_absent(ceph: Ceph, s3_bucket: str) -> None:
    store = obstore_store(ceph, s3_bucket)

    async def scenario() -> None:
        await obstore.put_async(store, "once", b"first", mode="create")
        with pytest.raises(AlreadyExistsError):
            await obstore.put_async(store, "once", b"second", mode="create")
        async with aiobotocore_client(ceph) as s3:
            with pytest.raises(ClientError) as e:
                await s3.put_object(Bucket=s3_bucket, Key="once", Body=b"third",
                                    IfNoneMatch="*")
            assert error_code(e.value) == "PreconditionFailed"
            got = await s3.get_object(Bucket=s3_bucket, Key="once")
            assert await got["Body"].read() == b"first"

    run(scenario())


def test_radosgw_ignores_if_none_match_on_complete_multipart(ceph: Ceph, s3_bucket: str) -> None:
    """radosgw 16 completes a multipart upload over an existing object even with
    `If-None-Match: *`: a multipart commit is no way to settle a race."""
    async def scenario() -> bytes:
        async with aiobotocore_client(ceph) as s3:
            await s3.put_object(Bucket=s3_bucket, Key="k", Body=b"first")
            up = await s3.create_multipart_upload(Bucket=s3_bucket, Key="k")
            r = await s3.upload_part(Bucket=s3_bucket, Key="k", UploadId=up["UploadId"],
                                     PartNumber=1, Body=b"second")
            await s3.complete_multipart_upload(
                Bucket=s3_bucket, Key="k", UploadId=up["UploadId"], IfNoneMatch="*",
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": r["ETag"]}]})
            got = await s3.get_object(Bucket=s3_bucket, Key="k")
            body: bytes = await got["Body"].read()
            return body

    assert run(scenario()) == b"second"


# -- Redis -------------------------------------------------------------------------------------


def test_redis_blocking_pool(redis_url: str) -> None:
    async def scenario() -> list[Any]:
        pool = redis.asyncio.BlockingConnectionPool.from_url(redis_url, max_connections=4,
                                                             timeout=10)
        client = redis.asyncio.Redis(connection_pool=pool)
        try:
            assert await client.set("k", b"v", nx=True)
            assert not await client.set("k", b"w", nx=True)
            assert await client.get("k") == b"v"
            # more concurrent commands than connections: they wait for one, none fails
            await asyncio.gather(*(client.set(f"n{i}", str(i)) for i in range(50)))
            return list(await asyncio.gather(*(client.get(f"n{i}") for i in range(50))))
        finally:
            await client.aclose()
            await pool.aclose()

    assert run(scenario()) == [str(i).encode() for i in range(50)]


def test_redis_flushall(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.command("SET", "left", "behind") == b"+OK"
    assert redis_server.command("DBSIZE") == b":1"
    redis_server.flushall()
    assert redis_server.command("DBSIZE") == b":0"
    assert redis_server.ping()


def test_redis_server_restarts_empty_and_stops(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        server.command("SET", "a", "1")
        assert server.proc is not None
        pid = server.proc.pid
        server.stop()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        server.start()
        assert server.command("DBSIZE") == b":0"
        port = server.port
    assert server.proc is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
