#!/usr/bin/env python3
"""Benchmark the mirror against distribution's own pull-through proxy ("peer") and against
pulling directly from the upstream, in one run, on the same data, over loopback.

    python tests/bench/run.py [--quick] [--keep]

Starts an upstream docker-registry, pushes three images of random (incompressible) layers
into it with skopeo, starts the mirror and the peer in front of it and measures:

1. cache-hit blob throughput (curl, one ~200 MiB layer),
2. cached manifest GETs per second (wrk), by tag and by digest, with 2 and 1 workers,
3. cold pull wall time of a ~400 MiB image (skopeo) through a fresh mirror vs direct,
4. upstream GETs caused by 8 concurrent cold clients of one ~1 GiB blob,
5. the mirror's peak RSS during 4.

Prints a table (and the raw runs) and writes it to tests/bench/results.md. The exit status
is 0 when every measurement ran, even if a target is missed (see the `ok` column); 1 if a
measurement could not be made or its result was wrong (e.g. a client got a short body).
`--quick` shrinks the data 10x (and wrk runs to 2 s) for a fast debugging run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.images import (  # noqa: E402
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    ImageInfo,
    Layout,
    inspect_raw,
    sha256,
    skopeo,
)
from support.procs import MirrorProc, clean_env  # noqa: E402
from support.registry import Registry  # noqa: E402

MiB = 1 << 20
ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
UPSTREAM_NAME = "up"  # the mirror's (only, hence default) upstream
PUSH_CREDS = "bench:bench"  # the upstream has no auth; skopeo never needs to send these
WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


class BenchError(RuntimeError):
    """A measurement could not be made, or what it measured was wrong."""


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    layer_size: int  # test 1: the single layer of bench/layer200
    image_layers: int  # test 3: bench/image400 has this many layers of image_layer_size
    image_layer_size: int
    big_size: int  # test 4: the single layer of bench/blob1g
    throughput_runs: int = 7
    wrk_runs: int = 3
    wrk_seconds: int = 5
    wrk_connections: int = 16
    wrk_threads: int = 2
    cold_runs: int = 3
    clients: int = 8
    hard_limit_s: int = 1800  # SIGALRM: the whole run is aborted (and cleaned up) after this

    @staticmethod
    def make(quick: bool) -> Config:
        scale = 0.1 if quick else 1.0
        return Config(
            quick=quick,
            layer_size=int(200 * MiB * scale),
            image_layers=4,
            image_layer_size=int(100 * MiB * scale),
            big_size=int(1024 * MiB * scale),
            wrk_seconds=2 if quick else 5,
            hard_limit_s=600 if quick else 1800,
        )


# -- results --------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    mirror: str
    other: str
    ratio: str
    target: str
    ok: str  # "yes", "NO", "-" (no target), "error"


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, mirror: float | str | None, other: float | str | None,
            ratio: float | None = None, target: str = "-", ok: bool | None = None,
            fmt: str = "{:.1f}") -> None:
        def show(v: float | str | None) -> str:
            if v is None:
                return "-"
            return v if isinstance(v, str) else fmt.format(v)
        self.rows.append(Row(metric, show(mirror), show(other),
                             "-" if ratio is None else f"{ratio:.2f}", target,
                             "-" if ok is None else ("yes" if ok else "NO")))

    def error(self, metric: str, message: str) -> None:
        self.errors.append(f"{metric}: {message}")
        self.rows.append(Row(metric, "error", "error", "-", "-", "error"))


def fmt_table(rows: Sequence[Row], markdown: bool) -> str:
    head = ["metric", "mirror", "peer (distribution proxy) or direct", "ratio", "target", "ok"]
    cells = [head] + [[r.metric, r.mirror, r.other, r.ratio, r.target, r.ok] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "| " + " | ".join("---" for _ in head) + " |")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- test data ------------------------------------------------------------------------------


@dataclass
class BenchImage:
    info: ImageInfo
    layers: list[tuple[str, int]]  # (digest, size) of each layer

    @property
    def ref(self) -> str:
        return self.info.ref


def write_random_layer(blob_dir: Path, size: int, name: str) -> tuple[str, int]:
    """An uncompressed tar holding one file of `size` random bytes, written 1 MiB at a time
    into `blob_dir` under its digest; returns (digest, length)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
    hasher = hashlib.sha256()
    tmp = blob_dir / f".{name.replace('/', '_')}.tmp"
    length = 0
    with open(tmp, "wb") as f:
        def put(data: bytes) -> None:
            nonlocal length
            hasher.update(data)
            f.write(data)
            length += len(data)

        put(info.tobuf(format=tarfile.USTAR_FORMAT))
        left = size
        while left > 0:  # bounded: size / 1 MiB iterations
            n = min(MiB, left)
            put(os.urandom(n))
            left -= n
        put(b"\0" * (-size % tarfile.BLOCKSIZE))
        put(b"\0" * (2 * tarfile.BLOCKSIZE))  # end of archive
    digest = "sha256:" + hasher.hexdigest()
    tmp.rename(blob_dir / digest[7:])
    return digest, length


def build_image(root: Path, repo: str, tag: str, layer_sizes: Sequence[int]) -> BenchImage:
    """An OCI image layout of one image with random uncompressed tar layers."""
    layout = Layout(root / repo.replace("/", "_"))
    blob_dir = layout.path / "blobs" / "sha256"
    descs, layers = [], []
    for i, size in enumerate(layer_sizes):
        digest, length = write_random_layer(blob_dir, size, f"bench/{repo}/random-{i}.bin")
        descs.append({"mediaType": OCI_LAYER_TAR, "digest": digest, "size": length})
        layers.append((digest, length))
        layout.blobs.append((digest, length))
    config = {
        "created": "2024-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},  # uncompressed
    }
    cdesc = {"mediaType": OCI_CONFIG, **layout.add(json.dumps(config).encode())}
    layout.blobs.append((cdesc["digest"], cdesc["size"]))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc, "layers": descs}
    mdesc = {"mediaType": OCI_MANIFEST, **layout.add(json.dumps(manifest, indent=2).encode())}
    layout.tag(mdesc, tag)
    info = ImageInfo(repo, tag, mdesc["digest"], OCI_MANIFEST, mdesc["size"], layout.blobs,
                     layout=str(layout.path))
    return BenchImage(info, layers)


def push_image(image: BenchImage, host: str, timeout: float) -> None:
    dest = f"docker://{host}/{image.ref}"
    skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"--dest-creds={PUSH_CREDS}",
           f"dir:{image.info.push_dir}", dest, timeout=timeout)
    got = sha256(inspect_raw(dest, creds=PUSH_CREDS))
    if got != image.info.digest:
        raise BenchError(f"{image.ref}: pushed digest {got} != built {image.info.digest}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# -- process helpers ------------------------------------------------------------------------


@dataclass
class CurlResult:
    code: int
    size: int
    speed: float  # bytes/s
    seconds: float


CURL_FORMAT = "%{http_code} %{size_download} %{speed_download} %{time_total}"


def curl_argv(url: str, out: str, max_time: float) -> list[str]:
    return ["curl", "-sS", "--noproxy", "*", "--max-time", str(int(max_time)), "-o", out,
            "-w", CURL_FORMAT, url]


def parse_curl(stdout: str) -> CurlResult:
    code, size, speed, total = stdout.split()
    return CurlResult(int(code), int(float(size)), float(speed), float(total))


def curl(url: str, out: str = "/dev/null", max_time: float = 300) -> CurlResult:
    p = subprocess.run(curl_argv(url, out, max_time), capture_output=True, text=True,
                       timeout=max_time + 10, env=clean_env())
    if p.returncode != 0:
        raise BenchError(f"curl {url} failed ({p.returncode}): {p.stderr.strip()}")
    return parse_curl(p.stdout)


def tool_version(argv: Sequence[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def proc_stat_ppids() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(b")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from the ppids in /proc/*/stat)."""
    children = proc_stat_ppids()
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 10_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


class RssSampler:
    """Samples the summed VmRSS of a process tree every `interval` s in a thread."""

    def __init__(self, root: int, interval: float = 0.05, max_seconds: float = 900) -> None:
        self.root = root
        self.interval = interval
        self.max_seconds = max_seconds
        self.peak: dict[int, int] = {}  # pid -> peak KiB
        self.names: dict[int, str] = {}
        self.peak_sum = 0
        self.first_sum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self.sample()
        self.first_sum = self.peak_sum
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            self.sample()

    def sample(self) -> None:
        total = 0
        for pid in process_tree(self.root):
            kib = rss_kib(pid)
            total += kib
            if pid not in self.names:
                self.names[pid] = cmdline(pid)
            self.peak[pid] = max(self.peak.get(pid, 0), kib)
        self.peak_sum = max(self.peak_sum, total)
        self.samples += 1

    def role(self, pid: int) -> str:
        name = self.names.get(pid, "")
        if pid == self.root:
            return "main"
        if "spawn_main" in name:
            return "worker"
        if "resource_tracker" in name:
            return "resource_tracker"
        return "other: " + name[:60]

    def per_process(self) -> list[str]:
        return [f"{self.role(pid)} pid {pid}: {kib / 1024:.1f} MiB"
                for pid, kib in sorted(self.peak.items())]

    @property
    def largest_mib(self) -> float:
        return max(self.peak.values(), default=0) / 1024

    @property
    def largest_worker_mib(self) -> float:
        return max((k for p, k in self.peak.items() if self.role(p) == "worker"),
                   default=0) / 1024


# -- the benchmark --------------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.res = Results()
        self.cleanups: list[Callable[[], object]] = []
        self.mirror_logs: list[Path] = []
        self.registries: list[Registry] = []
        self.images: dict[str, BenchImage] = {}
        self.upstream: Registry | None = None
        self.upstream_log_start = 0
        self.peer: Registry | None = None
        self.mirror: MirrorProc | None = None  # --workers 2
        self.mirror1: MirrorProc | None = None  # --workers 1
        self._n = 0

    # -- servers --

    def start_mirror(self, workers: int, label: str) -> MirrorProc:
        assert self.upstream is not None
        self._n += 1
        m = MirrorProc([(UPSTREAM_NAME, self.upstream.url)],
                       self.work / f"mirror-{self._n}-{label}-cache",
                       self.work / f"mirror-{self._n}-{label}-logs", workers=workers)
        self.cleanups.append(m.stop)
        self.mirror_logs.append(m.log_dir / "mirror.log")
        m.start()
        # /v2/ answered by one worker; let the others finish importing too, so that start-up
        # does not compete for CPU with what is measured next.
        deadline = time.monotonic() + 30
        assert m.proc is not None
        while m.proc.log_text().count("Application startup complete") < workers:
            if time.monotonic() > deadline or not m.alive:
                raise BenchError(f"mirror {label}: not all {workers} workers started: "
                                 f"{m.proc.log_text()[-2000:]}")
            time.sleep(0.05)
        return m

    def discard_mirror(self, m: MirrorProc) -> None:
        m.stop()
        shutil.rmtree(m.cache_dir, ignore_errors=True)

    def start_registry(self, name: str, proxy: bool) -> Registry:
        remote = self.upstream.url if proxy and self.upstream is not None else None
        r = Registry(self.work, name=name, proxy_remote=remote)
        self.cleanups.append(r.stop)
        self.registries.append(r)
        return r.start()

    def discard_registry(self, r: Registry) -> None:
        r.stop()
        shutil.rmtree(r.root, ignore_errors=True)

    def cleanup(self) -> None:
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()
        self.cleanups.clear()

    # -- phases --

    def phase(self, name: str, fn: Callable[[], None]) -> None:
        log(f"== {name}")
        started = time.monotonic()
        try:
            fn()
        except (BenchError, subprocess.SubprocessError, httpx.HTTPError, OSError,
                TimeoutError, RuntimeError, AssertionError, ValueError) as exc:
            detail = "".join(traceback.format_exception_only(exc)).strip()
            log(f"!! {name} failed: {detail}")
            self.res.error(name, detail[:2000])
        self.res.raw.setdefault("phase_seconds", {})[name] = round(time.monotonic() - started, 1)

    def setup(self) -> None:
        cfg = self.cfg
        data = self.work / "layouts"
        started = time.monotonic()
        specs = {
            "layer": ("bench/layer200", "1", [cfg.layer_size]),
            "image": ("bench/image400", "1", [cfg.image_layer_size] * cfg.image_layers),
            "big": ("bench/blob1g", "1", [cfg.big_size]),
        }
        for key, (repo, tag, sizes) in specs.items():
            self.images[key] = build_image(data, repo, tag, sizes)
        built = time.monotonic() - started
        total = sum(s for img in self.images.values() for _, s in img.layers)
        log(f"built {total / MiB:.0f} MiB of layers in {built:.1f} s")
        self.upstream = self.start_registry("upstream", proxy=False)
        started = time.monotonic()
        for img in self.images.values():
            push_image(img, self.upstream.host, timeout=600)
        log(f"pushed to {self.upstream.url} in {time.monotonic() - started:.1f} s")
        shutil.rmtree(data)  # the upstream has it all now
        self.upstream_log_start = self.upstream.mark()  # skip the push's (expected) 404s
        self.res.raw["images"] = {
            img.ref: {"manifest": img.info.digest,
                      "layers": [{"digest": d, "bytes": s} for d, s in img.layers]}
            for img in self.images.values()}
        self.peer = self.start_registry("peer", proxy=True)
        self.mirror = self.start_mirror(2, "w2")
        self.mirror1 = self.start_mirror(1, "w1")
        log(f"upstream {self.upstream.url}, peer {self.peer.url}, mirror {self.mirror.url} "
            f"(workers=2), mirror {self.mirror1.url} (workers=1)")

    def upstream_blob_gets(self, since: int, digest: str) -> int:
        assert self.upstream is not None
        return sum(1 for r in self.upstream.requests(since=since, settle=0)
                   if r.is_blob_get and digest in r.path)

    def settled_blob_gets(self, since: int, digest: str, timeout: float = 30) -> int:
        """Upstream GETs of `digest` since `since`, once the count stops changing."""
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            time.sleep(0.5)
            n = self.upstream_blob_gets(since, digest)
            if n == last or time.monotonic() > deadline:  # unchanged for 0.5 s
                return n
            last = n

    # 1. cache-hit blob throughput

    def warm_blob(self, label: str, base: str, repo: str, digest: str, size: int,
                  cached: Callable[[], bool]) -> None:
        assert self.upstream is not None
        url = f"{base}/v2/{repo}/blobs/{digest}"
        for _ in range(3):  # bounded: the first GET, then up to 2 re-checks
            r = curl(url)
            if r.code != 200 or r.size != size:
                raise BenchError(f"{label}: GET {url} -> {r.code}, {r.size} bytes (want {size})")
            deadline = time.monotonic() + 60
            while not cached() and time.monotonic() < deadline:
                time.sleep(0.1)
            mark = self.upstream.mark()
            r = curl(url)
            if r.code != 200 or r.size != size:
                raise BenchError(f"{label}: GET {url} -> {r.code}, {r.size} bytes (want {size})")
            if self.upstream_blob_gets(mark, digest) == 0 and cached():
                return
            time.sleep(1)
        raise BenchError(f"{label}: blob {digest} still fetched from upstream after warming")

    def mirror_has(self, m: MirrorProc, digest: str, size: int) -> bool:
        hexd = digest.removeprefix("sha256:")
        path = m.cache_dir / "blobs" / "sha256" / hexd[:2] / hexd
        return path.exists() and path.stat().st_size == size

    def peer_has(self, r: Registry, repo: str, digest: str, size: int) -> bool:
        hexd = digest.removeprefix("sha256:")
        v2 = r.root / "docker" / "registry" / "v2"
        data = v2 / "blobs" / "sha256" / hexd[:2] / hexd / "data"
        link = v2 / "repositories" / repo / "_layers" / "sha256" / hexd / "link"
        return link.exists() and data.exists() and data.stat().st_size == size

    def throughput(self) -> None:
        assert self.mirror and self.mirror1 and self.peer
        img = self.images["layer"]
        digest, size = img.layers[0]
        repo = img.info.repo
        servers = {"mirror": self.mirror, "mirror_w1": self.mirror1}
        for label, m in servers.items():
            self.warm_blob(label, m.url, repo, digest, size,
                           functools.partial(self.mirror_has, m, digest, size))
        peer = self.peer
        self.warm_blob("peer", peer.url, repo, digest, size,
                       lambda: self.peer_has(peer, repo, digest, size))
        assert self.upstream is not None
        urls = {"mirror": self.mirror.url, "peer": peer.url, "mirror_w1": self.mirror1.url,
                "direct": self.upstream.url}
        runs: dict[str, list[float]] = {k: [] for k in urls}
        for _ in range(self.cfg.throughput_runs):
            for label, base in urls.items():  # alternating: mirror, peer, mirror_w1, ...
                r = curl(f"{base}/v2/{repo}/blobs/{digest}", max_time=120)
                if r.code != 200 or r.size != size:
                    raise BenchError(f"{label}: got {r.code}, {r.size} bytes (want {size})")
                runs[label].append(round(r.speed / 1e6, 1))
        self.res.raw["1_blob_hit_MBps"] = runs
        med = {k: statistics.median(v) for k, v in runs.items()}
        ratio = med["mirror"] / med["peer"]
        mb = size / 1e6
        self.res.add(f"1. blob cache hit, {mb:.0f} MB layer, MB/s (workers=2)", med["mirror"],
                     med["peer"], ratio, ">= 1.5", ratio >= 1.5)
        self.res.add("   same, mirror --workers 1 (info)", med["mirror_w1"], med["peer"],
                     med["mirror_w1"] / med["peer"])
        self.res.add("   same, mirror (workers=2) vs direct upstream registry (info)",
                     med["mirror"], med["direct"], med["mirror"] / med["direct"])

    # 2. cached manifest requests/s

    def check_manifest(self, label: str, url: str, digest: str) -> None:
        with httpx.Client(trust_env=False, timeout=30) as client:
            r = client.get(url, headers={"Accept": ACCEPT})
        got = r.headers.get("docker-content-digest")
        if r.status_code != 200 or got != digest or sha256(r.content) != digest:
            raise BenchError(f"{label}: GET {url} -> {r.status_code}, Docker-Content-Digest "
                             f"{got}, body {sha256(r.content)} (want 200, {digest})")

    def wrk(self, url: str) -> dict[str, Any]:
        script = self.work / "count.lua"
        if not script.exists():
            script.write_text(WRK_SCRIPT)
        cfg = self.cfg
        argv = ["wrk", f"-t{cfg.wrk_threads}", f"-c{cfg.wrk_connections}",
                f"-d{cfg.wrk_seconds}s", "--timeout", "5s", "-s", str(script),
                "-H", f"Accept: {ACCEPT}", url]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=cfg.wrk_seconds + 60,
                           env=clean_env())
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if p.returncode != 0 or line is None:
            raise BenchError(f"wrk {url} failed ({p.returncode}): {p.stdout}{p.stderr}")
        out: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
        out["rps"] = round(out["requests"] / (out["duration_us"] / 1e6), 1)
        errors = sum(out[k] for k in ("connect", "read", "write", "status", "timeout"))
        if errors:
            raise BenchError(f"wrk {url}: {errors} errors/non-2xx-3xx responses: {out}")
        return out

    def manifest_rps(self) -> None:
        assert self.mirror and self.mirror1 and self.peer and self.upstream
        img = self.images["layer"].info
        servers = {"mirror": self.mirror.url, "peer": self.peer.url,
                   "mirror_w1": self.mirror1.url, "direct": self.upstream.url}
        refs = {"tag": img.tag, "digest": img.digest}

        def url(base: str, ref: str) -> str:
            return f"{base}/v2/{img.repo}/manifests/{ref}"

        def check_all(when: str) -> None:
            for label, base in servers.items():
                for ref in refs.values():
                    self.check_manifest(f"{label} ({when})", url(base, ref), img.digest)

        check_all("before")
        check_all("before, warm")
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for kind, ref in refs.items():
            raw[kind] = {label: [] for label in servers}
            for _ in range(self.cfg.wrk_runs):
                for label, base in servers.items():  # alternating
                    time.sleep(0.5)  # the previous run's last upstream log lines land first
                    mark = self.upstream.mark()
                    out = self.wrk(url(base, ref))
                    out["upstream_requests"] = len(self.upstream.requests(since=mark, settle=0.3))
                    raw[kind][label].append(out)
        check_all("after")
        self.res.raw["2_manifest_wrk"] = {
            kind: {label: [{k: o[k] for k in ("rps", "requests", "p50_us", "p99_us",
                                              "upstream_requests")} for o in outs]
                   for label, outs in per.items()}
            for kind, per in raw.items()}
        targets = {"tag": 20.0, "digest": 8.0}
        for kind in refs:
            med = {label: statistics.median(o["rps"] for o in outs)
                   for label, outs in raw[kind].items()}
            t = targets[kind]
            for label, workers in (("mirror", 2), ("mirror_w1", 1)):
                ratio = med[label] / med["peer"]
                self.res.add(f"2. manifest GET by {kind}, req/s (workers={workers})", med[label],
                             med["peer"], ratio, f">= {t:g}", ratio >= t, fmt="{:.0f}")
            self.res.add("   same, mirror (workers=2) vs direct upstream registry (info)",
                         med["mirror"], med["direct"], med["mirror"] / med["direct"],
                         fmt="{:.0f}")

    # 3. cold pull wall time

    def pull(self, host: str, repo_tag: str, dest: Path, timeout: float) -> float:
        shutil.rmtree(dest, ignore_errors=True)
        started = time.perf_counter()
        skopeo("copy", "--src-tls-verify=false", "--src-no-creds", f"docker://{host}/{repo_tag}",
               f"dir:{dest}", timeout=timeout)
        seconds = time.perf_counter() - started
        img = self.images["image"]
        got = sha256((dest / "manifest.json").read_bytes())
        if got != img.info.digest:
            raise BenchError(f"pull via {host}: manifest {got} != {img.info.digest}")
        for digest, size in img.layers:
            path = dest / digest.removeprefix("sha256:")
            if path.stat().st_size != size:
                raise BenchError(f"pull via {host}: layer {digest} has {path.stat().st_size} "
                                 f"bytes, want {size}")
        shutil.rmtree(dest, ignore_errors=True)
        return seconds

    def cold_pull(self) -> None:
        assert self.upstream is not None
        img = self.images["image"]
        dest = self.work / "pull-dest"
        timeout = 600
        runs: dict[str, list[float]] = {"mirror": [], "direct": [], "peer": []}
        gets: dict[str, list[int]] = {"mirror": [], "peer": []}
        n_blobs = len(img.info.blobs)
        for i in range(self.cfg.cold_runs):
            m = self.start_mirror(2, f"cold{i}")
            try:
                mark = self.upstream.mark()
                runs["mirror"].append(round(self.pull(m.host, img.ref, dest, timeout), 2))
                gets["mirror"].append(sum(1 for r in self.upstream.requests(since=mark)
                                          if r.is_blob_get))
            finally:
                self.discard_mirror(m)
            runs["direct"].append(round(self.pull(self.upstream.host, img.ref, dest, timeout), 2))
            peer = self.start_registry(f"peer-cold{i}", proxy=True)
            try:
                mark = self.upstream.mark()
                runs["peer"].append(round(self.pull(peer.host, img.ref, dest, timeout), 2))
                gets["peer"].append(sum(1 for r in self.upstream.requests(since=mark)
                                        if r.is_blob_get))
            finally:
                self.discard_registry(peer)
        self.res.raw["3_cold_pull_seconds"] = runs
        self.res.raw["3_cold_pull_upstream_blob_gets"] = {**gets, "blobs_in_image": n_blobs}
        med = {k: statistics.median(v) for k, v in runs.items()}
        total = sum(s for _, s in img.layers) / 1e6
        ratio = med["mirror"] / med["direct"]
        self.res.add(f"3. cold pull {total:.0f} MB image (skopeo), s: mirror vs direct",
                     med["mirror"], med["direct"], ratio, "<= 1.15", ratio <= 1.15, fmt="{:.2f}")
        self.res.add("   same, peer vs direct (info)", None, f"{med['peer']:.2f}",
                     med["peer"] / med["direct"])
        if any(g != n_blobs for g in gets["mirror"]):
            self.res.notes.append(f"cold pull: upstream blob GETs per mirror run {gets['mirror']}"
                                  f" (image has {n_blobs} blobs)")

    # 4 + 5. concurrent cold clients, RSS

    def clients_run(self, label: str, base: str, pid: int,
                    cached: Callable[[], bool]) -> dict[str, Any]:
        assert self.upstream is not None
        img = self.images["big"]
        digest, size = img.layers[0]
        url = f"{base}/v2/{img.info.repo}/blobs/{digest}"
        out0 = self.work / f"{label}-client0.bin"
        max_time = 600
        mark = self.upstream.mark()
        procs: list[subprocess.Popen[str]] = []
        with RssSampler(pid) as rss:
            started = time.monotonic()
            try:
                for i in range(self.cfg.clients):
                    procs.append(subprocess.Popen(
                        curl_argv(url, str(out0) if i == 0 else "/dev/null", max_time),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env=clean_env()))
                results: list[CurlResult | str] = []
                for p in procs:
                    left = max(1.0, started + max_time + 30 - time.monotonic())
                    stdout, stderr = p.communicate(timeout=left)
                    results.append(parse_curl(stdout) if p.returncode == 0
                                   else f"curl exit {p.returncode}: {stderr.strip()}")
                wall = time.monotonic() - started
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            time.sleep(0.3)
        # Count once the cache has the blob: a background upstream fetch (the peer's
        # storeLocal) is only logged by the upstream when it completes.
        deadline = time.monotonic() + 120
        while not cached() and time.monotonic() < deadline:
            time.sleep(0.2)
        upstream_gets = self.settled_blob_gets(mark, digest)
        complete = sum(1 for r in results
                       if isinstance(r, CurlResult) and r.code == 200 and r.size == size)
        got0 = file_sha256(out0) if out0.exists() else "missing"
        out0.unlink(missing_ok=True)
        return {
            "upstream_blob_gets": upstream_gets,
            "complete_clients": complete,
            "client0_sha256_ok": got0 == digest,
            "wall_s": round(wall, 2),
            "clients": [r if isinstance(r, str) else
                        f"{r.code} {r.size} B {r.speed / 1e6:.1f} MB/s {r.seconds:.2f} s"
                        for r in results],
            "rss_samples": rss.samples,
            "rss_idle_sum_mib": round(rss.first_sum / 1024, 1),
            "rss_peak_sum_mib": round(rss.peak_sum / 1024, 1),
            "rss_largest_mib": round(rss.largest_mib, 1),
            "rss_largest_worker_mib": round(rss.largest_worker_mib, 1),
            "rss_peak_per_process": rss.per_process(),
        }

    def concurrency(self) -> None:
        img = self.images["big"]
        digest, size = img.layers[0]
        m = self.start_mirror(2, "conc")
        try:
            assert m.proc is not None
            mres = self.clients_run("mirror", m.url, m.proc.pid,
                                    functools.partial(self.mirror_has, m, digest, size))
            mres["cached_after"] = self.mirror_has(m, digest, size)
        finally:
            self.discard_mirror(m)
        peer = self.start_registry("peer-conc", proxy=True)
        try:
            assert peer.proc is not None
            pres = self.clients_run("peer", peer.url, peer.proc.pid, functools.partial(
                self.peer_has, peer, img.info.repo, digest, size))
        finally:
            self.discard_registry(peer)
        self.res.raw["4_concurrent_cold_clients"] = {"mirror": mres, "peer": pres}
        n = self.cfg.clients
        self.res.add(f"4. upstream GETs of a {size / 1e6:.0f} MB blob, {n} cold clients",
                     mres["upstream_blob_gets"], pres["upstream_blob_gets"], None, "mirror = 1",
                     mres["upstream_blob_gets"] == 1, fmt="{:d}")
        self.res.add("   clients that got the full body (info)", f"{mres['complete_clients']}/{n}",
                     f"{pres['complete_clients']}/{n}")
        self.res.add("   wall time for all clients, s (info)", mres["wall_s"], pres["wall_s"],
                     mres["wall_s"] / pres["wall_s"], fmt="{:.2f}")
        for label, r in (("mirror", mres), ("peer", pres)):
            if r["complete_clients"] != n or not r["client0_sha256_ok"]:
                self.res.errors.append(
                    f"4. {label}: {r['complete_clients']}/{n} clients got {size} bytes, "
                    f"client 0 sha256 ok: {r['client0_sha256_ok']}; {r['clients']}")
        self.res.add("5. peak RSS during 4, largest process, MiB", mres["rss_largest_mib"],
                     pres["rss_largest_mib"], None, "< 200", mres["rss_largest_mib"] < 200)
        self.res.add("   peak RSS during 4, largest worker, MiB", mres["rss_largest_worker_mib"],
                     None, None, "< 200", mres["rss_largest_worker_mib"] < 200)
        self.res.add("   peak RSS during 4, sum over process tree, MiB (info)",
                     mres["rss_peak_sum_mib"], pres["rss_peak_sum_mib"])

    def single_cold(self) -> None:
        """For context to 4: how fast one cold client gets the big blob (the speed of one
        fill) through a fresh mirror, directly, and through a fresh peer."""
        assert self.upstream is not None
        img = self.images["big"]
        digest, size = img.layers[0]
        path = f"/v2/{img.info.repo}/blobs/{digest}"
        speeds: dict[str, float] = {}

        def get(label: str, base: str) -> None:
            r = curl(base + path, max_time=600)
            if r.code != 200 or r.size != size:
                raise BenchError(f"{label}: got {r.code}, {r.size} bytes (want {size})")
            speeds[label] = round(r.speed / 1e6, 1)

        m = self.start_mirror(2, "single")
        try:
            get("mirror", m.url)
        finally:
            self.discard_mirror(m)
        get("direct", self.upstream.url)
        peer = self.start_registry("peer-single", proxy=True)
        try:
            get("peer", peer.url)
        finally:
            self.discard_registry(peer)
        self.res.raw["4b_one_cold_client_MBps"] = speeds
        self.res.add(f"4b. one cold client of the {size / 1e6:.0f} MB blob, MB/s: mirror vs "
                     "direct (info)",
                     speeds["mirror"], speeds["direct"], speeds["mirror"] / speeds["direct"])
        self.res.add("   same, peer vs direct (info)", None, speeds["peer"],
                     speeds["peer"] / speeds["direct"])

    # -- logs --

    def scan_logs(self) -> None:
        findings: dict[str, Any] = {}
        for path in self.mirror_logs:
            if not path.exists():
                continue
            lines = path.read_text(errors="replace").splitlines()
            bad = [ln for ln in lines if any(w in ln for w in (
                "ERROR", "WARNING", "Traceback", "Exception", "error:", "CRITICAL"))]
            findings[path.parent.name] = {"lines": len(lines), "suspicious": len(bad),
                                          "first": list(dict.fromkeys(bad))[:15]}
        for r in self.registries:
            text = r.log_text()
            if r is self.upstream:
                text = text.encode()[self.upstream_log_start:].decode(errors="replace")
            levels = {lv: text.count(f'"level":"{lv}"') for lv in ("error", "warning")}
            msgs = [e.get("msg", "")[:200] for e in _json_lines(text)
                    if e.get("level") in ("error", "warning")]
            findings[r.name] = {**levels, "first": list(dict.fromkeys(msgs))[:10]}
        self.res.raw["logs"] = findings


def _json_lines(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)


# -- environment and report -----------------------------------------------------------------


def loadavg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def environment() -> dict[str, str]:
    def pkg(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    commit = tool_version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "mirror"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "load average at start (1, 5, 15 min)": loadavg(),
        "mirror": f"git {commit}{' + uncommitted changes in mirror/' if dirty else ''}",
        "python": platform.python_version(),
        "packages": ", ".join(f"{p} {pkg(p)}" for p in
                              ("uvicorn", "starlette", "httpx", "uvloop", "httptools")),
        "docker-registry": tool_version(["docker-registry", "--version"]),
        "skopeo": tool_version(["skopeo", "--version"]),
        "curl": tool_version(["curl", "--version"]),
        "wrk": tool_version(["wrk", "-v"]),
    }


def raw_text(raw: dict[str, Any], depth: int = 0) -> str:
    """Nested dicts as indented `key: compact JSON` lines."""
    lines = []
    for key, value in raw.items():
        if isinstance(value, dict) and depth < 2:
            lines.append(f"{'  ' * depth}{key}:")
            lines.append(raw_text(value, depth + 1))
        else:
            lines.append(f"{'  ' * depth}{key}: {json.dumps(value)}")
    return "\n".join(lines)


def report(cfg: Config, env: dict[str, str], res: Results, seconds: float) -> str:
    sizes = (f"layer {cfg.layer_size / MiB:.0f} MiB, image {cfg.image_layers} x "
             f"{cfg.image_layer_size / MiB:.0f} MiB, big blob {cfg.big_size / MiB:.0f} MiB")
    lines = [
        f"# mirror benchmark{' (--quick)' if cfg.quick else ''}",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- data: {sizes}; wrk -t{cfg.wrk_threads} -c{cfg.wrk_connections} "
        f"-d{cfg.wrk_seconds}s x {cfg.wrk_runs}; {cfg.throughput_runs} curl runs; "
        f"{cfg.cold_runs} cold pulls; {cfg.clients} concurrent clients",
        f"- total run time: {seconds:.0f} s",
        "",
        "Medians; ratio = mirror / other. MB = 10^6 bytes, MiB = 2^20 bytes.",
        "",
        fmt_table(res.rows, markdown=True),
        "",
    ]
    if res.errors:
        lines += ["## Errors", "", *(f"- {e}" for e in res.errors), ""]
    if res.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in res.notes), ""]
    lines += ["## Raw runs", "", "```", raw_text(res.raw), "```", ""]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def _abort(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller data, 2 s wrk runs")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (logs, storage) instead of removing it")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results.md",
                        help="markdown report (default: tests/bench/results.md)")
    args = parser.parse_args(argv)
    cfg = Config.make(args.quick)
    for tool in ("docker-registry", "skopeo", "wrk", "curl"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _abort)
    signal.signal(signal.SIGALRM, _abort)
    signal.alarm(cfg.hard_limit_s)
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    bench = Bench(cfg, work)
    started = time.monotonic()
    env = environment()
    log(f"work directory {work}; {env['nproc']} CPUs; mirror {env['mirror']}")
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: the machine is busy (load average {loadavg()}): numbers will be noisy")
    try:
        bench.setup()
        bench.phase("1. blob cache-hit throughput", bench.throughput)
        bench.phase("2. cached manifest requests/s", bench.manifest_rps)
        bench.phase("3. cold pull", bench.cold_pull)
        bench.phase("4/5. concurrent cold clients + RSS", bench.concurrency)
        bench.phase("4b. one cold client", bench.single_cold)
        bench.cleanup()  # stop everything so the logs are complete
        bench.scan_logs()
    except KeyboardInterrupt as exc:
        print(f"\nbench: interrupted ({exc}), cleaning up", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    else:
        env["load average at end"] = loadavg()
        text = report(cfg, env, bench.res, time.monotonic() - started)
        args.output.write_text(text)
        print("\n" + fmt_table(bench.res.rows, markdown=False) + "\n")
        for key in ("images", "phase_seconds"):
            bench.res.raw.pop(key, None)
        print("raw runs:\n" + raw_text(bench.res.raw))
        for e in bench.res.errors:
            print(f"ERROR: {e}")
        for n in bench.res.notes:
            print(f"note: {n}")
        print(f"\nreport written to {args.output}")
        return 1 if bench.res.errors else 0
    finally:
        signal.alarm(0)
        bench.cleanup()
        if args.keep:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
