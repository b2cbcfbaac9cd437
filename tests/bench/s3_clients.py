#!/usr/bin/env python3
"""Compare two Python S3 clients, obstore (the Rust object_store bindings) and aiobotocore,
against the test radosgw (`support.ceph`), in one run, on the same data, over loopback.

    python tests/bench/s3_clients.py [--runs N] [--size-mib N] [--part-mib N] [--quick]

Measured, alternating the clients (the order reverses every round), medians over the runs:

- upload MB/s of one object of unknown length streamed from an async generator (1 MiB
  chunks) as a multipart upload of `--part-mib` parts, at most `--concurrency` parts in
  flight, with obstore's `put_async` (pulls from the iterator), obstore's
  `open_writer_async` ("obstore-writer": the caller pushes each chunk) and aiobotocore
  (`aiobotocore_put_stream` below: multipart and abort are the caller's to write);
- download MB/s, streaming the whole object (1 MiB pieces), bytes counted;
- peak extra RSS of the client process during each (VmHWM after, minus VmRSS before, with
  the high-water mark reset first through /proc/self/clear_refs);
- CPU seconds (user + system, all threads) per GB moved.

Every measurement runs in a fresh subprocess, so one client's memory never counts against
another's; the event loop is uvloop's, as in the mirror. Each upload is checked (size, part
count and bytes at three offsets) and each download must return every byte. Then the
capabilities that matter to the mirror are tried for real with each client: streaming
multipart from an async iterator with abort on failure and on cancellation, presigned SigV4
GET URLs (host-bound, short expiry), ranged GETs and put-if-absent. MB are 10^6 bytes.

About a minute on an idle 2-core machine (two when it is busy); no new round starts after
`--max-seconds`. `--quick` (64 MiB, 2 rounds) takes about 25 s. Not a pass/fail test: the
exit status is 1 only if a measurement could not be made or was wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))

from support import s3 as s3support  # noqa: E402
from support.ceph import Ceph, GiB, missing_binaries  # noqa: E402
from support.procs import clean_env  # noqa: E402
from support.s3 import S3Account  # noqa: E402

MiB = 1 << 20
# obstore-writer: obstore's push-style open_writer_async (its downloads are obstore's own)
CLIENTS = ("obstore", "obstore-writer", "aiobotocore")
DOWNLOADERS = ("obstore", "aiobotocore")
SOURCE_CHUNK = MiB  # what the async generator yields, like a relayed HTTP body
SEED = 20240601


# -- the data ----------------------------------------------------------------------------------


def source_block() -> bytes:
    """17 MiB of seeded random bytes; chunk i of the object starts at i * SOURCE_CHUNK modulo
    16 MiB in it, so parts differ and any byte of the object can be recomputed."""
    return random.Random(SEED).randbytes(17 * MiB)


def expected(block: bytes, offset: int, length: int) -> bytes:
    out = bytearray()
    while length > 0:
        i, within = divmod(offset, SOURCE_CHUNK)
        start = (i * SOURCE_CHUNK) % (16 * MiB) + within
        take = min(length, SOURCE_CHUNK - within)
        out += block[start:start + take]
        offset += take
        length -= take
    return bytes(out)


async def generate(block: bytes, size: int, fail_after: int | None = None,
                   ) -> AsyncIterator[bytes]:
    """`size` bytes in SOURCE_CHUNK pieces, each a fresh bytes object (as a network source
    would hand them out); raises after `fail_after` bytes if given."""
    sent = 0
    while sent < size:
        if fail_after is not None and sent >= fail_after:
            raise RuntimeError("source failed")
        n = min(SOURCE_CHUNK, size - sent)
        yield expected(block, sent, n)
        sent += n
        await asyncio.sleep(0)


# -- the clients -------------------------------------------------------------------------------


def obstore_store(bucket: str) -> Any:
    return s3support.obstore_store(S3Account.from_env(), bucket, client_options={"timeout": "300s"})


def aiobotocore_client(**config: Any) -> contextlib.AbstractAsyncContextManager[Any]:
    return s3support.aiobotocore_client(S3Account.from_env(), max_pool_connections=16,
                                 read_timeout=300, **config)


async def aiobotocore_put_stream(s3: Any, bucket: str, key: str,
                                 source: AsyncIterable[bytes], *, part_size: int,
                                 concurrency: int) -> None:
    """Multipart upload of an async iterator of unknown length, at most `concurrency` parts
    in flight; on any failure (the source, a part, cancellation) the upload is aborted."""
    upload_id = (await s3.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]
    etags: dict[int, str] = {}
    number = 0
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def send(number: int, body: bytes) -> None:
        try:
            r = await s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                     PartNumber=number, Body=body)
            etags[number] = r["ETag"]
        finally:
            slots.release()

    async def submit(body: bytes) -> None:
        nonlocal number
        await slots.acquire()
        for done in [t for t in tasks if t.done()]:
            tasks.discard(done)
            done.result()  # a failed part fails the upload now
        number += 1
        tasks.add(asyncio.create_task(send(number, body)))

    try:
        pieces: list[bytes] = []
        held = 0
        async for piece in source:
            pieces.append(piece)
            held += len(piece)
            if held >= part_size:
                data = b"".join(pieces)
                pieces, held = [], 0
                while len(data) >= part_size:
                    await submit(data[:part_size] if len(data) > part_size else data)
                    data = data[part_size:]
                if data:
                    pieces, held = [data], len(data)
        if pieces or number == 0:
            await submit(b"".join(pieces))
        await asyncio.gather(*tasks)
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        await s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                           MultipartUpload={"Parts": parts})
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.shield(s3.abort_multipart_upload(Bucket=bucket, Key=key,
                                                           UploadId=upload_id))
        raise


# -- one measurement, in its own process -------------------------------------------------------


def memory_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(op: Callable[[], Awaitable[int]]) -> dict[str, float]:
    """Run `op` (returns bytes moved) with the RSS high-water mark reset first."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = memory_kib()["VmRSS"]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    moved = await op()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"bytes": moved, "seconds": seconds, "cpu": cpu,
            "peak_extra_mib": (memory_kib()["VmHWM"] - before) / 1024}


async def worker(args: argparse.Namespace) -> dict[str, float]:
    block = source_block()
    size: int = args.size_mib * MiB
    part: int = args.part_mib * MiB
    if args.client in ("obstore", "obstore-writer"):
        import obstore

        store = obstore_store(args.bucket)
        await obstore.list_with_delimiter_async(store)  # warm the connection pool

        async def upload() -> int:
            if args.client == "obstore":
                await obstore.put_async(store, args.key, generate(block, size), chunk_size=part,
                                        max_concurrency=args.concurrency)
                return size
            async with obstore.open_writer_async(store, args.key, buffer_size=part,
                                                 max_concurrency=args.concurrency) as writer:
                async for piece in generate(block, size):
                    await writer.write(piece)
            return size

        async def download() -> int:
            got = await obstore.get_async(store, args.key)
            n = 0
            async for piece in got.stream(min_chunk_size=SOURCE_CHUNK):
                n += len(piece)
            return n

        return await measure(upload if args.op == "upload" else download)

    async with aiobotocore_client() as s3:
        await s3.list_objects_v2(Bucket=args.bucket, MaxKeys=1)  # warm the connection pool

        async def upload() -> int:
            await aiobotocore_put_stream(s3, args.bucket, args.key, generate(block, size),
                                         part_size=part, concurrency=args.concurrency)
            return size

        async def download() -> int:
            got = await s3.get_object(Bucket=args.bucket, Key=args.key)
            n = 0
            async with got["Body"] as body:
                async for piece in body.iter_chunks(SOURCE_CHUNK):
                    n += len(piece)
            return n

        return await measure(upload if args.op == "upload" else download)


def run_loop(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


# -- the parent: cluster, rounds, checks, table ------------------------------------------------


@dataclass
class Run:
    client: str
    op: str
    bytes: int
    seconds: float
    cpu: float
    peak_extra_mib: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds

    @property
    def cpu_per_gb(self) -> float:
        return self.cpu / (self.bytes / 1e9)


class Failed(Exception):
    pass


def spawn_measurement(ceph: Ceph, args: argparse.Namespace, client: str, op: str,
                      key: str) -> Run:
    argv = [sys.executable, __file__, "--worker", "--client", client, "--op", op,
            "--bucket", args.bucket, "--key", key, "--size-mib", str(args.size_mib),
            "--part-mib", str(args.part_mib), "--concurrency", str(args.concurrency)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                       env=clean_env(ceph.env()), check=False)
    if r.returncode != 0:
        raise Failed(f"{client} {op} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    run = Run(client, op, int(out["bytes"]), out["seconds"], out["cpu"], out["peak_extra_mib"])
    if run.bytes != args.size_mib * MiB:
        raise Failed(f"{client} {op}: moved {run.bytes} bytes, expected {args.size_mib * MiB}")
    return run


def check_object(ceph: Ceph, args: argparse.Namespace, key: str, block: bytes) -> None:
    s3 = ceph.client()
    size = args.size_mib * MiB
    head = s3.head_object(Bucket=args.bucket, Key=key)
    parts = -(-size // (args.part_mib * MiB))
    if head["ContentLength"] != size or not head["ETag"].endswith(f'-{parts}"'):
        raise Failed(f"{key}: {head['ContentLength']} bytes, ETag {head['ETag']}; expected"
                     f" {size} bytes in {parts} parts")
    for offset in (0, size // 2 - 1000, size - 4096):
        got = s3.get_object(Bucket=args.bucket, Key=key,
                            Range=f"bytes={offset}-{offset + 4095}")["Body"].read()
        if got != expected(block, offset, 4096):
            raise Failed(f"{key}: wrong bytes at offset {offset}")


def median(runs: Sequence[Run], attr: str) -> float:
    return statistics.median(float(getattr(r, attr)) for r in runs)


def measure_all(ceph: Ceph, args: argparse.Namespace, deadline: float) -> list[Run]:
    block = source_block()
    runs: list[Run] = []
    for rnd in range(args.runs):
        if time.monotonic() > deadline:
            print(f"time budget spent: stopping after {rnd} rounds", file=sys.stderr)
            break
        order = CLIENTS if rnd % 2 == 0 else CLIENTS[::-1]
        for client in order:
            key = f"bench/{client}-{rnd}"
            up = spawn_measurement(ceph, args, client, "upload", key)
            check_object(ceph, args, key, block)
            runs.append(up)
            line = (f"round {rnd + 1} {client:14} upload {up.mb_per_s:4.0f} MB/s"
                    f" (+{up.peak_extra_mib:3.0f} MiB, {up.cpu_per_gb:4.2f} CPU s/GB)")
            if client in DOWNLOADERS:
                down = spawn_measurement(ceph, args, client, "download", key)
                runs.append(down)
                line += (f"  download {down.mb_per_s:4.0f} MB/s (+{down.peak_extra_mib:3.0f}"
                         f" MiB, {down.cpu_per_gb:4.2f} CPU s/GB)")
            ceph.client().delete_object(Bucket=args.bucket, Key=key)
            print(line, file=sys.stderr)
    return runs


# -- capabilities, tried for real --------------------------------------------------------------


def pending(ceph: Ceph, bucket: str) -> list[Any]:
    uploads: list[Any] = ceph.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return uploads


def exists(ceph: Ceph, bucket: str, key: str) -> bool:
    contents = ceph.client().list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
    return any(o["Key"] == key for o in contents)


async def try_presigned(ceph: Ceph, url: str, short_url: str, body: bytes) -> str:
    """Check a 60 s and a 1 s presigned GET URL: good (also with Range), host-bound,
    expiring."""
    import httpx

    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        plain = await http.get(url)
        ranged = await http.get(url, headers={"Range": "bytes=1-2"})
        other_host = await http.get(url, headers={"Host": f"localhost:{ceph.rgw_port}"})
        signed_at = time.time()
        await asyncio.sleep(max(0.0, signed_at + 2.2 - time.time()))
        expired = (await http.get(short_url)).status_code
    sigv4 = "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    good = (plain.status_code == 200 and plain.content == body and ranged.status_code == 206
            and ranged.content == body[1:3])
    verdict = "yes" if sigv4 and good and other_host.status_code == 403 and expired == 403 \
        else "NO"
    return (f"{verdict}: {'SigV4' if sigv4 else 'SigV2'}; GET {plain.status_code}, with Range"
            f" {ranged.status_code}, other Host {other_host.status_code}, expired {expired}")


async def capabilities(ceph: Ceph, bucket: str) -> dict[str, dict[str, str]]:
    import obstore
    from botocore.exceptions import ClientError
    from obstore.exceptions import AlreadyExistsError

    block = source_block()
    store = obstore_store(bucket)
    caps: dict[str, dict[str, str]] = {c: {} for c in CLIENTS}
    body = b"presigned body"
    await obstore.put_async(store, "cap/p", body)

    # streaming multipart with abort on failure, and on cancellation
    def upload(client: str, key: str, source: AsyncIterable[bytes]) -> Awaitable[Any]:
        if client == "obstore":
            return obstore.put_async(store, key, source, chunk_size=5 * MiB, max_concurrency=2)

        async def write() -> None:
            if client == "obstore-writer":
                async with obstore.open_writer_async(store, key, buffer_size=5 * MiB,
                                                     max_concurrency=2) as writer:
                    async for piece in source:
                        await writer.write(piece)
            else:
                async with aiobotocore_client() as s3:
                    await aiobotocore_put_stream(s3, bucket, key, source, part_size=5 * MiB,
                                                 concurrency=2)
        return write()

    async def leftovers(key: str) -> str:
        for _ in range(20):  # up to 2 s for an abort running in the background
            left = [u for u in pending(ceph, bucket) if u["Key"] == key]
            if not left and not exists(ceph, bucket, key):
                return "nothing left"
            await asyncio.sleep(0.1)
        for up in left:
            ceph.client().abort_multipart_upload(Bucket=bucket, Key=up["Key"],
                                                 UploadId=up["UploadId"])
        return f"{len(left)} upload(s) left pending" if left else "an object was made"

    async def slow(total: int) -> AsyncIterator[bytes]:
        async for piece in generate(block, total):
            yield piece
            await asyncio.sleep(0.02)

    how = {"obstore": "built in (put_async)", "obstore-writer": "built in (open_writer_async)",
           "aiobotocore": "hand-written (aiobotocore_put_stream)"}
    for client in CLIENTS:
        key = f"cap/broken-{client}"
        try:
            await upload(client, key, generate(block, 24 * MiB, 17 * MiB))
            raised = "no error raised"
        except RuntimeError as e:
            raised = f"{e}: raised"
        left = await leftovers(key)
        caps[client]["stream multipart from async iterator, abort on failure"] = (
            f"{'yes' if left == 'nothing left' else 'NO'}, {how[client]}; {raised}, {left}")
        key = f"cap/cancelled-{client}"
        task = asyncio.ensure_future(upload(client, key, slow(64 * MiB)))
        await asyncio.sleep(0.6)  # past the first 5 MiB part
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        left = await leftovers(key)
        caps[client]["abort when the upload is cancelled (task.cancel, wait_for)"] = (
            f"{'yes' if left == 'nothing left' else 'NO'}: {left}")

    # presigned GET (and the rest: obstore-writer is the same library as obstore)
    url = await obstore.sign_async(store, "GET", "cap/p", timedelta(seconds=60))
    short = await obstore.sign_async(store, "GET", "cap/p", timedelta(seconds=1))
    caps["obstore"]["presigned GET, host-bound SigV4, short expiry"] = await try_presigned(
        ceph, url, short, body)
    async with aiobotocore_client() as s3:
        params = {"Bucket": bucket, "Key": "cap/p"}
        url = await s3.generate_presigned_url("get_object", Params=params, ExpiresIn=60)
        short = await s3.generate_presigned_url("get_object", Params=params, ExpiresIn=1)
    v4 = await try_presigned(ceph, url, short, body)
    async with aiobotocore_client(signature_version=None) as s3:  # botocore's default
        url = await s3.generate_presigned_url("get_object", Params=params, ExpiresIn=60)
        short = await s3.generate_presigned_url("get_object", Params=params, ExpiresIn=1)
    default = await try_presigned(ceph, url, short, body)
    caps["aiobotocore"]["presigned GET, host-bound SigV4, short expiry"] = (
        f"{v4} (with signature_version='s3v4'; by default: {default})")

    # ranged GETs
    await obstore.put_async(store, "cap/r", expected(block, 0, MiB))
    want = expected(block, 0, MiB)
    got = await obstore.get_async(store, "cap/r", options={"range": (10, 1010)})
    streamed = b"".join([bytes(p) async for p in got.stream(min_chunk_size=256)])
    suffix = await obstore.get_async(store, "cap/r", options={"range": {"suffix": 100}})
    offset = await obstore.get_async(store, "cap/r", options={"range": {"offset": MiB - 5}})
    ok = (streamed == want[10:1010] and bytes(await suffix.bytes_async()) == want[-100:]
          and bytes(await offset.bytes_async()) == want[-5:])
    caps["obstore"]["ranged GET (bounded, suffix, open-ended)"] = (
        f"{'yes' if ok else 'NO'}: get_async(options={{'range': ...}}), streams")
    async with aiobotocore_client() as s3:
        results = []
        for header, part in (("bytes=10-1009", want[10:1010]), ("bytes=-100", want[-100:]),
                             (f"bytes={MiB - 5}-", want[-5:])):
            r = await s3.get_object(Bucket=bucket, Key="cap/r", Range=header)
            results.append(await r["Body"].read() == part)
    caps["aiobotocore"]["ranged GET (bounded, suffix, open-ended)"] = (
        f"{'yes' if all(results) else 'NO'}: get_object(Range=...), streams")

    # put if absent
    await obstore.put_async(store, "cap/once", b"1", mode="create")
    try:
        await obstore.put_async(store, "cap/once", b"2", mode="create")
        single = "NO: overwrote"
    except AlreadyExistsError:
        single = "yes: AlreadyExistsError"
    caps["obstore"]["put if absent, single PUT"] = single + " (mode='create')"
    caps["obstore"]["put if absent, multipart"] = (
        "no: mode='create' forces one PUT with the whole body in memory")
    async with aiobotocore_client() as s3:
        try:
            await s3.put_object(Bucket=bucket, Key="cap/once", Body=b"3", IfNoneMatch="*")
            single = "NO: overwrote"
        except ClientError as e:
            single = f"yes: {e.response['Error']['Code']}"
        caps["aiobotocore"]["put if absent, single PUT"] = single + " (IfNoneMatch='*')"
        up = await s3.create_multipart_upload(Bucket=bucket, Key="cap/once")
        r = await s3.upload_part(Bucket=bucket, Key="cap/once", UploadId=up["UploadId"],
                                 PartNumber=1, Body=b"4")
        try:
            await s3.complete_multipart_upload(
                Bucket=bucket, Key="cap/once", UploadId=up["UploadId"], IfNoneMatch="*",
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": r["ETag"]}]})
            multi = "sent, but radosgw 16 ignores it: overwrote"
        except ClientError as e:
            multi = f"yes: {e.response['Error']['Code']}"
            await s3.abort_multipart_upload(Bucket=bucket, Key="cap/once",
                                            UploadId=up["UploadId"])
        caps["aiobotocore"]["put if absent, multipart"] = (
            multi + " (IfNoneMatch='*' on CompleteMultipartUpload)")
    return caps


# -- report ------------------------------------------------------------------------------------


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(args: argparse.Namespace, runs: list[Run], caps: dict[str, dict[str, str]],
           startup: float, source_cpu_per_gb: float) -> str:
    def of(client: str, op: str) -> list[Run]:
        return [r for r in runs if r.client == client and r.op == op]

    n = len(of("aiobotocore", "upload"))
    rows = [[f"measure (median of {n})", *CLIENTS, "obstore / aiobotocore",
             "obstore-writer / aiobotocore"]]
    for label, op, attr, fmt in (
        ("upload MB/s", "upload", "mb_per_s", "{:.0f}"),
        ("download MB/s", "download", "mb_per_s", "{:.0f}"),
        ("peak extra RSS uploading, MiB", "upload", "peak_extra_mib", "{:.0f}"),
        ("peak extra RSS downloading, MiB", "download", "peak_extra_mib", "{:.0f}"),
        ("CPU s/GB uploading", "upload", "cpu_per_gb", "{:.2f}"),
        ("CPU s/GB downloading", "download", "cpu_per_gb", "{:.2f}"),
    ):
        values = {c: median(of(c, op), attr) if of(c, op) else None for c in CLIENTS}
        base = values["aiobotocore"]

        def ratio(v: float | None, base: float | None = base) -> str:
            return f"{v / base:.2f}" if v is not None and base else "-"

        rows.append([label, *(fmt.format(values[c]) if values[c] is not None else "-"
                              for c in CLIENTS),
                     ratio(values["obstore"]), ratio(values["obstore-writer"])])
    columns = [(c, op) for c in CLIENTS for op in ("upload", "download") if of(c, op)]
    raw = [["run", *(f"{c} {op}" for c, op in columns)]]
    for i in range(n):
        raw.append([str(i + 1), *(
            f"{r.mb_per_s:.0f} MB/s +{r.peak_extra_mib:.0f} MiB {r.cpu_per_gb:.2f} s/GB"
            if len(of(c, op)) > i and (r := of(c, op)[i]) else "-" for c, op in columns)])
    cap_rows = [["capability", *CLIENTS]]
    for what in caps["obstore"]:
        cap_rows.append([what, *(caps[c].get(what, "as obstore" if c == "obstore-writer" else "-")
                                 for c in CLIENTS)])
    versions = ", ".join(f"{d} {version(d)}" for d in (
        "obstore", "aiobotocore", "botocore", "aiohttp", "uvloop"))
    ceph_version = subprocess.run(["ceph", "--version"], capture_output=True, text=True,
                                  check=False).stdout.split("(")[0].strip()
    return "\n".join([
        f"# S3 clients against radosgw, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"{args.size_mib} MiB object of unknown length from an async generator (1 MiB chunks),"
        f" {args.part_mib} MiB parts, at most {args.concurrency} in flight; downloads"
        " streamed in 1 MiB pieces; each measurement in a fresh process; clients alternate."
        f" The generator alone costs {source_cpu_per_gb:.2f} CPU s/GB (in the upload figures).",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python"
        f" {platform.python_version()}; {ceph_version} (started in {startup:.1f} s).",
        f"Versions: {versions}.",
        "",
        table(rows),
        "",
        "Runs:",
        "",
        table(raw),
        "",
        table(cap_rows),
    ])


async def source_cost(size: int) -> float:
    """CPU seconds per GB of just producing the data."""
    block = source_block()
    cpu0 = cpu_seconds()
    async for _ in generate(block, size):
        pass
    return (cpu_seconds() - cpu0) / (size / 1e9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--size-mib", type=int, default=400, help="object size (default 400)")
    parser.add_argument("--part-mib", type=int, default=16, help="part size (default 16)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="parts in flight (default 4)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 rounds")
    parser.add_argument("--max-seconds", type=float, default=240,
                        help="start no new round after this long (default 240)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=("upload", "download"), help=argparse.SUPPRESS)
    parser.add_argument("--bucket", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_loop(worker(args))))
        return 0
    if args.quick:
        args.size_mib, args.runs = 64, 2
    missing = missing_binaries()
    if missing:
        print(f"missing: {', '.join(missing)} (tests/run installs them)", file=sys.stderr)
        return 1
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="s3bench-", dir="/tmp"))
    try:
        with Ceph(work / "ceph", osd_size=32 * GiB, keep_data=args.keep) as ceph:
            ceph.create_bucket(args.bucket)
            print(f"ceph up in {ceph.startup_seconds:.1f} s at {ceph.endpoint}", file=sys.stderr)
            os.environ.update(ceph.env())
            runs = measure_all(ceph, args, started + args.max_seconds)
            caps = run_loop(capabilities(ceph, args.bucket))
            ceph.delete_bucket(args.bucket)
            rss = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in ceph.rss_bytes().items())
            print(f"cluster RSS at the end: {rss}", file=sys.stderr)
            source = run_loop(source_cost(args.size_mib * MiB))
            print(report(args, runs, caps, ceph.startup_seconds, source))
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
        else:
            print(f"kept {work}", file=sys.stderr)
    print(f"total {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
