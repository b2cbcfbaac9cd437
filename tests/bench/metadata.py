#!/usr/bin/env python3
"""Metadata at scale: the metadata store, the server and the cache commands on a big cache,
each against the same on an empty one, in one run, over loopback.

    python tests/bench/metadata.py [--quick] [--keep] [--output FILE]

1. Store: grows a cache to 1,000,000 tag records through the `Metadata` interface
   (`SqliteMetadata`, then `RedisMetadata` against a redis-server started here, to the size
   that fits the time bound), measuring the insert rate; then times point operations
   (`tag`, `set_tag`, `granted`, `drop_tag`, `pin`) at that size and on an empty store.
2. Server: grows a cache to 100,000 tags through `mirror serve` in front of a fake upstream
   (nginx answering every tag with one manifest), with wrk requesting distinct tags; then
   tag-hit requests per second (the same cached tags) and tag-miss requests per second (new
   tags each time) at that size and on an empty cache, with 1 and with 2 workers.
3. Commands: on an empty cache, the 100,000-tag cache of 2 and the 1,000,000-tag cache of 1
   (a real cache directory: the database and the content of the images its tags name): time
   to the first lines of `mirror cache ls` (and that `ls | head -1` exits 0 quietly),
   `mirror import` of one image (a small OCI layout made here), `mirror cache rm` of it and
   `mirror cache gc`.
4. Memory: the RSS of a single worker serving distinct tag lookups (GET by tag of tags the
   1,000,000-tag cache holds), sampled from /proc, up to 1,000,000 lookups or the time bound.

Prints a table (medians of alternating runs; ratio = at size / empty) and appends it as a
section to tests/bench/results.md. Exit status 0 when every measurement was made, even if a
target was missed (the `ok` column says so); 1 if one failed. Everything started here is
stopped at the end, also on failure or Ctrl-C; `--keep` keeps the work directory.
Needs nginx, wrk and redis-server (Debian packages; tests/run installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
# This checkout's package and test support, whatever is installed.
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(BENCH_DIR)]

import httpx  # noqa: E402
from common import (  # noqa: E402
    BenchError,
    Comparison,
    RssSampler,
    Runner,
    abort_on,
    append_report,
    loadavg,
    log,
    machine,
    print_results,
    process_tree,
    report_tail,
    rss_kib,
    tool_version,
    warn_if_busy,
)
from support.procs import MirrorProc, Proc, clean_env, free_port, wait_http  # noqa: E402
from support.redisd import RedisServer  # noqa: E402

from mirror.manifests import accept_key  # noqa: E402
from mirror.metadata import (  # noqa: E402
    Grant,
    Metadata,
    SqliteMetadata,
    TagRecord,
    database_path,
)
from mirror.metadata.redis import RedisMetadata  # noqa: E402

UP = "up"  # the upstream's name, in the mirror's settings and in every record
ANONYMOUS = "anonymous"  # the identity anonymous callers' grants are kept under
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
ACCEPT = ", ".join([  # what docker sends; the records are kept for this Accept set
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
ACCEPT_KEY = accept_key([ACCEPT])
LONG_TTL = "86400"  # tag_ttl and access_ttl of the mirrors here: a hit stays a hit
IMPORTED = f"{UP}/bench/imported:1"  # the image of the bundle commands import and remove

WRK_SCRIPT = """\
-- wrk -s this -- MODE BASE COUNT REPOS THREADS [DONE_FILE]
-- miss: distinct tags BASE, BASE+1, ...; each thread stops after COUNT responses and then
-- adds a line to DONE_FILE (wrk itself runs for its duration, or until SIGINT).
-- hit: the COUNT tags from BASE, over and over.
local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end
function init(args)
  mode = args[1]
  base = tonumber(args[2])
  count = tonumber(args[3])
  repos = tonumber(args[4])
  threads = tonumber(args[5])
  done_file = args[6]
  sent = 0
  stopped = false
  headers = {Accept = "@ACCEPT@"}
end
function request()
  local n = sent * threads + id
  if mode == "hit" then n = n % count end
  n = base + n
  sent = sent + 1
  return wrk.format("GET", string.format("/v2/bench/r%d/manifests/t%d", n % repos, n), headers)
end
function response(status, headers, body)
  if mode == "miss" and sent >= count and not stopped then
    stopped = true
    if done_file then
      local f = io.open(done_file, "a")
      f:write("stopped\\n")
      f:close()
    end
    wrk.thread:stop()
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
""".replace("@ACCEPT@", ACCEPT)

NGINX_CONF = """\
worker_processes 1;
pid @DIR@/nginx.pid;
error_log @DIR@/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path @DIR@/tmp/body;
    proxy_temp_path @DIR@/tmp/proxy;
    fastcgi_temp_path @DIR@/tmp/fastcgi;
    uwsgi_temp_path @DIR@/tmp/uwsgi;
    scgi_temp_path @DIR@/tmp/scgi;
    server {
        listen 127.0.0.1:@PORT@;
        root @DIR@/www;
        location = /v2/ {
            default_type application/json;
            return 200 '{}';
        }
        # Any tag, any digest: the one manifest.
        location ~ ^/v2/.+/manifests/[^/]+$ {
            types { }
            default_type @MEDIA_TYPE@;
            add_header Docker-Content-Digest @DIGEST@ always;
            try_files /manifest.json =404;
        }
        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{64})$" {
            types { }
            default_type application/octet-stream;
            add_header Docker-Content-Digest $1 always;
            try_files /blobs/$1 =404;
        }
        location / {
            return 404;
        }
    }
}
"""


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    store_tags: int  # 1: tag records grown through the interface (SQLite)
    redis_tags: int  # 1: the same through RedisMetadata, as far as the time bound allows
    repos: int  # 1: repositories those tags spread over
    server_tags: int  # 2: tags grown through the server
    server_repos: int
    hot_tags: int  # 2: the cached tags hit runs request (one per repository at least: the
    # empty cache then knows every repository, as the big one does, before it is measured)
    lookups: int  # 4: distinct lookups through one worker
    op_calls: int = 2000  # 1: calls of each operation per round
    rounds: int = 3  # alternating rounds, for medians (1 and 3)
    server_rounds: int = 5  # the same for 2
    wrk_seconds: int = 3
    store_seconds: int = 360  # 1: time cap of the SQLite growth
    redis_seconds: int = 60  # 1: time cap of the Redis growth
    grow_seconds: int = 200  # 2: time cap of the growth through the server
    lookup_seconds: int = 120  # 4: time cap of the lookups
    hard_limit_s: int = 1500  # SIGALRM: the run is aborted (and cleaned up) after this

    @staticmethod
    def make(quick: bool) -> Config:
        if quick:
            return Config(quick=True, store_tags=20_000, redis_tags=10_000, repos=2_000,
                          server_tags=2_000, server_repos=100, hot_tags=100, lookups=20_000,
                          op_calls=300, rounds=2, server_rounds=2, wrk_seconds=2,
                          store_seconds=30, redis_seconds=15, grow_seconds=30,
                          lookup_seconds=15, hard_limit_s=400)
        return Config(quick=False, store_tags=1_000_000, redis_tags=200_000, repos=100_000,
                      server_tags=100_000, server_repos=1_000, hot_tags=1_000,
                      lookups=1_000_000)


# -- results --------------------------------------------------------------------------------


class Results(Comparison):
    head = ("metric", "at size", "empty", "ratio", "target", "ok")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- data -----------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    """An image's blobs: the manifest, its config and one layer."""

    manifest: bytes
    config: bytes
    layer: bytes

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def blobs(self) -> dict[str, bytes]:
        return {sha256(b): b for b in (self.manifest, self.config, self.layer)}

    @staticmethod
    def make(label: str, layer_size: int) -> Image:
        layer = os.urandom(layer_size)
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": {
            "bench": label}}, "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]}},
            sort_keys=True).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}],
        }, indent=2).encode()
        return Image(manifest, config, layer)


def blob_path(cache: Path, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return cache / "blobs" / "sha256" / hex_[:2] / hex_


def write_layout(path: Path, image: Image, name: str) -> None:
    """An OCI image layout of one image, named `name`."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for digest, data in image.blobs.items():
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest),
        "annotations": {"org.opencontainers.image.ref.name": name}}]}))


def repo_of(n: int, repos: int) -> str:
    return f"bench/r{n % repos}"


def tag_of(n: int) -> str:
    return f"t{n}"


# -- the metadata store through the interface (1) -------------------------------------------


async def store_image(meta: Metadata, cache: Path, image: Image, at: float) -> None:
    """Content files and records of `image`, delivered by UP."""
    for digest, data in image.blobs.items():
        path = blob_path(cache, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        await meta.add_content(digest, len(data), UP, at)
    await meta.add_manifest(image.digest, OCI_MANIFEST, [sha256(image.config),
                                                          sha256(image.layer)])


async def grow(meta: Metadata, count: int, repos: int, digest: str, size: int,
               tasks: int = 1, chunk: int = 100_000,
               seconds: float = math.inf) -> list[tuple[int, float]]:
    """Up to `count` tags (tag n in repo n % repos, all naming `digest`), fewer if `seconds`
    run out (whole chunks), and a grant of every repository they use, through the
    interface; returns (records so far, records/s) per chunk."""
    rates: list[tuple[int, float]] = []
    at = time.time()
    deadline = time.monotonic() + seconds
    end = 0
    for start in range(0, count, chunk):
        if time.monotonic() > deadline:
            break
        end = min(count, start + chunk)
        began = time.perf_counter()

        async def worker(first: int, end: int = end) -> None:
            for n in range(first, end, tasks):
                await meta.set_tag(TagRecord(UP, repo_of(n, repos), tag_of(n), digest,
                                             OCI_MANIFEST, size, at), ACCEPT_KEY)

        await asyncio.gather(*(worker(start + k) for k in range(tasks)))
        rates.append((end, (end - start) / (time.perf_counter() - began)))
        log(f"  {end} tag records, {rates[-1][1]:.0f}/s")
    for start in range(0, min(repos, end), tasks):
        await asyncio.gather(*(meta.grant(Grant(UP, repo_of(n, repos), ANONYMOUS, at, True))
                               for n in range(start, min(start + tasks, repos, end))))
    return rates


OPS = ("tag", "set_tag", "granted", "drop_tag", "pin")


async def time_ops(meta: Metadata, keys: int, repos: int, calls: int, digest: str,
                   label: str, rng: random.Random) -> dict[str, list[float]]:
    """Per-call seconds of each operation, on random existing records (of `keys` tags over
    `repos` repositories); what set_tag and pin add is removed again, untimed."""
    times: dict[str, list[float]] = {op: [] for op in OPS}
    new = [(repo_of(rng.randrange(keys), repos), f"new-{label}-{k}") for k in range(calls)]
    clock = time.perf_counter
    for _ in range(calls):
        n = rng.randrange(keys)
        started = clock()
        record = await meta.tag(UP, repo_of(n, repos), tag_of(n), ACCEPT_KEY)
        times["tag"].append(clock() - started)
        if record is None:
            raise BenchError(f"{label}: tag {tag_of(n)} not found")
    for repo, tag in new:
        record = TagRecord(UP, repo, tag, digest, OCI_MANIFEST, 1, time.time())
        started = clock()
        await meta.set_tag(record, ACCEPT_KEY)
        times["set_tag"].append(clock() - started)
    for _ in range(calls):
        repo = repo_of(rng.randrange(min(keys, repos)), repos)
        started = clock()
        grant = await meta.granted(UP, repo, ANONYMOUS)
        times["granted"].append(clock() - started)
        if grant is None:
            raise BenchError(f"{label}: no grant for {repo}")
    for repo, tag in new:
        started = clock()
        dropped = await meta.drop_tag(UP, repo, tag)
        times["drop_tag"].append(clock() - started)
        if dropped != [digest]:
            raise BenchError(f"{label}: drop_tag {repo}:{tag} -> {dropped}")
    owners = [f"pin-{label}-{k}" for k in range(calls)]
    for owner in owners:
        started = clock()
        await meta.pin(owner, [digest])
        times["pin"].append(clock() - started)
    for owner in owners:
        await meta.unpin(owner)
    return times


# -- processes ----------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def cpu_seconds(root: int) -> float:
    """User and system CPU time of a process tree so far (its live processes)."""
    ticks = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def count_tags(cache: Path) -> int:
    """Tags (latest records) in a cache's SQLite store, read directly."""
    db = sqlite3.connect(f"file:{database_path(cache)}?mode=ro", uri=True, timeout=30)
    try:
        return int(db.execute("SELECT count(*) FROM tags WHERE accept = '-'").fetchone()[0])
    finally:
        db.close()


class Nginx:
    """The fake upstream: /v2/ answers 200 with no auth, every manifest path the one
    manifest (with its type and digest), blobs by digest from www/blobs."""

    def __init__(self, work: Path, image: Image) -> None:
        self.dir = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.image = image
        self.proc: Proc | None = None

    def start(self) -> Nginx:
        for sub in ("www/blobs", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "www" / "manifest.json").write_bytes(self.image.manifest)
        for digest, data in self.image.blobs.items():
            (self.dir / "www" / "blobs" / digest).write_bytes(data)
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.replace("@DIR@", str(self.dir))
                        .replace("@PORT@", str(self.port))
                        .replace("@MEDIA_TYPE@", OCI_MANIFEST)
                        .replace("@DIGEST@", self.image.digest))
        self.proc = Proc(["nginx", "-c", str(conf), "-p", str(self.dir), "-g", "daemon off;"],
                         self.dir, name="nginx")
        wait_http(f"{self.url}/v2/", 20, ok=lambda s: s == 200, proc=self.proc)
        r = httpx.get(f"{self.url}/v2/any/repo/manifests/any-tag", trust_env=False)
        if r.headers.get("docker-content-digest") != self.image.digest or r.content != \
                self.image.manifest or r.headers.get("content-type") != OCI_MANIFEST:
            raise BenchError(f"fake upstream answers {r.status_code} {dict(r.headers)}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


# -- the benchmark ------------------------------------------------------------------------


class Bench(Runner):
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.res = Results()
        self.cleanups: list[Callable[[], object]] = []
        self.rng = random.Random(12)
        self.upstream_image = Image.make("upstream", 4096)
        self.nginx: Nginx | None = None
        self.big_store = work / "cache-1m"  # 1: a real cache directory
        self.server_cache = work / "cache-100k"  # 2
        self.wrk_script = work / "tags.lua"
        self.wrk_script.write_text(WRK_SCRIPT)
        self.bundle = work / "bundle"
        write_layout(self.bundle, Image.make("imported", 256 * 1024), IMPORTED)
        self.grown_1m = False
        self.grown_100k = False
        self.store_size = self.redis_size = self.server_tags = 0
        self._n = 0
        self._miss_base = 100_000_000  # tags of miss runs: new every time

    # -- 1. the store through the interface --

    def store_scale(self) -> None:
        cfg = self.cfg
        asyncio.run(self._sqlite_scale())
        with RedisServer(self.work / "redis") as redis:
            self.cleanups.append(redis.stop)
            asyncio.run(self._redis_scale(redis.url))
        if self.redis_size < cfg.store_tags:
            rate = self.res.raw["1_store"]["redis"]["overall_rate"]
            self.res.notes.append(
                f"1. Redis was grown to {self.redis_size} tag records, not {cfg.store_tags}: "
                f"at the {rate:.0f} inserts/s measured through the interface (16 tasks), "
                f"{cfg.store_tags} would take {cfg.store_tags / rate:.0f} s, which the time "
                f"bound of the whole run does not leave")

    async def _sqlite_scale(self) -> None:
        cfg = self.cfg
        self.big_store.mkdir()
        big = SqliteMetadata(database_path(self.big_store))
        empty = SqliteMetadata(self.work / "empty-1" / "metadata.db")
        await big.open()
        await empty.open()
        try:
            image = self.upstream_image
            await store_image(big, self.big_store, image, time.time())
            log(f"growing SQLite to {cfg.store_tags} tag records")
            started = time.monotonic()
            rates = await grow(big, cfg.store_tags, cfg.repos, image.digest,
                               len(image.manifest), chunk=max(10_000, cfg.store_tags // 10),
                               seconds=cfg.store_seconds)
            grow_s = time.monotonic() - started
            self.store_size = rates[-1][0]
            self.grown_1m = True
            await grow(empty, cfg.op_calls, cfg.repos, image.digest, len(image.manifest))
            db_bytes = file_size(database_path(self.big_store))
            await self._ops("SQLite", big, empty, self.store_size)
        finally:
            await big.close()
            await empty.close()
        self._insert_rows("SQLite", rates, grow_s)
        self.res.add("1. SQLite database size, bytes per tag record (info)",
                     db_bytes / self.store_size, None, fmt="{:.0f}")
        if self.store_size < cfg.store_tags:
            self.res.notes.append(
                f"1. SQLite was grown to {self.store_size} tag records, not {cfg.store_tags}, "
                f"within the time bound of {cfg.store_seconds} s")
        self.res.raw.setdefault("1_store", {})["sqlite"] = {
            "grow_seconds": round(grow_s, 1), "db_bytes": db_bytes,
            "rates_per_chunk": [(n, round(r)) for n, r in rates]}

    async def _redis_scale(self, url: str) -> None:
        cfg = self.cfg
        big, empty = RedisMetadata(url, prefix="big:"), RedisMetadata(url, prefix="empty:")
        await big.open()
        await empty.open()
        try:
            digest, size = self.upstream_image.digest, len(self.upstream_image.manifest)
            log(f"growing Redis to {cfg.redis_tags} tag records")
            started = time.monotonic()
            rates = await grow(big, cfg.redis_tags, cfg.repos, digest, size, tasks=16,
                               chunk=max(10_000, cfg.redis_tags // 5),
                               seconds=cfg.redis_seconds)
            grow_s = time.monotonic() - started
            self.redis_size = rates[-1][0]
            memory = int((await big.client.info("memory"))["used_memory"])
            await grow(empty, cfg.op_calls, cfg.repos, digest, size)
            await self._ops("Redis", big, empty, self.redis_size)
        finally:
            await big.close()
            await empty.close()
        self._insert_rows("Redis", rates, grow_s)
        self.res.add("1. Redis used_memory, bytes per tag record (info)",
                     memory / self.redis_size, None, fmt="{:.0f}")
        self.res.raw.setdefault("1_store", {})["redis"] = {
            "grow_seconds": round(grow_s, 1), "overall_rate": self.redis_size / grow_s,
            "used_memory": memory,
            "rates_per_chunk": [(n, round(r)) for n, r in rates]}

    def _insert_rows(self, name: str, rates: list[tuple[int, float]], seconds: float) -> None:
        total = rates[-1][0]
        first, last = rates[0][1], rates[-1][1]
        self.res.add(f"1. {name}: set_tag inserts/s, overall while growing to {total} "
                     f"(info)", total / seconds, None, fmt="{:.0f}")
        self.res.add(f"1. {name}: inserts/s, last chunk (to {total}) vs first chunk",
                     last, first, last / first, fmt="{:.0f}")

    async def _ops(self, name: str, big: Metadata, empty: Metadata, size: int) -> None:
        cfg = self.cfg
        digest = self.upstream_image.digest
        times: dict[str, dict[str, list[float]]] = {"big": {o: [] for o in OPS},
                                                     "empty": {o: [] for o in OPS}}
        for r in range(cfg.rounds):  # alternating: the machine's noise hits both alike
            order = [("big", big, size), ("empty", empty, cfg.op_calls)]
            for label, meta, keys in order if r % 2 == 0 else order[::-1]:
                got = await time_ops(meta, keys, cfg.repos, cfg.op_calls, digest,
                                     f"{name}-{label}-{r}", self.rng)
                for op, values in got.items():
                    times[label][op] += values
        raw = self.res.raw.setdefault("1_store", {}).setdefault(f"{name.lower()}_ops_us", {})
        for op in OPS:
            b, e = median(times["big"][op]) * 1e6, median(times["empty"][op]) * 1e6
            raw[op] = {"median_big": round(b, 1), "median_empty": round(e, 1),
                       "p90_big": round(statistics.quantiles(times["big"][op], n=10)[-1] * 1e6,
                                        1),
                       "p90_empty": round(
                           statistics.quantiles(times["empty"][op], n=10)[-1] * 1e6, 1)}
            self.res.add(f"1. {name} {op}, us per call: {size} tags vs empty", b, e, b / e)

    # -- 2. the server --

    def start_nginx(self) -> Nginx:
        if self.nginx is None:
            self.nginx = Nginx(self.work / "nginx", self.upstream_image)
            self.cleanups.append(self.nginx.stop)
            self.nginx.start()
        return self.nginx

    def start_mirror(self, cache: Path, workers: int, label: str) -> MirrorProc:
        nginx = self.start_nginx()
        self._n += 1
        m = MirrorProc([(UP, nginx.url)], cache, self.work / f"logs-{self._n}-{label}",
                       args=["--tag-ttl", LONG_TTL, "--access-log", "off"], workers=workers,
                       env={"MIRROR_ACCESS_TTL": LONG_TTL}, code=REPO_ROOT)
        self.cleanups.append(m.stop)
        m.start(timeout=60)
        deadline = time.monotonic() + 60
        assert m.proc is not None
        while m.proc.log_text().count("Application startup complete") < workers:
            if time.monotonic() > deadline or not m.alive:
                raise BenchError(f"mirror {label}: not all {workers} workers started: "
                                 f"{m.proc.log_text()[-2000:]}")
            time.sleep(0.05)
        return m

    def wrk(self, url: str, mode: str, base: int, count: int, repos: int, seconds: float,
            connections: int = 16, threads: int = 2) -> WrkResult:
        """One wrk run; a "miss" run ends when every thread has sent `count` requests (wrk
        is interrupted then: on its own it would idle to the end of its duration)."""
        self._n += 1
        done = self.work / f"wrk-{self._n}.done"
        argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                "--timeout", "10s", "-s", str(self.wrk_script), url, "--", mode, str(base),
                str(count), str(repos), str(threads), str(done)]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=clean_env())
        try:
            deadline = time.monotonic() + seconds + 60
            while p.poll() is None:
                if time.monotonic() > deadline:
                    raise BenchError(f"wrk did not finish within {seconds + 60:.0f} s")
                if mode == "miss" and done.exists() and \
                        done.read_text().count("stopped") >= threads:
                    p.send_signal(signal.SIGINT)
                    break
                time.sleep(0.1)
            stdout, stderr = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        line = next((ln for ln in stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if p.returncode != 0 or line is None:
            raise BenchError(f"wrk failed ({p.returncode}): {stdout[-1000:]} {stderr[-1000:]}")
        data = json.loads(line.removeprefix("WRKJSON "))
        errors = {k: data[k] for k in ("connect", "read", "write", "status", "timeout")
                  if data[k]}
        if errors:
            raise BenchError(f"wrk {mode} against {url}: errors {errors} in "
                             f"{data['requests']} requests")
        return WrkResult(data["requests"], data["duration_us"] / 1e6, data["p50_us"] / 1e3,
                         data["p99_us"] / 1e3)

    def check_answer(self, m: MirrorProc, n: int, repos: int) -> None:
        url = f"{m.url}/v2/{repo_of(n, repos)}/manifests/{tag_of(n)}"
        r = httpx.get(url, headers={"Accept": ACCEPT}, trust_env=False, timeout=30)
        got = r.headers.get("docker-content-digest")
        if r.status_code != 200 or got != self.upstream_image.digest or \
                r.content != self.upstream_image.manifest:
            raise BenchError(f"GET {url} -> {r.status_code}, digest {got}")

    def server_grow(self) -> None:
        cfg = self.cfg
        m = self.start_mirror(self.server_cache, 2, "grow")
        started = time.monotonic()
        try:
            result = self.wrk(m.url, "miss", 0, cfg.server_tags // 2, cfg.server_repos,
                              cfg.grow_seconds)
            self.check_answer(m, 0, cfg.server_repos)
        finally:
            m.stop()
        seconds = time.monotonic() - started
        tags = count_tags(self.server_cache)
        self.grown_100k = tags >= cfg.hot_tags
        self.res.raw["2_server_grow"] = {"tags": tags, "requests": result.requests,
                                         "seconds": round(seconds, 1),
                                         "db_bytes": file_size(database_path(self.server_cache))}
        self.res.add("2. growth through the server (workers=2), tag misses/s (info)",
                     result.rate, None, fmt="{:.0f}")
        if tags < cfg.server_tags:
            self.res.notes.append(
                f"2. the server grew the cache to {tags} tags, not {cfg.server_tags}, within "
                f"the time bound of {cfg.grow_seconds} s")
        self.server_tags = tags

    def server_rates(self) -> None:
        """Both caches served at once, by two mirrors: wrk runs alternate between them
        (the machine's noise hits both alike), hits first, then misses."""
        cfg = self.cfg
        if not self.grown_100k:
            raise BenchError("the server cache was not grown")
        raw: dict[str, Any] = {}
        for workers in (1, 2):
            runs: dict[str, dict[str, list[float]]] = {
                k: {"hit": [], "miss": []} for k in ("big", "empty")}
            cpu: dict[str, dict[str, list[float]]] = {
                k: {"hit": [], "miss": []} for k in ("big", "empty")}
            fresh = self.work / f"cache-empty-w{workers}"
            mirrors = {"big": self.start_mirror(self.server_cache, workers, f"big-w{workers}"),
                       "empty": self.start_mirror(fresh, workers, f"empty-w{workers}")}
            try:
                for m in mirrors.values():
                    # The hot tags: existing ones in the big cache, new in the empty one.
                    self.wrk(m.url, "miss", 0, cfg.hot_tags // 2 + 1, cfg.server_repos, 60)
                for kind in ("hit", "miss"):
                    for r in range(cfg.server_rounds):
                        order = ["big", "empty"] if r % 2 == 0 else ["empty", "big"]
                        for which in order:
                            m = mirrors[which]
                            assert m.proc is not None
                            before = cpu_seconds(m.proc.pid)
                            if kind == "hit":
                                result = self.wrk(m.url, "hit", 0, cfg.hot_tags,
                                                  cfg.server_repos, cfg.wrk_seconds)
                            else:
                                self._miss_base += 1_000_000
                                result = self.wrk(m.url, "miss", self._miss_base, 10**9,
                                                  cfg.server_repos, cfg.wrk_seconds)
                            used = cpu_seconds(m.proc.pid) - before
                            runs[which][kind].append(result.rate)
                            cpu[which][kind].append(used * 1e3 / max(1, result.requests))
                            log(f"  workers={workers} {which} {kind}: {result.rate:.0f}/s "
                                f"(p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms; "
                                f"{cpu[which][kind][-1]:.2f} CPU ms each)")
                for m in mirrors.values():
                    self.check_answer(m, 1, cfg.server_repos)
            finally:
                for m in mirrors.values():
                    m.stop()
            raw[f"workers_{workers}"] = {k: {kind: [round(x) for x in v] for kind, v in
                                             d.items()} for k, d in runs.items()}
            raw[f"workers_{workers}"]["cpu_ms_per_request"] = {
                k: {kind: [round(x, 3) for x in v] for kind, v in d.items()}
                for k, d in cpu.items()}
            raw[f"workers_{workers}"]["empty_cache_tags_after"] = count_tags(fresh)
            shutil.rmtree(fresh, ignore_errors=True)
            for kind, what in (("hit", "tag hits (the same cached tags)"),
                               ("miss", "tag misses (new tags)")):
                b, e = median(runs["big"][kind]), median(runs["empty"][kind])
                self.res.add(f"2. {what}, req/s (workers={workers}): {self.server_tags} tags "
                             "vs empty", b, e, b / e, ">= 0.9", b / e >= 0.9, fmt="{:.0f}")
                b, e = median(cpu["big"][kind]), median(cpu["empty"][kind])
                self.res.add("   same, mirror CPU ms per request (info)", b, e, b / e,
                             fmt="{:.3f}")
        raw["cache_tags_after"] = count_tags(self.server_cache)
        self.res.raw["2_server_rates"] = raw

    # -- 3. the commands --

    def cli(self, *args: str, timeout: float = 300) -> tuple[float, str]:
        started = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                           text=True, timeout=timeout, cwd=REPO_ROOT,
                           env=clean_env({"PYTHONPATH": str(REPO_ROOT)}))
        seconds = time.monotonic() - started
        if p.returncode != 0:
            raise BenchError(f"mirror {' '.join(args)}: exit {p.returncode}: "
                             f"{p.stderr[-2000:]}")
        return seconds, p.stdout

    def ls_first_lines(self, cache: Path) -> tuple[float, float]:
        """(seconds to the first byte, to the first image line) of `mirror cache ls` on a
        pipe; then the pipe is closed, as by `head`: the command must exit 0, silently."""
        argv = [sys.executable, "-m", "mirror", "cache", "ls", "--cache-dir", str(cache)]
        started = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}))
        try:
            assert p.stdout is not None and p.stderr is not None
            p.stdout.read(1)
            first_byte = time.monotonic() - started
            p.stdout.readline()  # the header
            line = p.stdout.readline()
            first_line = time.monotonic() - started
            p.stdout.close()  # as `head -2` would
            p.wait(60)
            err = p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if not line.strip():
            raise BenchError(f"mirror cache ls on {cache.name}: no image listed")
        if p.returncode != 0 or err:
            raise BenchError(f"mirror cache ls | head on {cache.name}: exit {p.returncode}, "
                             f"stderr {err[-1000:]!r}")
        return first_byte, first_line

    def head_quiet(self, cache: Path) -> None:
        """`mirror cache ls | head -1` in a shell: exit 0 and nothing on stderr."""
        script = (f"set -o pipefail; {sys.executable} -m mirror cache ls --cache-dir "
                  f"{cache} | head -1 >/dev/null")
        p = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                           timeout=120, cwd=REPO_ROOT,
                           env=clean_env({"PYTHONPATH": str(REPO_ROOT)}))
        if p.returncode != 0 or p.stderr:
            raise BenchError(f"mirror cache ls | head -1 on {cache.name}: exit "
                             f"{p.returncode}, stderr {p.stderr[-1000:]!r}")

    def add_orphans(self, cache: Path, count: int = 3) -> None:
        """Content no image uses, last used an hour ago: what gc must remove."""
        async def work() -> None:
            meta = SqliteMetadata(database_path(cache))
            await meta.open()
            try:
                for _ in range(count):
                    data = os.urandom(4096)
                    path = blob_path(cache, sha256(data))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    os.utime(path, (time.time() - 3600,) * 2)
                    await meta.add_content(sha256(data), len(data), UP, time.time() - 3600)
            finally:
                await meta.close()

        asyncio.run(work())

    def commands(self) -> None:
        cfg = self.cfg
        empty = self.work / "cache-empty-cli"
        (empty / "blobs").mkdir(parents=True)
        caches = {"empty": empty}
        if self.grown_100k:
            caches["100k"] = self.server_cache
        if self.grown_1m:
            caches["1M"] = self.big_store
        sizes = {"empty": 0, "100k": self.server_tags, "1M": self.store_size}
        times: dict[str, dict[str, list[float]]] = {
            c: {k: [] for k in ("import", "ls_byte", "ls_line", "rm", "gc")} for c in caches}
        upstream = f"{UP}=http://127.0.0.1:9"
        startup = [self.cli("--version")[0] for _ in range(3)]
        for r in range(cfg.rounds):
            names = list(caches) if r % 2 == 0 else list(caches)[::-1]
            for name in names:
                cache = str(caches[name])
                t = times[name]
                seconds, out = self.cli("import", str(self.bundle), "--cache-dir", cache,
                                        "--upstream", upstream)
                t["import"].append(seconds)
                if "3 blobs added" not in out:
                    raise BenchError(f"import into {name}: {out[-500:]}")
                byte, line = self.ls_first_lines(caches[name])
                t["ls_byte"].append(byte)
                t["ls_line"].append(line)
                seconds, out = self.cli("cache", "rm", "--cache-dir", cache, IMPORTED)
                t["rm"].append(seconds)
                if "3 entries" not in out:
                    raise BenchError(f"rm in {name}: {out[-500:]}")
                self.add_orphans(caches[name])
                seconds, out = self.cli("cache", "gc", "--cache-dir", cache, "--min-age", "60")
                t["gc"].append(seconds)
                if not out.startswith("removed 3 entries"):
                    raise BenchError(f"gc in {name}: {out[-500:]}")
        for cache in caches.values():
            self.head_quiet(cache)
        self.res.raw["3_commands_s"] = {
            name: {k: [round(x, 3) for x in v] for k, v in d.items()}
            for name, d in times.items()}
        self.res.raw["3_commands_s"]["python_startup"] = [round(x, 3) for x in startup]
        self.res.add("3. python -m mirror --version, s (startup, for scale; info)",
                     median(startup), None, fmt="{:.2f}")
        what = {"ls_line": "cache ls: time to the first image line",
                "ls_byte": "cache ls: time to the first byte on the pipe",
                "import": "import of one image (3 blobs, 256 KiB layer)",
                "rm": "cache rm of that image", "gc": "cache gc (3 orphans to remove)"}
        for key, text in what.items():
            e = median(times["empty"][key])
            for name in caches:
                if name == "empty":
                    continue
                b = median(times[name][key])
                self.res.add(f"3. {text}, s: {sizes[name]} tags vs empty", b, e, b / e,
                             fmt="{:.2f}")
        self.res.add("3. mirror cache ls piped to head -1: exit 0, nothing on stderr",
                     "yes", "yes", None, "quiet", True)

    # -- 4. memory --

    def memory(self) -> None:
        cfg = self.cfg
        if not self.grown_1m:
            raise BenchError("the 1M cache was not grown")
        m = self.start_mirror(self.big_store, 1, "rss")
        assert m.proc is not None
        pid = m.proc.pid  # one worker: uvicorn serves in the process itself
        samples: list[tuple[int, float]] = []
        sampler = RssSampler(pid, interval=0.2, max_seconds=cfg.lookup_seconds + 120)
        try:
            self.check_answer(m, 0, cfg.repos)
            sampler.__enter__()
            samples.append((0, rss_kib(pid) / 1024))
            limit = min(cfg.lookups, self.store_size)  # tags the cache holds
            chunk = max(1000, limit // 50)
            done = base = 0
            started = time.monotonic()
            while base + chunk <= limit:
                left = cfg.lookup_seconds - (time.monotonic() - started)
                if left < 1:
                    break
                want = chunk
                result = self.wrk(m.url, "miss", base, want // 2, cfg.repos, left)
                done += result.requests
                base += want + 16  # past what the interrupted connections had sent
                samples.append((done, rss_kib(pid) / 1024))
                log(f"  {done} distinct lookups: RSS {samples[-1][1]:.1f} MiB "
                    f"({result.rate:.0f}/s)")
            seconds = time.monotonic() - started
            metrics = httpx.get(f"{m.url}/metrics", trust_env=False, timeout=30).text
        finally:
            sampler.__exit__()
            m.stop()
        upstream_misses = sum(float(ln.split()[-1]) for ln in metrics.splitlines()
                              if ln.startswith("mirror_cache_lookups_total")
                              and 'kind="tag"' in ln and 'result="miss"' in ln)
        rss = samples[-1][1]
        peak = max(sampler.largest_mib, *(s for _, s in samples))
        self.res.raw["4_rss"] = {"samples_lookups_mib": [(n, round(s, 1)) for n, s in samples],
                                 "peak_mib": round(peak, 1),
                                 "seconds": round(seconds, 1),
                                 "tag_resolutions_upstream": upstream_misses}
        self.res.add(f"4. worker RSS after {done} distinct tag lookups, MiB "
                     f"(vs idle)", rss, samples[0][1], rss / samples[0][1], "< 200",
                     peak < 200)
        half = next((s for n, s in samples if n >= done / 2), rss)
        self.res.add("   growth over the second half of the lookups, MiB (info)", rss - half,
                     None)
        self.res.add("   distinct lookups/s (info)", done / seconds, None, fmt="{:.0f}")
        if done < cfg.lookups:
            self.res.notes.append(
                f"4. {done} distinct lookups fitted the time bound of {cfg.lookup_seconds} s, "
                f"not {cfg.lookups} (at {done / seconds:.0f}/s one worker would need "
                f"{cfg.lookups / (done / seconds):.0f} s)")


# -- environment and report -----------------------------------------------------------------


def environment() -> dict[str, str]:
    return machine() | {
        "sqlite": sqlite3.sqlite_version,
        "nginx": tool_version(["nginx", "-v"]),
        "redis-server": tool_version(["redis-server", "--version"]),
        "wrk": tool_version(["wrk", "-v"]),
    }


def report(cfg: Config, env: dict[str, str], res: Results, seconds: float) -> str:
    lines = [
        f"## Metadata at scale{' (--quick)' if cfg.quick else ''} (tests/bench/metadata.py)",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- data: {cfg.store_tags} tag records over {cfg.repos} repositories (SQLite; Redis "
        f"{cfg.redis_tags}), {cfg.server_tags} tags over {cfg.server_repos} repositories "
        f"through the server, {cfg.hot_tags} hot tags; {cfg.op_calls} calls per operation "
        f"and {cfg.rounds} alternating rounds ({cfg.server_rounds} for 2); wrk -t2 -c16 "
        f"-d{cfg.wrk_seconds}s; "
        f"mirrors with --tag-ttl {LONG_TTL}, access_ttl {LONG_TTL}, --access-log off",
        f"- total run time: {seconds:.0f} s",
        "",
        "Medians; ratio = at size / empty.",
        "",
        *report_tail(res, "###"),
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and short runs (about a minute)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (caches, logs) instead of removing it")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results.md",
                        help="markdown report to append to (default: tests/bench/results.md)")
    parser.add_argument("--lookup-seconds", type=int, metavar="SECONDS",
                        help="time bound of part 4 (default 120; 15 with --quick): long "
                        "enough for 1,000,000 lookups, about 600")
    parser.add_argument("--only", metavar="PARTS", default="1,2,3,4",
                        help="run only these parts, e.g. 2 or 1,4 (3 uses the caches of "
                        "those that ran; 4 needs 1)")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    cfg = Config.make(args.quick)
    if args.lookup_seconds:
        cfg = dataclasses.replace(cfg, lookup_seconds=args.lookup_seconds,
                                  hard_limit_s=cfg.hard_limit_s + args.lookup_seconds)
    for tool in ("nginx", "wrk", "redis-server"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 2
    import uvloop

    uvloop.install()
    abort_on((signal.SIGTERM, signal.SIGALRM), cfg.hard_limit_s)
    work = Path(tempfile.mkdtemp(prefix="mirror-metadata-bench-"))
    work.chmod(0o755)  # nginx's worker (another user when started as root) reads www/
    bench = Bench(cfg, work)
    started = time.monotonic()
    env = environment()
    log(f"work directory {work}; {env['nproc']} CPUs; mirror {env['mirror']}")
    warn_if_busy()
    try:
        phases: list[tuple[str, str, Callable[[], None]]] = [
            ("1", "1. store at scale (interface)", bench.store_scale),
            ("2", "2a. grow a cache through the server", bench.server_grow),
            ("2", "2b. tag hits and misses at scale", bench.server_rates),
            ("3", "3. cache commands at scale", bench.commands),
            ("4", "4. worker RSS over distinct lookups", bench.memory),
        ]
        for part, name, fn in phases:
            if part in parts:
                bench.phase(name, fn)
        bench.cleanup()
    except KeyboardInterrupt as exc:
        print(f"\nbench: interrupted ({exc}), cleaning up", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    else:
        env["load average at end"] = loadavg()
        text = report(cfg, env, bench.res, time.monotonic() - started)
        append_report(args.output, text)
        bench.res.raw.pop("phase_seconds", None)
        return print_results(bench.res, args.output, "appended")
    finally:
        signal.alarm(0)
        bench.cleanup()
        if args.keep:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
