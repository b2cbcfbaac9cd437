#!/usr/bin/env python3
"""Benchmark the mirror on an object store (Ceph's radosgw, with Redis for metadata) against
the mirror on local disk and against radosgw itself, in one run, on the same data, over
loopback.

    python tests/bench/cluster.py [--quick] [--keep] [--profile]

Starts a single-node Ceph with radosgw (`support.ceph`), two redis-servers (one for the
long-lived replicas, one flushed before every cold run) and an upstream docker-registry
without auth, pushes two images of one random, incompressible, uncompressed tar layer each
into it (256 MiB and 1 GiB; --quick: 32 and 128 MiB) and measures, with one curl client at a
time, every server with one worker process and the background scrub off:

1. cold throughput: a fresh replica on S3 (`--storage s3://bench/cold-N --redis ...`, a new
   bucket prefix and an empty Redis each run) against a fresh mirror on local disk (an empty
   cache directory each run), alternating; for reference, the upstream registry's own GET and
   a plain PUT of the same blob to radosgw (curl -T to a presigned URL: the bucket's own
   write speed);
2. hit throughput: through a replica on S3 without local copies (`hot_cache_size` 0: the
   bytes come from radosgw through the mirror), through a replica on S3 with a hot tier
   (`hot_cache_size` 8 GiB: local copies), and through the mirror on local disk;
3. hits through a replica with `--redirect` (curl -L follows the 307 to the presigned URL)
   against radosgw direct (a presigned GET the script makes), and the mirror's time to answer
   the redirect itself (curl without -L; and wrk for answers per second);
4. the mirror's CPU seconds per GB served in each mode: utime + stime (+ cutime + cstime) of
   the mirror's process tree from /proc, before and after each run.

For information: the same cold GET through a replica told to send its uploads unsigned
(AWS_UNSIGNED_PAYLOAD=true, what it does by default over https), the mirror's CPU by thread
(event loop, worker threads hashing and writing, obstore's runtime), radosgw's and the
OSD's CPU seconds per GB in each mode, Redis commands per blob GET and per redirect, the
peak RSS of the replica (and of the local mirror) during the cold runs, and how much CPU
other processes of the machine used meanwhile (/proc/stat less this run's process tree).

Alternating runs, medians; MB = 10^6 bytes. Prints the table and the raw runs and appends a
section to tests/bench/results.md (what is there stays). `--profile` also samples a replica
with py-spy (if installed) during one more cold GET and one more hit of the big blob and
keeps the stacks in the work directory. About 6 minutes on 2 cores shared with other work
(7 with --profile); --quick about 1. Exit status 0 when every measurement was made, 1 if one
failed or was wrong (a short body, an upstream GET on a hit, a missing object), 130 on
Ctrl-C; everything started is stopped in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
for entry in (REPO_ROOT / "tests", BENCH_DIR):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import common  # noqa: E402
from common import (  # noqa: E402
    TICK,
    BenchError,
    RssSampler,
    Runner,
    abort_on,
    append_report,
    cpu_seconds,
    loadavg,
    log,
    machine,
    packages,
    print_results,
    process_tree,
    report_tail,
    show,
    show_ratio,
    tool_version,
    warn_if_busy,
)
from run import (  # noqa: E402  (the existing benchmark's helpers)
    CURL_FORMAT,
    BenchImage,
    CurlResult,
    build_image,
    parse_curl,
    push_image,
)
from support.ceph import Ceph, GiB, missing_binaries  # noqa: E402
from support.procs import MirrorProc, clean_env  # noqa: E402
from support.redisd import RedisServer  # noqa: E402
from support.registry import Registry  # noqa: E402

MiB = 1 << 20
UPSTREAM_NAME = "up"
BUCKET = "bench"
HOT_CACHE = "8GiB"
SETTLE = 0.3  # seconds after a transfer before the CPU counters are read again
MODES = ("s3", "s3-hot", "local", "redirect", "direct")


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    layer_size: int
    big_size: int
    cold_runs: dict[str, int]  # per blob ("layer", "big")
    hit_runs: int
    answer_runs: int  # curl runs timing the redirect answer
    wrk_seconds: int
    hard_limit_s: int

    @staticmethod
    def make(quick: bool) -> Config:
        if quick:
            return Config(True, 32 * MiB, 128 * MiB, {"layer": 3, "big": 2}, 3, 11, 2, 300)
        return Config(False, 256 * MiB, 1024 * MiB, {"layer": 3, "big": 3}, 5, 21, 3, 900)


# -- measuring ------------------------------------------------------------------------------


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (its role, utime + stime)} of every thread of `pid`: the event loop (the main
    thread), obstore's runtime (tokio threads) and the rest (asyncio.to_thread: hashing and
    disk writes of fills, reads of partials)."""
    out: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue
            role = ("event loop" if int(tid) == pid else "obstore (tokio)"
                    if comm.startswith("tokio") else "worker threads")
            out[int(tid)] = (role, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def thread_delta(before: dict[int, tuple[str, float]],
                 after: dict[int, tuple[str, float]]) -> dict[str, float]:
    roles: dict[str, float] = {"event loop": 0.0, "worker threads": 0.0, "obstore (tokio)": 0.0}
    for tid, (role, seconds) in after.items():
        roles[role] += seconds - before.get(tid, (role, 0.0))[1]
    return {k: round(v, 3) for k, v in roles.items()}


def machine_busy() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq + steal
    return busy / TICK, (busy + idle + iowait) / TICK


class MachineLoad:
    """CPU used by processes other than this run's own tree, over a span of time."""

    def __init__(self) -> None:
        self.busy0, self.all0 = machine_busy()
        self.ours0 = cpu_seconds(process_tree(os.getpid()))
        self.wall0 = time.monotonic()

    def report(self) -> dict[str, float]:
        busy, _ = machine_busy()
        ours = cpu_seconds(process_tree(os.getpid()))
        wall = time.monotonic() - self.wall0
        other = max(0.0, (busy - self.busy0) - (ours - self.ours0))
        return {"wall_s": round(wall, 1), "machine_busy_cores": round(
            (busy - self.busy0) / wall, 2), "ours_cores": round((ours - self.ours0) / wall, 2),
            "other_processes_cores": round(other / wall, 2)}


@dataclass
class Sample:
    """One transfer: its speed and the CPU each party spent on it."""

    mode: str
    blob: str
    size: int
    seconds: float
    mbps: float
    cpu: dict[str, float]  # "mirror", "rgw", "osd": CPU seconds during the transfer
    threads: dict[str, float]  # the mirror's main process, by thread role

    def cpu_per_gb(self, who: str) -> float:
        return self.cpu[who] / (self.size / 1e9)

    def thread_per_gb(self, role: str) -> float:
        return self.threads.get(role, 0.0) / (self.size / 1e9)

    def brief(self) -> dict[str, Any]:
        out: dict[str, Any] = {"MBps": round(self.mbps, 1), "s": round(self.seconds, 3),
               **{f"cpu_{k}_s": round(v, 2) for k, v in self.cpu.items()}}
        if self.threads:
            out["mirror_threads_s"] = self.threads
        return out


def redis_commands(redis: RedisServer) -> int:
    """total_commands_processed of a redis-server (INFO stats, read whole)."""
    with socket.create_connection((redis.host, redis.port), timeout=5) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")
        data = b""
        while b"total_commands_processed:" not in data or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.partition(":")[2])
    raise BenchError("redis INFO stats: no total_commands_processed")


def curl(args: Sequence[str], max_time: float = 300) -> CurlResult:
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", str(int(max_time)), "-w",
            CURL_FORMAT, *args]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=max_time + 10,
                       env=clean_env())
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return parse_curl(p.stdout)


def curl_sha256(url: str, max_time: float = 300) -> tuple[int, str]:
    """(bytes, sha256:...) of the body at `url`, following redirects."""
    script = ('set -o pipefail; curl -sSfL --noproxy "*" --max-time "$2" "$1" | '
              'tee >(wc -c >&2) | sha256sum')
    p = subprocess.run(["bash", "-c", script, "bash", url, str(int(max_time))],
                       capture_output=True, text=True, timeout=max_time + 10, env=clean_env())
    if p.returncode != 0:
        raise BenchError(f"GET {url} failed ({p.returncode}): {p.stderr.strip()}")
    return int(p.stderr.split()[-1]), "sha256:" + p.stdout.split()[0]


def collapsed_summary(path: Path, top: int = 8) -> dict[str, Any]:
    """From a py-spy `raw` (collapsed stacks, --threads) file: for the event loop (the main
    thread) and the other Python threads, the share of samples and the hottest leaf frames,
    and the mirror's own functions by inclusive share. Threads without Python (obstore's
    runtime) are not sampled by py-spy: `thread_cpu` counts them."""
    if not path.exists():
        return {"error": f"{path} not written"}
    groups: dict[str, dict[str, int]] = {}
    mirror_frames: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        group = "event loop" if "MainThread" in parts[0] else "other threads"
        leaves = groups.setdefault(group, {})
        leaves[parts[-1]] = leaves.get(parts[-1], 0) + count
        total += count
        for frame in {p for p in parts[1:] if "(mirror/" in p}:
            mirror_frames[frame] = mirror_frames.get(frame, 0) + count

    def shares(items: dict[str, int]) -> list[str]:
        return [f"{n / max(1, total):.1%} {k[:120]}"
                for k, n in sorted(items.items(), key=lambda kv: -kv[1])[:top]]

    out: dict[str, Any] = {"samples": total}
    for group, leaves in sorted(groups.items()):
        out[f"{group}: share"] = f"{sum(leaves.values()) / max(1, total):.1%}"
        out[f"{group}: hottest leaves"] = shares(leaves)
    out["mirror functions, inclusive"] = shares(mirror_frames)
    return out


# -- the benchmark --------------------------------------------------------------------------


class Results(common.Results):
    head = ("metric", "value", "reference", "ratio")

    def add(self, metric: str, value: float | str | None,
            reference: float | str | None = None, ratio: float | None = None,
            fmt: str = "{:.1f}") -> None:
        self.rows.append([metric, show(value, fmt), show(reference, fmt), show_ratio(ratio)])


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else float("nan")


class Bench(Runner):
    def __init__(self, cfg: Config, work: Path, profile: bool) -> None:
        self.cfg = cfg
        self.work = work
        self.profile = profile
        self.res = Results()
        self.cleanups: list[Callable[[], object]] = []
        self.images: dict[str, BenchImage] = {}
        self.blob_files: dict[str, Path] = {}
        self.upstream: Registry | None = None
        self.ceph: Ceph | None = None
        self.redis: RedisServer | None = None  # the long-lived replicas'
        self.redis_cold: RedisServer | None = None  # flushed before every cold run
        self.servers: dict[str, MirrorProc] = {}  # long-lived, by mode
        self.samples: list[Sample] = []
        self.rss: dict[str, list[dict[str, float]]] = {"s3": [], "local": []}
        self.redis_per_hit: dict[str, list[int]] = {}  # Redis commands per blob GET
        self._n = 0

    # -- servers --

    def blob(self, key: str) -> tuple[str, str, int]:
        img = self.images[key]
        digest, size = img.layers[0]
        return img.info.repo, digest, size

    def mirror_env(self, s3: bool, hot: bool = False) -> dict[str, str]:
        assert self.ceph is not None
        env = {"MIRROR_SCRUB_RATE": "0"}
        if s3:
            env |= self.ceph.env()
        if hot:
            env["MIRROR_HOT_CACHE_SIZE"] = HOT_CACHE
        return env

    def start_mirror(self, label: str, *, prefix: str | None = None, redis: str = "",
                     hot: bool = False, args: Sequence[str] = (),
                     env: dict[str, str] | None = None) -> MirrorProc:
        """A mirror with one worker: on local disk (`prefix` None) or a replica on
        s3://BUCKET/PREFIX with metadata in `redis`."""
        assert self.upstream is not None
        self._n += 1
        extra = list(args)
        if prefix is not None:
            extra += ["--storage", f"s3://{BUCKET}/{prefix}", "--redis", redis]
        m = MirrorProc([(UPSTREAM_NAME, self.upstream.url)],
                       self.work / f"mirror-{self._n}-{label}-cache",
                       self.work / f"mirror-{self._n}-{label}-logs", args=extra,
                       env={**self.mirror_env(prefix is not None, hot), **(env or {})})
        self.cleanups.append(m.stop)
        m.start()
        deadline = time.monotonic() + 30
        assert m.proc is not None
        while "Application startup complete" not in m.proc.log_text():
            if time.monotonic() > deadline or not m.alive:
                raise BenchError(f"mirror {label} did not start: {m.proc.log_text()[-2000:]}")
            time.sleep(0.05)
        return m

    def discard_mirror(self, m: MirrorProc) -> None:
        m.stop()
        shutil.rmtree(m.cache_dir, ignore_errors=True)

    def setup(self) -> None:
        cfg = self.cfg
        started = time.monotonic()
        data = self.work / "layouts"
        specs = {"layer": ("bench/layer256", [cfg.layer_size]),
                 "big": ("bench/blob1g", [cfg.big_size])}
        for key, (repo, sizes) in specs.items():
            img = build_image(data, repo, "1", sizes)
            self.images[key] = img
            digest = img.layers[0][0]
            self.blob_files[key] = Path(img.info.layout) / "blobs" / "sha256" / digest[7:]
        log(f"built {sum(s for i in self.images.values() for _, s in i.layers) / MiB:.0f} MiB "
            f"of layers in {time.monotonic() - started:.1f} s")
        self.upstream = Registry(self.work, name="upstream")
        self.cleanups.append(self.upstream.stop)
        self.upstream.start()
        for img in self.images.values():
            push_image(img, self.upstream.host, timeout=600)
        self.ceph = Ceph(self.work / "ceph", osd_size=64 * GiB)
        ceph = self.ceph
        self.cleanups.append(lambda: ceph.__exit__(None, None, None))  # stop, remove data
        ceph.start()
        ceph.create_bucket(BUCKET)
        self.redis = RedisServer(self.work / "redis")
        self.cleanups.append(self.redis.stop)
        self.redis.start()
        self.redis_cold = RedisServer(self.work / "redis-cold")
        self.cleanups.append(self.redis_cold.stop)
        self.redis_cold.start()
        log(f"upstream {self.upstream.url}, radosgw {ceph.endpoint} (started in "
            f"{ceph.startup_seconds:.1f} s), redis {self.redis.url} and {self.redis_cold.url}; "
            f"set up in {time.monotonic() - started:.1f} s")

    # -- bucket --

    def object_key(self, prefix: str, digest: str) -> str:
        return f"{prefix}/blobs/sha256/{digest.removeprefix('sha256:')}"

    def object_size(self, key: str) -> int | None:
        assert self.ceph is not None
        s3 = self.ceph.client()
        try:
            return int(s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"])
        except s3.exceptions.ClientError:
            return None

    def presign(self, method: str, key: str) -> str:
        assert self.ceph is not None
        op = {"GET": "get_object", "PUT": "put_object"}[method]
        return str(self.ceph.client().generate_presigned_url(
            op, Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600))

    def drop_prefix(self, prefix: str) -> None:
        assert self.ceph is not None
        s3 = self.ceph.client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                 Prefix=prefix + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})

    # -- one measured transfer --

    def parties(self, mirror: MirrorProc | None) -> dict[str, list[int]]:
        assert self.ceph is not None and self.ceph.rgw and self.ceph.osd
        out = {"rgw": [self.ceph.rgw.pid], "osd": [self.ceph.osd.pid]}
        if mirror is not None and mirror.proc is not None:
            out["mirror"] = process_tree(mirror.proc.pid)
        return out

    def transfer(self, mode: str, blob: str, mirror: MirrorProc | None, args: Sequence[str],
                 upload: bool = False) -> Sample:
        """Run one curl (`args`: URL and options) and count everyone's CPU around it."""
        size = self.blob(blob)[2]
        body = 0 if upload else size
        who = self.parties(mirror)
        main = mirror.proc.pid if mirror is not None and mirror.proc is not None else None
        threads0 = thread_cpu(main) if main else {}
        before = {k: cpu_seconds(v) for k, v in who.items()}
        r = curl(args)
        time.sleep(SETTLE)
        who = {k: sorted(set(v) | set(self.parties(mirror).get(k, []))) for k, v in who.items()}
        cpu = {k: round(cpu_seconds(v) - before[k], 3) for k, v in who.items()}
        threads = thread_delta(threads0, thread_cpu(main)) if main else {}
        cpu.setdefault("mirror", 0.0)
        if r.code != 200 or r.size != body:
            raise BenchError(f"{mode} {blob}: {args[-1]} -> {r.code}, {r.size} bytes "
                             f"(want 200, {body})")
        # curl's speed is the download's; an upload's is its size over the whole time
        speed = size / r.seconds if upload else r.speed
        sample = Sample(mode, blob, size, r.seconds, speed / 1e6, cpu, threads)
        self.samples.append(sample)
        return sample

    def blob_url(self, m: MirrorProc, blob: str) -> str:
        repo, digest, _ = self.blob(blob)
        return f"{m.url}/v2/{repo}/blobs/{digest}"

    def upstream_gets(self, mark: int, digest: str) -> int:
        assert self.upstream is not None
        return sum(1 for r in self.upstream.requests(since=mark) if r.is_blob_get
                   and digest in r.path)

    # -- 1. cold --

    def cold_s3(self, blob: str, n: int, mode: str = "s3") -> Sample:
        """A cold GET through a fresh replica; `mode` "s3-unsigned": one told to send its
        uploads' bodies unsigned (AWS_UNSIGNED_PAYLOAD=true), as it does over https."""
        assert self.redis_cold is not None and self.upstream is not None
        self.redis_cold.flushall()
        prefix = f"cold-{n}"
        _, digest, size = self.blob(blob)
        env = {"AWS_UNSIGNED_PAYLOAD": "true"} if mode == "s3-unsigned" else {}
        m = self.start_mirror(f"cold-{mode}-{blob}", prefix=prefix, redis=self.redis_cold.url,
                              env=env)
        try:
            assert m.proc is not None
            mark = self.upstream.mark()
            with RssSampler(m.proc.pid) as rss:
                sample = self.transfer(f"cold-{mode}", blob, m, ["-o", "/dev/null",
                                                                  self.blob_url(m, blob)])
            if mode == "s3":
                self.rss["s3"].append({"largest_mib": round(rss.largest_mib, 1),
                                       "sum_mib": round(rss.peak_sum / 1024, 1)})
            stored = self.object_size(self.object_key(prefix, digest))
            if stored != size:
                raise BenchError(f"cold s3 {blob}: the bucket holds {stored} bytes, want {size}")
            gets = self.upstream_gets(mark, digest)
            if gets != 1:
                raise BenchError(f"cold s3 {blob}: {gets} upstream GETs, want 1")
        finally:
            self.discard_mirror(m)
            self.drop_prefix(prefix)
        return sample

    def cold_local(self, blob: str) -> Sample:
        m = self.start_mirror(f"cold-local-{blob}")
        try:
            assert m.proc is not None
            with RssSampler(m.proc.pid) as rss:
                sample = self.transfer("cold-local", blob, m, ["-o", "/dev/null",
                                                                self.blob_url(m, blob)])
            self.rss["local"].append({"largest_mib": round(rss.largest_mib, 1),
                                      "sum_mib": round(rss.peak_sum / 1024, 1)})
        finally:
            self.discard_mirror(m)
        return sample

    def upstream_direct(self, blob: str) -> Sample:
        assert self.upstream is not None
        repo, digest, _ = self.blob(blob)
        return self.transfer("upstream-direct", blob, None,
                             ["-o", "/dev/null", f"{self.upstream.url}/v2/{repo}/blobs/{digest}"])

    def radosgw_put(self, blob: str, n: int) -> Sample:
        """The bucket's own write speed: one PUT of the blob (curl -T, presigned)."""
        prefix = f"put-{n}"
        key = self.object_key(prefix, self.blob(blob)[1])
        try:
            sample = self.transfer("radosgw-put", blob, None, [
                "-o", "/dev/null", "-H", "Expect:", "-T", str(self.blob_files[blob]),
                self.presign("PUT", key)], upload=True)
            r_size = self.object_size(key)
            if r_size != sample.size:
                raise BenchError(f"radosgw PUT {blob}: stored {r_size} bytes")
        finally:
            self.drop_prefix(prefix)
        return sample

    def cold(self) -> None:
        n = 0
        for blob in ("layer", "big"):
            for i in range(self.cfg.cold_runs[blob]):
                # the unsigned payload (information only) in all but the last round of big
                unsigned = blob == "big" and i < max(1, self.cfg.cold_runs[blob] - 1)
                modes = ("s3", "local", "s3-unsigned") if unsigned else ("s3", "local")
                order = modes[i % len(modes):] + modes[:i % len(modes)]
                for mode in order:
                    n += 1
                    s = (self.cold_local(blob) if mode == "local"
                         else self.cold_s3(blob, n, mode))
                    log(f"cold {mode:11} {blob}: {s.mbps:7.1f} MB/s, mirror CPU "
                        f"{s.cpu['mirror']:.2f} s, rgw {s.cpu['rgw']:.2f} s, osd "
                        f"{s.cpu['osd']:.2f} s")
                n += 1
                self.radosgw_put(blob, n)
                self.upstream_direct(blob)

    # -- 2 + 3. hits --

    def start_hit_servers(self) -> None:
        assert self.redis is not None
        url = self.redis.url
        self.servers["s3"] = self.start_mirror("hit-s3", prefix="hits", redis=url)
        self.servers["s3-hot"] = self.start_mirror("hit-s3-hot", prefix="hits", redis=url,
                                                   hot=True)
        self.servers["redirect"] = self.start_mirror("hit-redirect", prefix="hits", redis=url,
                                                     args=["--redirect"])
        self.servers["local"] = self.start_mirror("hit-local")

    def local_copy(self, m: MirrorProc, digest: str) -> int | None:
        hexd = digest.removeprefix("sha256:")
        path = m.cache_dir / "blobs" / "sha256" / hexd[:2] / hexd
        return path.stat().st_size if path.exists() else None

    def check_get(self, what: str, blob: str, url: str) -> None:
        """GET `url` (following redirects): the layer must hash to its digest, the big blob
        (hashing it would take a while) have its length."""
        _, digest, size = self.blob(blob)
        if blob == "layer":
            got = curl_sha256(url)
            if got != (size, digest):
                raise BenchError(f"{what} {blob}: got {got}, want {size} {digest}")
        else:
            r = curl(["-L", "-o", "/dev/null", url])
            if (r.code, r.size) != (200, size):
                raise BenchError(f"{what} {blob}: got {r.code}, {r.size} bytes")

    def warm(self) -> None:
        """Fill the bucket through the S3 replica, make the hot tier's local copy and fill the
        local mirror, checking what every path serves."""
        for blob in ("layer", "big"):
            _, digest, size = self.blob(blob)
            for mode in ("s3", "s3-hot", "local", "s3-hot", "local", "redirect"):
                self.check_get(f"warming {mode}", blob, self.blob_url(self.servers[mode], blob))
            stored = self.object_size(self.object_key("hits", digest))
            if stored != size:
                raise BenchError(f"warm {blob}: the bucket holds {stored} bytes, want {size}")
            for mode, want in (("s3", None), ("s3-hot", size), ("local", size)):
                have = self.local_copy(self.servers[mode], digest)
                if have != want:
                    raise BenchError(f"warm {blob}: {mode} has a local copy of {have} bytes, "
                                     f"want {want}")
            self.check_get("radosgw direct", blob,
                           self.presign("GET", self.object_key("hits", digest)))

    def hit(self, mode: str, blob: str) -> Sample:
        if mode == "direct":
            key = self.object_key("hits", self.blob(blob)[1])
            return self.transfer("hit-direct", blob, None,
                                 ["-o", "/dev/null", self.presign("GET", key)])
        m = self.servers[mode]
        args = ["-L"] if mode == "redirect" else []
        assert self.redis is not None
        commands = redis_commands(self.redis) if mode != "local" else 0
        sample = self.transfer(f"hit-{mode}", blob, m,
                               [*args, "-o", "/dev/null", self.blob_url(m, blob)])
        if mode != "local":
            self.redis_per_hit.setdefault(mode, []).append(
                redis_commands(self.redis) - commands - 1)
        return sample

    def hits(self) -> None:
        assert self.upstream is not None
        self.start_hit_servers()
        self.warm()
        mark = self.upstream.mark()
        for blob in ("layer", "big"):
            for i in range(self.cfg.hit_runs):
                order = MODES[i % len(MODES):] + MODES[:i % len(MODES)]
                speeds = {mode: self.hit(mode, blob).mbps for mode in order}
                log(f"hits {blob}: " + ", ".join(f"{k} {v:.0f}" for k, v in speeds.items())
                    + " MB/s")
        for blob in ("layer", "big"):
            gets = self.upstream_gets(mark, self.blob(blob)[1])
            if gets:
                raise BenchError(f"hits of {blob} caused {gets} upstream GETs")

    def redirect_answers(self) -> None:
        """The mirror's time to answer the 307 (curl without -L), and answers per second."""
        assert self.ceph is not None
        m = self.servers["redirect"]
        url = self.blob_url(m, "big")
        times: list[float] = []
        assert self.redis is not None
        commands = redis_commands(self.redis)
        before = cpu_seconds(process_tree(m.proc.pid)) if m.proc else 0.0
        for _ in range(self.cfg.answer_runs):
            p = subprocess.run(["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w",
                                "%{http_code} %{time_total} %{redirect_url}", url],
                               capture_output=True, text=True, timeout=30, env=clean_env())
            code, total, location = [*p.stdout.split(), "", "", ""][:3]
            if p.returncode != 0 or code != "307" or not location.startswith(
                    self.ceph.endpoint + "/"):
                raise BenchError(f"redirect answer: {p.stdout} {p.stderr}")
            times.append(float(total) * 1000)
        cpu = (cpu_seconds(process_tree(m.proc.pid)) if m.proc else 0.0) - before
        # one INFO of our own in between: not counted
        per_answer = (redis_commands(self.redis) - commands - 1) / len(times)
        self.res.raw["3_redis_commands_per_redirect_answer"] = round(per_answer, 1)
        self.res.raw["3_redirect_answer_ms"] = [round(t, 2) for t in times]
        wrk = self.wrk(url)
        self.res.raw["3_redirect_wrk"] = wrk
        self.res.raw["3_redirect_answer_cpu_ms"] = round(cpu * 1000 / len(times), 2)

    def wrk(self, url: str) -> dict[str, Any]:
        script = self.work / "count.lua"
        script.write_text(
            "done = function(s, latency, requests)\n"
            "  local e = s.errors\n"
            "  io.write(string.format('WRKJSON {\"requests\": %d, \"duration_us\": %d, "
            "\"errors\": %d, \"p50_us\": %d, \"p99_us\": %d}\\n', s.requests, s.duration, "
            "e.connect + e.read + e.write + e.status + e.timeout, latency:percentile(50), "
            "latency:percentile(99)))\nend\n")
        m = self.servers["redirect"]
        assert self.redis is not None
        commands = redis_commands(self.redis)
        before = cpu_seconds(process_tree(m.proc.pid)) if m.proc else 0.0
        p = subprocess.run(["wrk", "-t1", "-c4", f"-d{self.cfg.wrk_seconds}s", "--timeout", "5s",
                            "-s", str(script), url], capture_output=True, text=True,
                           timeout=self.cfg.wrk_seconds + 60, env=clean_env())
        cpu = (cpu_seconds(process_tree(m.proc.pid)) if m.proc else 0.0) - before
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if p.returncode != 0 or line is None:
            raise BenchError(f"wrk {url} failed ({p.returncode}): {p.stdout}{p.stderr}")
        out: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
        if out["errors"]:
            raise BenchError(f"wrk {url}: {out['errors']} errors or non-2xx/3xx answers")
        out["rps"] = round(out["requests"] / (out["duration_us"] / 1e6), 1)
        out["mirror_cpu_ms_per_answer"] = round(cpu * 1000 / max(1, out["requests"]), 3)
        out["redis_commands_per_answer"] = round(
            (redis_commands(self.redis) - commands - 1) / max(1, out["requests"]), 2)
        return out

    # -- profile --

    def profile_runs(self) -> None:
        """py-spy (collapsed stacks of every Python thread, sampled without stopping the
        process) of a replica on S3 during one cold GET and one hit GET without a local copy
        of the big blob: a summary goes to the raw results, the stacks to the work directory
        (flamegraph.pl or speedscope read them)."""
        if shutil.which("py-spy") is None:
            self.res.notes.append("--profile: py-spy not found (pip install py-spy)")
            return
        assert self.redis_cold is not None
        out = self.work / "profiles"
        out.mkdir(exist_ok=True)
        for what in ("cold", "hit"):
            if what == "cold":
                self.redis_cold.flushall()
                m = self.start_mirror("profile-cold", prefix="profile",
                                      redis=self.redis_cold.url)
            else:
                m = self.servers["s3"]
            assert m.proc is not None
            dest = out / f"{what}-s3.txt"
            spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "--threads", "-r",
                                    "100", "-f", "raw", "-o", str(dest), "-p",
                                    str(m.proc.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
            try:
                time.sleep(1.0)
                sample = self.transfer(f"profiled-{what}-s3", "big", m,
                                       ["-o", "/dev/null", self.blob_url(m, "big")])
            finally:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
                if what == "cold":
                    self.discard_mirror(m)
                    self.drop_prefix("profile")
            self.res.raw.setdefault("profile", {})[what] = {
                "MBps (sampled, slower)": round(sample.mbps, 1),
                **collapsed_summary(dest)}
            self.res.notes.append(f"py-spy stacks of the {what} S3 replica: {dest}")

    # -- summary --

    def summarize(self) -> None:
        res = self.res
        by: dict[tuple[str, str], list[Sample]] = {}
        for s in self.samples:
            by.setdefault((s.mode, s.blob), []).append(s)
        res.raw["runs"] = {f"{mode} {blob}": [s.brief() for s in ss]
                           for (mode, blob), ss in by.items()}

        def mbps(mode: str, blob: str) -> float:
            return median(s.mbps for s in by.get((mode, blob), []))

        def cpu(mode: str, blob: str, who: str) -> float:
            return median(s.cpu_per_gb(who) for s in by.get((mode, blob), []))

        def threads(mode: str, blob: str) -> str:
            runs = by.get((mode, blob), [])
            return " / ".join(f"{median(s.thread_per_gb(role) for s in runs):.2f}" for role in
                              ("event loop", "worker threads", "obstore (tokio)"))

        def mb(blob: str) -> str:
            return f"{self.blob(blob)[2] / 1e6:.0f} MB"

        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        # 1. cold
        for blob in ("layer", "big"):
            s3, local = mbps("cold-s3", blob), mbps("cold-local", blob)
            res.add(f"1. cold, one client, {mb(blob)}, MB/s: S3 replica vs local-disk mirror",
                    s3, local, ratio(s3, local))
            put = mbps("radosgw-put", blob)
            res.add("   same, S3 replica vs radosgw's own PUT of the blob (info)", s3, put,
                    ratio(s3, put))
            direct = mbps("upstream-direct", blob)
            res.add("   same, local-disk mirror vs the upstream registry direct (info)",
                    local, direct, ratio(local, direct))
        unsigned = mbps("cold-s3-unsigned", "big")
        s3 = mbps("cold-s3", "big")
        res.add(f"   cold {mb('big')}, S3 replica with AWS_UNSIGNED_PAYLOAD=true vs default "
                "(info)", unsigned, s3, ratio(unsigned, s3))
        # 2. hits
        for blob in ("layer", "big"):
            local, direct = mbps("hit-local", blob), mbps("hit-direct", blob)
            s3, hot = mbps("hit-s3", blob), mbps("hit-s3-hot", blob)
            res.add(f"2. hit, {mb(blob)}, MB/s: S3 replica, no local copy, vs local-disk mirror",
                    s3, local, ratio(s3, local))
            res.add("   same, S3 replica, no local copy, vs radosgw direct GET", s3, direct,
                    ratio(s3, direct))
            res.add("   same, S3 replica with hot tier vs local-disk mirror", hot, local,
                    ratio(hot, local))
        # 3. redirects
        for blob in ("layer", "big"):
            red, direct = mbps("hit-redirect", blob), mbps("hit-direct", blob)
            res.add(f"3. hit with --redirect (curl -L), {mb(blob)}, MB/s vs radosgw direct",
                    red, direct, ratio(red, direct))
        answers = res.raw.get("3_redirect_answer_ms", [])
        if answers:
            res.add("3. time to answer the redirect (307, curl), ms: median (p90 as reference)",
                    median(answers), sorted(answers)[int(0.9 * (len(answers) - 1))], None,
                    fmt="{:.2f}")
        wrk = res.raw.get("3_redirect_wrk")
        if wrk:
            res.add("   redirects answered per second, wrk -t1 -c4 (p50 / p99 ms as reference)",
                    wrk["rps"], f"{wrk['p50_us'] / 1000:.2f} / {wrk['p99_us'] / 1000:.2f}",
                    fmt="{:.0f}")
            res.add("   mirror CPU per redirect answer, ms (Redis commands per answer as "
                    "reference)", wrk["mirror_cpu_ms_per_answer"],
                    f"{wrk['redis_commands_per_answer']:.1f}", fmt="{:.2f}")
        # 4. the mirror's CPU per GB
        rows = [("cold S3 replica (fill + upload)", "cold-s3", "cold-local"),
                ("hit S3 replica, no local copy", "hit-s3", "hit-local"),
                ("hit S3 replica with hot tier", "hit-s3-hot", "hit-local"),
                ("hit with --redirect (bytes from radosgw)", "hit-redirect", "hit-local")]
        for blob in ("big", "layer"):
            for label, mode, ref in rows:
                value, other = cpu(mode, blob, "mirror"), cpu(ref, blob, "mirror")
                res.add(f"4. mirror CPU s/GB, {mb(blob)}: {label} vs local-disk mirror "
                        f"({ref.split('-')[0]})", value, other, ratio(value, other),
                        fmt="{:.2f}")
        value, other = cpu("cold-s3-unsigned", "big", "mirror"), cpu("cold-s3", "big", "mirror")
        res.add(f"   same, {mb('big')}: cold S3 replica, AWS_UNSIGNED_PAYLOAD=true vs default",
                value, other, ratio(value, other), fmt="{:.2f}")
        # for information
        for mode, label in (("cold-s3", "cold S3 replica"), ("cold-s3-unsigned",
                                                             "cold S3 replica, unsigned payload"),
                            ("cold-local", "cold local-disk mirror"),
                            ("hit-s3", "hit S3 replica, no local copy"),
                            ("hit-s3-hot", "hit S3 replica with hot tier"),
                            ("hit-local", "hit local-disk mirror")):
            res.add(f"   mirror CPU s/GB by thread, {mb('big')}, {label}: event loop / worker "
                    "threads / obstore (info)", threads(mode, "big"), None)
        for mode, label in (("cold-s3", "cold S3 replica (writes)"),
                            ("cold-s3-unsigned", "cold S3 replica, unsigned payload (writes)"),
                            ("radosgw-put", "radosgw PUT direct, presigned (writes)"),
                            ("hit-s3", "hit S3 replica, no local copy (reads)"),
                            ("hit-redirect", "hit with --redirect (reads)"),
                            ("hit-direct", "radosgw GET direct (reads)")):
            res.add(f"   radosgw CPU s/GB (OSD's as reference), {mb('big')}, {label} (info)",
                    cpu(mode, "big", "rgw"), f"{cpu(mode, 'big', 'osd'):.2f}", None,
                    fmt="{:.2f}")
        for kind in ("s3", "local"):
            if self.rss[kind]:
                label = "S3 replica" if kind == "s3" else "local-disk mirror"
                res.add(f"   peak RSS during the cold runs, {label}, MiB (info)",
                        max(r["largest_mib"] for r in self.rss[kind]), None, fmt="{:.1f}")
        for mode, counts in self.redis_per_hit.items():
            res.add(f"   Redis commands per blob GET, {mode} (info)", median(counts), None,
                    fmt="{:.0f}")
        res.raw["peak_rss_cold"] = self.rss
        res.raw["redis_commands_per_blob_get"] = self.redis_per_hit


# -- environment and report -----------------------------------------------------------------


def environment() -> dict[str, str]:
    return machine() | {
        "packages": packages(("obstore", "uvicorn", "starlette", "aiohttp", "uvloop", "redis")),
        "radosgw": tool_version(["radosgw", "--version"]),
        "redis-server": tool_version(["redis-server", "--version"]),
        "docker-registry": tool_version(["docker-registry", "--version"]),
        "curl": tool_version(["curl", "--version"]),
    }


def report(cfg: Config, env: dict[str, str], res: Results, seconds: float) -> str:
    lines = [
        f"# object-store benchmark (tests/bench/cluster.py{' --quick' if cfg.quick else ''})",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- data: layers of {cfg.layer_size / MiB:.0f} MiB and {cfg.big_size / MiB:.0f} MiB; "
        f"cold runs {cfg.cold_runs['layer']} + {cfg.cold_runs['big']} per mode, hit runs "
        f"{cfg.hit_runs} per mode and blob, {cfg.answer_runs} redirect answers, wrk "
        f"{cfg.wrk_seconds} s; one client (curl) at a time; one worker per mirror; scrub off",
        f"- total run time: {seconds:.0f} s",
        "",
        "Medians; ratio = value / reference. MB = 10^6 bytes. CPU s/GB: CPU seconds (user +",
        "system, all threads, reaped children) per 10^9 bytes delivered to the client.",
        "",
        *report_tail(res, nest=1),
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 and 128 MiB, fewer runs")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (logs, storage) instead of removing it")
    parser.add_argument("--profile", action="store_true",
                        help="also record py-spy profiles of a replica (keeps the directory)")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results.md",
                        help="markdown report to append to (default: tests/bench/results.md)")
    args = parser.parse_args(argv)
    cfg = Config.make(args.quick)
    missing = [t for t in ("docker-registry", "skopeo", "curl", "wrk", "redis-server", "bash")
               if shutil.which(t) is None] + missing_binaries()
    if missing:
        print(f"bench: missing {', '.join(missing)} (tests/run installs them)", file=sys.stderr)
        return 2
    # SIGINT: even if ignored
    abort_on((signal.SIGINT, signal.SIGTERM, signal.SIGALRM), cfg.hard_limit_s)
    work = Path(tempfile.mkdtemp(prefix="mirror-s3bench-"))
    bench = Bench(cfg, work, args.profile)
    started = time.monotonic()
    env = environment()
    log(f"work directory {work}; {env['nproc']} CPUs; mirror {env['mirror']}; "
        f"load {loadavg()}")
    warn_if_busy()
    phases: list[tuple[str, Callable[[], None]]] = [
        ("1. cold", bench.cold), ("2/3. hits", bench.hits),
        ("3. redirect answers", bench.redirect_answers)]
    if args.profile:
        phases.append(("profile", bench.profile_runs))
    try:
        bench.setup()
        load = MachineLoad()
        for name, fn in phases:
            log(f"== {name}")
            phase_load = MachineLoad()
            try:
                fn()
            except (BenchError, subprocess.SubprocessError, OSError, TimeoutError,
                    RuntimeError, AssertionError, ValueError, KeyError) as exc:
                detail = "".join(traceback.format_exception_only(exc)).strip()
                log(f"!! {name} failed: {detail}")
                bench.res.errors.append(f"{name}: {detail[:2000]}")
            bench.res.raw.setdefault("machine_load", {})[name] = phase_load.report()
        bench.res.raw.setdefault("machine_load", {})["all phases"] = load.report()
        bench.summarize()
    except KeyboardInterrupt as exc:
        print(f"\nbench: interrupted ({exc}), cleaning up", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    else:
        env["load average at end"] = loadavg()
        whole = bench.res.raw["machine_load"]["all phases"]
        env["CPU of other processes during the phases"] = (
            f"{whole['other_processes_cores']:.2f} cores on average (this run: "
            f"{whole['ours_cores']:.2f}) over {whole['wall_s']:.0f} s")
        text = report(cfg, env, bench.res, time.monotonic() - started)
        append_report(args.output, text)
        return print_results(bench.res, args.output, "appended", nest=1)
    finally:
        signal.alarm(0)
        bench.cleanup()
        if args.keep or args.profile:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
