#!/usr/bin/env python3
"""Benchmark the mirror against two caching peers, distribution's own pull-through proxy
("peer") and an nginx caching proxy ("nginx", set up as docker-registry-proxy does), and
against pulling directly from the upstream, in one run, on the same data, over loopback.

    python tests/bench/run.py [--quick] [--keep] [--only PHASES] [--baseline DIR] [--s3]

Starts an upstream docker-registry (no auth: nginx cannot do the token dance), pushes three
images of random (incompressible) layers into it with skopeo, starts the mirror and the peers
in front of it and measures:

1. cache-hit blob throughput (curl, one ~200 MiB layer),
2. cached manifest GETs per second (wrk), by tag and by digest, with 2 and 1 workers,
3. cold pull wall time of a ~400 MiB image (skopeo) through a fresh mirror vs direct,
4. 8 concurrent cold clients of one ~1 GiB blob (alike: each discards the body): upstream
   GETs, wall time, and how soon after the upstream's first byte every client has its first
   byte,
5. the mirror's peak RSS during 4,
6. one cold client of the ~1 GiB blob (the speed of one fill) and the CPU seconds the
   mirror's process tree spends per GiB filled, beside the floor of a verifying fill
   (tests/bench/floor.py: the same data path as a bare loop) and sha256's own cost.

Every cold run starts a fresh server with an empty cache (nginx too); runs alternate between
the contenders; medians. `--baseline DIR` also runs the mirror code in DIR (another checkout)
in the cold phases, alternating with this one, for a before/after under the same load. `--s3`
adds the cold phases on an object store (single-node Ceph radosgw, Redis for metadata).

Prints a table (and the raw runs) and writes it to tests/bench/results.md. The exit status
is 0 when every measurement ran, even if a target is missed (see the `ok` column); 1 if a
measurement could not be made or its result was wrong (e.g. a client got a short body).
`--quick` shrinks the data 10x (and wrk runs to 2 s) for a fast debugging run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))

from common import (  # noqa: E402
    BenchError,
    Comparison,
    CpuMeter,
    RssSampler,
    Runner,
    abort_on,
    cpu_seconds,
    loadavg,
    log,
    machine,
    packages,
    print_results,
    process_tree,
    report_tail,
    tool_version,
    warn_if_busy,
)
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
from support.procs import MirrorProc, Proc, clean_env, free_port, wait_http  # noqa: E402
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
    single_runs: int = 5  # test 6: one cold client, per contender
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


class Results(Comparison):
    head = ("metric", "mirror", "other (as named)", "ratio", "target", "ok")


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
CLIENT_FORMAT = CURL_FORMAT + " %{time_starttransfer}"


def curl_argv(url: str, out: str, max_time: float, fmt: str = CURL_FORMAT) -> list[str]:
    return ["curl", "-sS", "--noproxy", "*", "--max-time", str(int(max_time)), "-o", out,
            "-w", fmt, url]


def parse_curl(stdout: str) -> CurlResult:
    code, size, speed, total = stdout.split()[:4]
    return CurlResult(int(code), int(float(size)), float(speed), float(total))


def sha256_cost() -> float:
    """CPU seconds per GiB of sha256 alone, in memory (tests/bench/floor.py)."""
    p = subprocess.run([sys.executable, str(BENCH_DIR / "floor.py"), "sha256"],
                       capture_output=True, text=True, timeout=120, check=True)
    return float(p.stdout)


def curl(url: str, out: str = "/dev/null", max_time: float = 300) -> CurlResult:
    p = subprocess.run(curl_argv(url, out, max_time), capture_output=True, text=True,
                       timeout=max_time + 10, env=clean_env())
    if p.returncode != 0:
        raise BenchError(f"curl {url} failed ({p.returncode}): {p.stderr.strip()}")
    return parse_curl(p.stdout)


NGINX_CONF = """\
{user}worker_processes 2;
error_log {work}/error.log warn;
pid {work}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log {work}/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
    proxy_cache_path {work}/cache levels=1:2 keys_zone=cache:16m max_size=32g inactive=60d
                     use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_read_timeout 900;
        proxy_request_buffering off;
        proxy_buffering on;
        proxy_max_temp_file_size 0;
        proxy_set_header Host $http_host;
        # Content by digest is immutable: cached, keyed on the URI, one upstream request at a
        # time for it (the others wait for it to land, then read the cache).
        location ~ ^/v2/.*/(blobs|manifests)/sha256:[a-f0-9]+$ {{
            proxy_pass {upstream};
            proxy_cache cache;
            proxy_cache_key $uri;
            proxy_cache_valid 200 206 60d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 880s;
            proxy_ignore_headers Cache-Control Expires Set-Cookie X-Accel-Expires;
            add_header X-Cache-Status $upstream_cache_status;
        }}
        location / {{
            proxy_pass {upstream};
        }}
    }}
}}
"""


class NginxCache:
    """nginx as a caching proxy of the upstream, as docker-registry-proxy sets it up:
    `proxy_cache` keyed on the URI for blobs and manifests by digest, `proxy_cache_lock`,
    buffering with no temp files besides the cache's, sendfile, 2 workers."""

    def __init__(self, work: Path, upstream: str, name: str = "nginx") -> None:
        self.work = work / name
        self.name = name
        self.upstream = upstream
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> NginxCache:
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        # As root, nginx's workers would run as nobody, who cannot write our cache directory.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(work=self.work, port=self.port,
                                          upstream=self.upstream, user=user))
        self.proc = Proc(["nginx", "-c", str(conf), "-p", str(self.work), "-g", "daemon off;"],
                         self.work, name="nginx")
        wait_http(f"{self.url}/v2/", 20, proc=self.proc)
        deadline = time.monotonic() + 10  # both workers up: they share the CPU measured
        while len(process_tree(self.proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def has(self, uri: str, size: int) -> bool:
        """Whether the cache holds the whole response for `uri` (its file: a header + body)."""
        key = hashlib.md5(uri.encode()).hexdigest()
        path = self.work / "cache" / key[-1] / key[-3:-1] / key
        return path.exists() and path.stat().st_size > size

    def error_log(self) -> str:
        path = self.work / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


class FirstByteRelay:
    """A TCP relay in front of the upstream that notes when the first byte of each answer
    arrives (the time of the first upstream byte after a request went out), by request line.
    Upstream-to-client bytes move with splice(2), so it costs little."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answers: list[tuple[str, float]] = []  # (request line, first answer byte)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="relay")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FirstByteRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._socks += [client, upstream]
            pending: list[str] = []  # requests sent, answer not yet seen
            for fn in (self._requests, self._answers):
                t = threading.Thread(target=fn, args=(client, upstream, pending), daemon=True)
                self._threads.append(t)
                t.start()

    def _requests(self, client: socket.socket, upstream: socket.socket,
                  pending: list[str]) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                line = data.split(b"\r\n", 1)[0].decode(errors="replace")
                if line.split(" ", 1)[0] in ("GET", "HEAD"):
                    with self._lock:
                        pending.append(line)
                upstream.sendall(data)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _answers(self, client: socket.socket, upstream: socket.socket,
                 pending: list[str]) -> None:
        r, w = os.pipe()
        try:
            while True:
                n = os.splice(upstream.fileno(), w, 1 << 20)
                if n == 0:
                    break
                now = time.time()
                with self._lock:
                    if pending:
                        self.answers.append((pending.pop(0), now))
                while n:
                    n -= os.splice(r, client.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)

    def first_byte(self, needle: str) -> float | None:
        with self._lock:
            return next((t for line, t in self.answers if needle in line), None)


def first_body_byte(host: str, port: int, path: str, size: int,
                    timeout: float = 600) -> tuple[float, int]:
    """GET `path` over one connection: (when the first byte of the body arrived, epoch
    seconds; body bytes received). curl can only time the first byte of the answer, which
    the mirror sends before the upstream has sent anything."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                raise BenchError(f"GET {path}: connection closed in the headers")
            head += data
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise BenchError(f"GET {path}: status {status!r}")
        got = len(head.split(b"\r\n\r\n", 1)[1])
        first = time.time() if got else 0.0
        buf = bytearray(1 << 20)
        while got < size:
            n = sock.recv_into(buf)
            if not n:
                break
            if not first:
                first = time.time()
            got += n
        return first, got


# -- the benchmark --------------------------------------------------------------------------


class Bench(Runner):
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
        self.nginx_errors: list[str] = []
        self.mirror1: MirrorProc | None = None  # --workers 1
        self.nginx: NginxCache | None = None
        self.base_mirror: MirrorProc | None = None  # the baseline's, in phases 1 and 2
        self.baseline: Path | None = None  # another checkout's mirror, in the cold phases
        self._n = 0

    # -- servers --

    def start_mirror(self, workers: int, label: str, code: Path = REPO_ROOT,
                     upstream: str | None = None, args: Sequence[str] = (),
                     env: dict[str, str] | None = None) -> MirrorProc:
        assert self.upstream is not None
        self._n += 1
        m = MirrorProc([(UPSTREAM_NAME, upstream or self.upstream.url)],
                       self.work / f"mirror-{self._n}-{label}-cache",
                       self.work / f"mirror-{self._n}-{label}-logs", workers=workers,
                       code=code, args=args, env=env)
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

    def start_nginx(self, label: str) -> NginxCache:
        assert self.upstream is not None
        self._n += 1
        n = NginxCache(self.work, self.upstream.url, name=f"nginx-{self._n}-{label}")
        self.cleanups.append(n.stop)
        return n.start()

    def discard_nginx(self, n: NginxCache) -> None:
        n.stop()
        self.nginx_errors.append(n.error_log())
        shutil.rmtree(n.work, ignore_errors=True)

    def contenders(self) -> dict[str, Path]:
        """The mirrors measured in the cold phases: this checkout's, and the baseline's."""
        return {"mirror": REPO_ROOT, **({"baseline": self.baseline} if self.baseline else {})}

    # -- phases --

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
        self.nginx = self.start_nginx("hits")
        self.mirror = self.start_mirror(2, "w2")
        self.mirror1 = self.start_mirror(1, "w1")
        if self.baseline is not None:
            self.base_mirror = self.start_mirror(2, "base-w2", code=self.baseline)
        log(f"upstream {self.upstream.url}, peer {self.peer.url}, nginx {self.nginx.url}, "
            f"mirror {self.mirror.url} (workers=2), mirror {self.mirror1.url} (workers=1)")

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
        assert self.mirror and self.mirror1 and self.peer and self.nginx
        img = self.images["layer"]
        digest, size = img.layers[0]
        repo = img.info.repo
        servers = {"mirror": self.mirror, "mirror_w1": self.mirror1,
                   **({"baseline": self.base_mirror} if self.base_mirror else {})}
        for label, m in servers.items():
            self.warm_blob(label, m.url, repo, digest, size,
                           functools.partial(self.mirror_has, m, digest, size))
        peer, nginx = self.peer, self.nginx
        self.warm_blob("peer", peer.url, repo, digest, size,
                       lambda: self.peer_has(peer, repo, digest, size))
        uri = f"/v2/{repo}/blobs/{digest}"
        self.warm_blob("nginx", nginx.url, repo, digest, size, lambda: nginx.has(uri, size))
        assert self.upstream is not None
        urls = {"mirror": self.mirror.url, "nginx": nginx.url, "peer": peer.url,
                "mirror_w1": self.mirror1.url, "direct": self.upstream.url,
                **({"baseline": self.base_mirror.url} if self.base_mirror else {})}
        runs: dict[str, list[float]] = {k: [] for k in urls}
        for _ in range(self.cfg.throughput_runs):
            for label, base in urls.items():  # alternating: mirror, nginx, peer, ...
                r = curl(f"{base}{uri}", max_time=120)
                if r.code != 200 or r.size != size:
                    raise BenchError(f"{label}: got {r.code}, {r.size} bytes (want {size})")
                runs[label].append(round(r.speed / 1e6, 1))
        self.res.raw["1_blob_hit_MBps"] = runs
        med = {k: statistics.median(v) for k, v in runs.items()}
        mb = size / 1e6
        ratio = med["mirror"] / med["nginx"]
        self.res.add(f"1. blob cache hit, {mb:.0f} MB layer, MB/s (workers=2) vs nginx "
                     "(sendfile)", med["mirror"], med["nginx"], ratio, ">= 1.2", ratio >= 1.2)
        ratio = med["mirror"] / med["peer"]
        self.res.add("   same, vs peer (distribution proxy)", med["mirror"], med["peer"], ratio,
                     ">= 1.5", ratio >= 1.5)
        self.res.add("   same, mirror --workers 1 vs nginx (info)", med["mirror_w1"],
                     med["nginx"], med["mirror_w1"] / med["nginx"])
        if "baseline" in med:
            self.res.add("   same, baseline mirror (workers=2) vs nginx (info)", med["baseline"],
                         med["nginx"], med["baseline"] / med["nginx"])
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
                   "mirror_w1": self.mirror1.url, "direct": self.upstream.url,
                   **({"baseline": self.base_mirror.url} if self.base_mirror else {})}
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
            if "baseline" in med:
                ratio = med["mirror"] / med["baseline"]
                self.res.add("   same, mirror vs baseline mirror (workers=2): no lower",
                             med["mirror"], med["baseline"], ratio, ">= 0.95 (noise)",
                             ratio >= 0.95, fmt="{:.0f}")

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
        mirrors = self.contenders()
        runs: dict[str, list[float]] = {k: [] for k in [*mirrors, "direct", "nginx", "peer"]}
        gets: dict[str, list[int]] = {k: [] for k in [*mirrors, "nginx", "peer"]}
        n_blobs = len(img.info.blobs)

        def counted(label: str, host: str) -> None:
            assert self.upstream is not None
            mark = self.upstream.mark()
            runs[label].append(round(self.pull(host, img.ref, dest, timeout), 2))
            gets[label].append(sum(1 for r in self.upstream.requests(since=mark)
                                   if r.is_blob_get))

        for i in range(self.cfg.cold_runs):
            for label, code in mirrors.items():
                m = self.start_mirror(2, f"cold{i}-{label}", code=code)
                try:
                    counted(label, m.host)
                finally:
                    self.discard_mirror(m)
            runs["direct"].append(round(self.pull(self.upstream.host, img.ref, dest, timeout), 2))
            nginx = self.start_nginx(f"cold{i}")
            try:
                counted("nginx", nginx.host)
            finally:
                self.discard_nginx(nginx)
            peer = self.start_registry(f"peer-cold{i}", proxy=True)
            try:
                counted("peer", peer.host)
            finally:
                self.discard_registry(peer)
        self.res.raw["3_cold_pull_seconds"] = runs
        self.res.raw["3_cold_pull_upstream_blob_gets"] = {**gets, "blobs_in_image": n_blobs}
        med = {k: statistics.median(v) for k, v in runs.items()}
        total = sum(s for _, s in img.layers) / 1e6
        ratio = med["mirror"] / med["direct"]
        self.res.add(f"3. cold pull {total:.0f} MB image (skopeo), s: mirror vs direct",
                     med["mirror"], med["direct"], ratio, "<= 1.05", ratio <= 1.05, fmt="{:.2f}")
        if "baseline" in med:
            self.res.add("   same, baseline mirror vs direct (info)", med["baseline"],
                         med["direct"], med["baseline"] / med["direct"], fmt="{:.2f}")
        for label, name in (("nginx", "nginx"), ("peer", "peer (distribution proxy)")):
            self.res.add(f"   same, {name} vs direct (info)", None, f"{med[label]:.2f}",
                         med[label] / med["direct"])
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
        max_time = 600
        mark = self.upstream.mark()
        procs: list[subprocess.Popen[str]] = []
        launched: list[float] = []
        cpu = CpuMeter(pid)
        with RssSampler(pid) as rss:
            cpu.start()
            started = time.monotonic()
            wall_started = time.time()
            try:
                for _ in range(self.cfg.clients):
                    launched.append(time.time())
                    procs.append(subprocess.Popen(
                        curl_argv(url, "/dev/null", max_time, CLIENT_FORMAT),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env=clean_env()))
                results: list[CurlResult | str] = []
                first: list[float] = []  # each client's first body byte, epoch seconds
                for t0, p in zip(launched, procs, strict=True):
                    left = max(1.0, started + max_time + 30 - time.monotonic())
                    stdout, stderr = p.communicate(timeout=left)
                    if p.returncode == 0:
                        results.append(parse_curl(stdout))
                        first.append(t0 + float(stdout.split()[4]))
                    else:
                        results.append(f"curl exit {p.returncode}: {stderr.strip()}")
                wall = time.monotonic() - started
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            cpu_s = cpu.stop()
            time.sleep(0.3)
        # Count once the cache has the blob: a background upstream fetch (the peer's
        # storeLocal) is only logged by the upstream when it completes.
        deadline = time.monotonic() + 120
        while not cached() and time.monotonic() < deadline:
            time.sleep(0.2)
        upstream_gets = self.settled_blob_gets(mark, digest)
        complete = sum(1 for r in results
                       if isinstance(r, CurlResult) and r.code == 200 and r.size == size)
        # The clients are alike: one that also wrote its body to disk took a bigger share of
        # the CPU than the others and finished last, alone (tests/integration/
        # test_single_flight.py checks every concurrent client's bytes). What the server
        # serves once the clients are gone is checked here.
        served = self.work / f"{label}-served.bin"
        curl(url, str(served), max_time)
        got = file_sha256(served)
        served.unlink()
        return {
            "upstream_blob_gets": upstream_gets,
            "complete_clients": complete,
            "served_sha256_ok": got == digest,
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu_s, 2),
            "launched_epoch": wall_started,
            "first_byte_s": [round(t - wall_started, 4) for t in first],
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
        uri = f"/v2/{img.info.repo}/blobs/{digest}"
        mirrors = self.contenders()
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in [*mirrors, "nginx", "peer"]}
        for i in range(self.cfg.cold_runs):
            for label, code in mirrors.items():
                m = self.start_mirror(2, f"conc{i}-{label}", code=code)
                try:
                    assert m.proc is not None
                    r = self.clients_run(label, m.url, m.proc.pid,
                                         functools.partial(self.mirror_has, m, digest, size))
                    r["cached_after"] = self.mirror_has(m, digest, size)
                    runs[label].append(r)
                finally:
                    self.discard_mirror(m)
            nginx = self.start_nginx(f"conc{i}")
            try:
                assert nginx.proc is not None
                runs["nginx"].append(self.clients_run(
                    "nginx", nginx.url, nginx.proc.pid,
                    functools.partial(nginx.has, uri, size)))
            finally:
                self.discard_nginx(nginx)
            if i == 0:  # for information: slow, and the same every time
                peer = self.start_registry("peer-conc", proxy=True)
                try:
                    assert peer.proc is not None
                    runs["peer"].append(self.clients_run("peer", peer.url, peer.proc.pid,
                                                         functools.partial(
                        self.peer_has, peer, img.info.repo, digest, size)))
                finally:
                    self.discard_registry(peer)
        self.res.raw["4_concurrent_cold_clients"] = runs
        n = self.cfg.clients
        for label, rs in runs.items():
            for r in rs:
                if r["complete_clients"] != n or not r["served_sha256_ok"]:
                    self.res.errors.append(
                        f"4. {label}: {r['complete_clients']}/{n} clients got {size} bytes, "
                        f"served sha256 ok: {r['served_sha256_ok']}; {r['clients']}")

        def med(label: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[label])

        gets = [r["upstream_blob_gets"] for r in runs["mirror"]]
        self.res.add(f"4. upstream GETs of a {size / 1e6:.0f} MB blob, {n} cold clients "
                     "(mirror runs; nginx; peer)", "/".join(map(str, gets)),
                     f"{med('nginx', 'upstream_blob_gets'):.0f}; "
                     f"{med('peer', 'upstream_blob_gets'):.0f}", None, "mirror = 1",
                     all(g == 1 for g in gets))
        self.res.add("   clients that got the full body (info)",
                     f"{min(r['complete_clients'] for r in runs['mirror'])}/{n}",
                     f"{min(r['complete_clients'] for r in runs['nginx'])}/{n}")
        wall, other = med("mirror", "wall_s"), med("nginx", "wall_s")
        self.res.add("   wall time for all clients, s, vs nginx", wall, other, wall / other,
                     "<= 1.0", wall / other <= 1.0, fmt="{:.2f}")
        if "baseline" in runs:
            base = med("baseline", "wall_s")
            self.res.add("   same, baseline mirror vs nginx (info)", base, other, base / other,
                         fmt="{:.2f}")
        self.res.add("   same, peer (distribution proxy) (info)", None,
                     f"{med('peer', 'wall_s'):.2f}", med("peer", "wall_s") / wall)
        gib = size / 2**30
        self.res.add("   CPU s of the process tree per GiB delivered to all clients (info)",
                     med("mirror", "cpu_s") / gib / n, med("nginx", "cpu_s") / gib / n,
                     med("mirror", "cpu_s") / med("nginx", "cpu_s"), fmt="{:.2f}")
        largest = max(r["rss_largest_mib"] for r in runs["mirror"])
        worker = max(r["rss_largest_worker_mib"] for r in runs["mirror"])
        self.res.add("5. peak RSS during 4, largest process, MiB", largest,
                     max(r["rss_largest_mib"] for r in runs["nginx"]), None, "< 200",
                     largest < 200)
        self.res.add("   peak RSS during 4, largest worker, MiB", worker, None, None, "< 200",
                     worker < 200)
        self.res.add("   peak RSS during 4, sum over process tree, MiB (info)",
                     max(r["rss_peak_sum_mib"] for r in runs["mirror"]),
                     max(r["rss_peak_sum_mib"] for r in runs["nginx"]))

    def first_byte(self) -> None:
        """4 again, through a relay in front of the upstream that notes when the upstream's
        first byte arrives: every client must have its first body byte within 50 ms of it."""
        assert self.upstream is not None
        img = self.images["big"]
        digest, size = img.layers[0]
        path = f"/v2/{img.info.repo}/blobs/{digest}"
        lags: dict[str, list[float]] = {}
        for i in range(self.cfg.cold_runs):
            for label, code in self.contenders().items():
                with FirstByteRelay(("127.0.0.1", self.upstream.port)) as relay:
                    m = self.start_mirror(2, f"first{i}-{label}", code=code, upstream=relay.url)
                    results: list[tuple[float, int] | BaseException] = []

                    try:
                        threads = [threading.Thread(target=self._first_client,
                                                    args=(m.port, path, size, results))
                                   for _ in range(self.cfg.clients)]
                        for t in threads:
                            t.start()
                        for t in threads:
                            t.join(600)
                    finally:
                        self.discard_mirror(m)
                    upstream_first = relay.first_byte(f"GET {path}")
                firsts = [r[0] for r in results if isinstance(r, tuple) and r[1] == size]
                if upstream_first is None or len(firsts) != self.cfg.clients:
                    raise BenchError(f"first byte {label}: upstream first byte "
                                     f"{upstream_first}, clients {results}")
                lag = [round(1000 * (t - upstream_first), 1) for t in firsts]
                lags.setdefault(label, []).append(max(lag))
                self.res.raw.setdefault("4c_first_byte_lag_ms", {}).setdefault(
                    label, []).append(sorted(lag))
        worst = statistics.median(lags["mirror"])
        self.res.add(f"4c. {self.cfg.clients} cold clients: the last client's first body byte "
                     "after the upstream's first, ms (median of runs)", worst, None, None,
                     "<= 50", worst <= 50)
        if "baseline" in lags:
            self.res.add("   same, baseline mirror (info)", statistics.median(lags["baseline"]),
                         None)

    @staticmethod
    def _first_client(port: int, path: str, size: int,
                      results: list[tuple[float, int] | BaseException]) -> None:
        try:
            results.append(first_body_byte("127.0.0.1", port, path, size))
        except (OSError, BenchError) as exc:
            results.append(exc)

    def single_cold(self) -> None:
        """One cold client of the big blob (the speed of one fill) through a fresh mirror, a
        fresh nginx, a fresh peer and directly, alternating; the CPU each server's process
        tree spends on it."""
        assert self.upstream is not None
        img = self.images["big"]
        digest, size = img.layers[0]
        path = f"/v2/{img.info.repo}/blobs/{digest}"
        speeds: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}
        gib = size / 2**30

        def get(label: str, base: str, pid: int | None) -> None:
            meter = CpuMeter(pid) if pid is not None else None
            if meter is not None:
                meter.start()
            r = curl(base + path, max_time=600)
            if meter is not None:
                time.sleep(0.2)  # the fill's commit, after the last byte
                cpus.setdefault(label, []).append(round(meter.stop() / gib, 3))
            if r.code != 200 or r.size != size:
                raise BenchError(f"{label}: got {r.code}, {r.size} bytes (want {size})")
            speeds.setdefault(label, []).append(round(r.speed / 1e6, 1))

        for i in range(self.cfg.single_runs):
            for label, code in self.contenders().items():
                m = self.start_mirror(2, f"single{i}-{label}", code=code)
                try:
                    assert m.proc is not None
                    get(label, m.url, m.proc.pid)
                finally:
                    self.discard_mirror(m)
            nginx = self.start_nginx(f"single{i}")
            try:
                assert nginx.proc is not None
                get("nginx", nginx.url, nginx.proc.pid)
            finally:
                self.discard_nginx(nginx)
            with self.floor(path, digest) as (url, pid):
                get("floor", url, pid)
            get("direct", self.upstream.url, None)
            if i < 2:  # for information: the same every time
                peer = self.start_registry(f"peer-single{i}", proxy=True)
                try:
                    assert peer.proc is not None
                    get("peer", peer.url, peer.proc.pid)
                finally:
                    self.discard_registry(peer)
        self.res.raw["6_one_cold_client_MBps"] = speeds
        self.res.raw["6_one_cold_client_cpu_s_per_GiB"] = cpus
        med = {k: statistics.median(v) for k, v in speeds.items()}
        cpu = {k: statistics.median(v) for k, v in cpus.items()}
        mb = size / 1e6
        ratio = med["mirror"] / med["nginx"]
        self.res.add(f"6. one cold client of the {mb:.0f} MB blob, MB/s: mirror vs nginx",
                     med["mirror"], med["nginx"], ratio, ">= 1.0", ratio >= 1.0)
        if "baseline" in med:
            self.res.add("   same, baseline mirror vs nginx (info)", med["baseline"],
                         med["nginx"], med["baseline"] / med["nginx"])
        self.res.add("   same, mirror vs direct (info)", med["mirror"], med["direct"],
                     med["mirror"] / med["direct"])
        self.res.add("   same, peer (distribution proxy) vs direct (info)", None, med["peer"],
                     med["peer"] / med["direct"])
        self.res.add("   same, the floor (bare recv/sha256/write/sendfile loop, floor.py) vs "
                     "nginx (info)", med["floor"], med["nginx"], med["floor"] / med["nginx"])
        self.res.add("   CPU s per GiB filled (server's process tree): mirror vs nginx",
                     cpu["mirror"], cpu["nginx"], cpu["mirror"] / cpu["nginx"], "<= 1.2 s",
                     cpu["mirror"] <= 1.2, fmt="{:.2f}")
        if "baseline" in cpu:
            self.res.add("   same, baseline mirror vs nginx (info)", cpu["baseline"],
                         cpu["nginx"], cpu["baseline"] / cpu["nginx"], fmt="{:.2f}")
        self.res.add("   same, mirror vs the floor (info)", cpu["mirror"], cpu["floor"],
                     cpu["mirror"] / cpu["floor"], fmt="{:.2f}")
        hashing = sha256_cost()
        self.res.raw["6_sha256_cpu_s_per_GiB"] = hashing
        self.res.add("   CPU s per GiB of sha256 alone, in memory (floor.py sha256; info)",
                     hashing, None, None, fmt="{:.2f}")

    @contextlib.contextmanager
    def floor(self, path: str, digest: str) -> Iterator[tuple[str, int]]:
        """The floor of a verifying fill (tests/bench/floor.py) in front of the upstream:
        its URL and pid, for one GET."""
        assert self.upstream is not None
        proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "floor.py"), "serve", self.upstream.host, path,
             digest, str(self.work)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=clean_env())
        try:
            assert proc.stdin is not None and proc.stdout is not None
            port = int(proc.stdout.readline() or 0)
            if not port:
                raise BenchError(f"floor.py did not start: {proc.communicate(timeout=10)[1]}")
            yield f"http://127.0.0.1:{port}", proc.pid
            _, err = proc.communicate(timeout=60)  # closes its stdin: it exits
            if proc.returncode != 0:
                raise BenchError(f"floor.py failed: {err}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # 7. the same cold paths with content on an object store

    def object_store(self) -> None:
        """One cold client and 8 concurrent cold clients of the big blob through a mirror
        whose storage is s3:// (Ceph radosgw, metadata in Redis; fresh bucket prefix and empty
        Redis each run), alternating with the same through a mirror on local disk. The fill
        streams to the bucket as it goes; the object must be there, whole, after each run."""
        from support.ceph import Ceph, GiB, missing_binaries
        from support.redisd import RedisServer

        missing = missing_binaries() + [b for b in ("redis-server",) if not shutil.which(b)]
        if missing:
            raise BenchError(f"--s3 needs {', '.join(missing)} (tests/run installs them)")
        assert self.upstream is not None
        img = self.images["big"]
        digest, size = img.layers[0]
        path = f"/v2/{img.info.repo}/blobs/{digest}"
        ceph = Ceph(self.work / "ceph", osd_size=64 * GiB)
        self.cleanups.append(lambda: (ceph.stop(), ceph.remove_data()))
        ceph.start()
        ceph.create_bucket("bench")
        redis = RedisServer(self.work / "redis")
        self.cleanups.append(redis.stop)
        redis.start()
        s3 = ceph.client()
        assert ceph.rgw is not None and ceph.osd is not None
        store_pids = [ceph.rgw.pid, ceph.osd.pid]
        gib = size / 2**30
        speeds: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}
        store_cpu: list[float] = []
        walls: dict[str, list[dict[str, Any]]] = {}

        def stored(prefix: str) -> int | None:
            try:
                return int(s3.head_object(Bucket="bench", Key=f"{prefix}/blobs/sha256/"
                                          f"{digest.removeprefix('sha256:')}")["ContentLength"])
            except s3.exceptions.ClientError:
                return None

        def mirror(label: str, code: Path, prefix: str | None) -> MirrorProc:
            if prefix is None:
                return self.start_mirror(2, label, code=code)
            redis.flushall()
            return self.start_mirror(2, label, code=code, args=[
                "--storage", f"s3://bench/{prefix}", "--redis", redis.url],
                env={**ceph.env(), "MIRROR_SCRUB_RATE": "0"})

        n = 0
        for i in range(3):
            for label, code in self.contenders().items():
                for where in ("s3", "local") if i % 2 == 0 else ("local", "s3"):
                    n += 1
                    prefix = f"cold-{n}" if where == "s3" else None
                    m = mirror(f"{where}{i}-{label}", code, prefix)
                    try:
                        assert m.proc is not None
                        meter = CpuMeter(m.proc.pid)
                        meter.start()
                        before = cpu_seconds(store_pids)
                        r = curl(m.url + path, max_time=600)
                        deadline = time.monotonic() + 60
                        while prefix and stored(prefix) is None and time.monotonic() < deadline:
                            time.sleep(0.05)
                        time.sleep(0.2)
                        key = f"{label} {where}"
                        cpus.setdefault(key, []).append(round(meter.stop() / gib, 3))
                        if where == "s3":
                            store_cpu.append(round((cpu_seconds(store_pids) - before) / gib, 3))
                        if r.code != 200 or r.size != size:
                            raise BenchError(f"{key}: got {r.code}, {r.size} bytes")
                        if prefix and stored(prefix) != size:
                            raise BenchError(f"{key}: the bucket holds {stored(prefix)} bytes")
                        speeds.setdefault(key, []).append(round(r.speed / 1e6, 1))
                    finally:
                        self.discard_mirror(m)
        for label, code in self.contenders().items():
            n += 1
            prefix = f"conc-{n}"
            m = mirror(f"s3conc-{label}", code, prefix)
            try:
                assert m.proc is not None
                walls.setdefault(label, []).append(self.clients_run(
                    f"s3-{label}", m.url, m.proc.pid,
                    functools.partial(lambda p: stored(p) == size, prefix)))
            finally:
                self.discard_mirror(m)
        self.res.raw["7_object_store"] = {"MBps": speeds, "cpu_s_per_GiB": cpus,
                                          "radosgw_osd_cpu_s_per_GiB": store_cpu,
                                          "concurrent": walls}
        med = {k: statistics.median(v) for k, v in speeds.items()}
        cpu = {k: statistics.median(v) for k, v in cpus.items()}
        for label in self.contenders():
            name = "mirror" if label == "mirror" else "baseline mirror"
            s3_, local = med[f"{label} s3"], med[f"{label} local"]
            self.res.add(f"7. one cold client, MB/s, {name}: s3:// storage vs local disk (info)",
                         s3_, local, s3_ / local)
            c3, cl = cpu[f"{label} s3"], cpu[f"{label} local"]
            self.res.add(f"   CPU s per GiB filled, {name}: s3:// vs local disk (info)", c3, cl,
                         c3 / cl, fmt="{:.2f}")
            conc = walls[label][0]
            self.res.add(f"   {self.cfg.clients} cold clients on s3://, {name}: wall s; "
                         "upstream GETs (info)", conc["wall_s"], str(conc["upstream_blob_gets"]),
                         fmt="{:.2f}")
        self.res.add("   radosgw + OSD CPU s per GiB stored (info)",
                     statistics.median(store_cpu), None, fmt="{:.2f}")

    # -- logs --

    def scan_logs(self) -> None:
        findings: dict[str, Any] = {}
        for path in self.mirror_logs:
            if not path.exists():
                continue
            lines = path.read_text(errors="replace").splitlines()
            bad = [ln for ln in lines if " INFO " not in ln and any(w in ln for w in (
                "ERROR", "WARNING", "Traceback", "Exception", "error:", "CRITICAL"))]
            if bad:
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
        nginx = [ln for text in self.nginx_errors for ln in text.splitlines()]
        findings["nginx"] = {"error_log_lines": len(nginx), "first": nginx[:10]}
        self.res.raw["logs"] = findings


def _json_lines(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)


# -- environment and report -----------------------------------------------------------------


def environment() -> dict[str, str]:
    return machine() | {
        "packages": packages(("uvicorn", "starlette", "httpx", "uvloop", "httptools")),
        "docker-registry": tool_version(["docker-registry", "--version"]),
        "skopeo": tool_version(["skopeo", "--version"]),
        "curl": tool_version(["curl", "--version"]),
        "wrk": tool_version(["wrk", "-v"]),
    }


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
        *report_tail(res),
    ]
    return "\n".join(lines)


def write_report(path: Path, text: str) -> None:
    """Replace this benchmark's section of `path`; sections other benchmarks appended to it
    (a first-level heading of their own, e.g. tests/bench/cluster.py's) stay."""
    old = path.read_text() if path.exists() else ""
    others = [i for i, line in enumerate(old.splitlines(keepends=True))
              if line.startswith("# ") and not line.startswith("# mirror benchmark")]
    kept = "".join(old.splitlines(keepends=True)[others[0]:]) if others else ""
    path.write_text(text + ("\n" + kept if kept else ""))


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller data, 2 s wrk runs")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (logs, storage) instead of removing it")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results.md",
                        help="markdown report (default: tests/bench/results.md)")
    parser.add_argument("--only", type=lambda v: set(v.split(",")), default=set(),
                        help="run only these phases, comma-separated: 1,2,3,4,4c,6,s3")
    parser.add_argument("--baseline", type=Path,
                        help="also run the mirror from this checkout in the cold phases")
    parser.add_argument("--s3", action="store_true",
                        help="also run the cold phases on an object store (Ceph radosgw)")
    args = parser.parse_args(argv)
    cfg = Config.make(args.quick)
    for tool in ("docker-registry", "skopeo", "wrk", "curl", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 2
    abort_on((signal.SIGTERM, signal.SIGALRM), cfg.hard_limit_s)
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    bench = Bench(cfg, work)
    bench.baseline = args.baseline.resolve() if args.baseline else None
    phases: list[tuple[str, str, Callable[[], None]]] = [
        ("1", "1. blob cache-hit throughput", bench.throughput),
        ("2", "2. cached manifest requests/s", bench.manifest_rps),
        ("3", "3. cold pull", bench.cold_pull),
        ("4", "4/5. concurrent cold clients + RSS", bench.concurrency),
        ("4c", "4c. first bytes of concurrent cold clients", bench.first_byte),
        ("6", "6. one cold client, CPU per GiB", bench.single_cold),
    ]
    if args.s3 or "s3" in args.only:
        phases.append(("s3", "7. object store", bench.object_store))
    started = time.monotonic()
    env = environment()
    log(f"work directory {work}; {env['nproc']} CPUs; mirror {env['mirror']}")
    warn_if_busy()
    try:
        bench.setup()
        for key, name, fn in phases:
            if not args.only or key in args.only:
                bench.phase(name, fn)
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
        write_report(args.output, text)
        for key in ("images", "phase_seconds"):
            bench.res.raw.pop(key, None)
        return print_results(bench.res, args.output, "written")
    finally:
        signal.alarm(0)
        bench.cleanup()
        if args.keep:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
