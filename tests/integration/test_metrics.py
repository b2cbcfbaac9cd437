"""Watching the mirror: /metrics (summed over workers, also on --metrics-listen), every query of
the Grafana dashboard run through a real Prometheus, /healthz and /readyz, the access log."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import StartMirror
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from support.images import ImageInfo, skopeo_copy_to_dir
from support.procs import MirrorProc, Proc, free_port, wait_http
from support.registry import Upstream
from unit.test_dashboard import MAIN_PANELS, dashboard_queries, panel_queries

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])
IMAGE = "test/oci-single:1.0"
WAIT = 60.0  # upper bound of every wait below
Sample = tuple[str, dict[str, str], float]
REQUESTS = "mirror_http_requests_total"
MANIFESTS = "/v2/{name}/manifests/{reference}"  # route labels
BLOBS = "/v2/{name}/blobs/{digest}"


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.25)


def get(url: str, **kw: Any) -> httpx.Response:
    """One request on a connection of its own (so the kernel may hand it to any worker)."""
    return httpx.get(url, headers={"Accept": ACCEPT}, timeout=30, trust_env=False, **kw)


def scrape(url: str) -> list[Sample]:
    response = httpx.get(url, timeout=10, trust_env=False)
    assert response.status_code == 200, response.text
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(response.text)
            for s in family.samples]


def total(samples: list[Sample], name: str, **match: str) -> float:
    """Sum of the samples called `name` whose labels equal `match`, leaving out the requests
    for /metrics itself."""
    return sum(value for n, labels, value in samples
               if n == name and labels.get("route") != "/metrics"
               and all(labels.get(k) == v for k, v in match.items()))


def descendants(pid: int) -> list[int]:
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found += [child, *descendants(child)]
    return found


def multiproc_dir(mirror: MirrorProc) -> Path:
    """The directory where the mirror's workers keep their samples (from a worker's environ)."""
    assert mirror.proc is not None
    for pid in descendants(mirror.proc.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone already
            continue
        for entry in environ:
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError("no worker with PROMETHEUS_MULTIPROC_DIR")


def requests_by_worker(mirror: MirrorProc, scratch: Path) -> dict[str, float]:
    """Requests (not /metrics) each worker process counted: its own sample file, read alone."""
    counts = {}
    for db in multiproc_dir(mirror).glob("counter_*.db"):
        alone = scratch / db.stem
        shutil.rmtree(alone, ignore_errors=True)
        alone.mkdir(parents=True)
        shutil.copy(db, alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        samples = [(s.name, s.labels, s.value) for f in registry.collect() for s in f.samples]
        counts[db.stem.removeprefix("counter_")] = total(samples, REQUESTS)
    return counts


def settled(mirror: MirrorProc) -> list[Sample]:
    """A scrape of /metrics once the request count has stopped moving: a request is counted
    just after its answer went out, so the client may be a moment ahead of the counter."""
    samples = scrape(mirror.url + "/metrics")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = scrape(mirror.url + "/metrics")
        if total(again, REQUESTS) == total(samples, REQUESTS):
            return again
        samples = again
    raise TimeoutError("the request count kept moving")


def test_requests_are_counted_once_summed_over_all_workers(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    image = upstream.images[IMAGE]
    mirror = start_mirror(workers=2)
    before = settled(mirror)
    scratch = tmp_path / "scratch"
    by_worker_before = requests_by_worker(mirror, scratch)
    manifest = f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}"
    blobs = [f"{mirror.url}/v2/{image.repo}/blobs/{digest}" for digest, _ in image.blobs]
    missing = f"{mirror.url}/v2/{image.repo}/manifests/no-such-tag"
    batch = [manifest] * 40 + blobs + [missing]
    rounds = 0
    with ThreadPoolExecutor(8) as pool:
        while True:  # until both workers have answered some of the requests
            rounds += 1
            statuses = [r.status_code for r in pool.map(get, batch)]
            assert statuses == [200] * (len(batch) - 1) + [404]
            by_worker = requests_by_worker(mirror, scratch)
            busy = [pid for pid, n in by_worker.items() if n > by_worker_before.get(pid, 0)]
            if len(busy) >= 2:
                break
            assert rounds < 5, f"one worker answered all requests: {by_worker}"
    made = len(batch) * rounds

    after = settled(mirror)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew(REQUESTS) == made
    assert grew(REQUESTS, route=MANIFESTS, method="GET", status="200") == 40 * rounds
    assert grew(REQUESTS, route=MANIFESTS, method="GET", status="404") == rounds
    assert grew(REQUESTS, route=BLOBS, method="GET", status="200") == len(blobs) * rounds
    # The latency histogram saw the same requests,
    assert grew("mirror_http_request_duration_seconds_count") == made
    # and /metrics is the sum of what each worker counted.
    assert sum(requests_by_worker(mirror, scratch).values()) == total(after, REQUESTS)


# --- Prometheus and the dashboard -------------------------------------------------------------

class Prometheus:
    """A real Prometheus on loopback, scraping `targets` every second as job `mirror`."""

    def __init__(self, work: Path, targets: list[str]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "mirror",
                                "static_configs": [{"targets": targets}]}],
        }
        config_file = work / "prometheus.yml"
        config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.proc = Proc(["prometheus", f"--config.file={config_file}",
                          f"--storage.tsdb.path={work / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{self.port}"],
                         work, name="prometheus")
        try:
            wait_http(f"{self.url}/-/ready", 30, ok=lambda s: s == 200, proc=self.proc)
        except BaseException:
            self.proc.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, promql: str) -> dict[str, Any]:
        """The whole answer of /api/v1/query (also for a bad query: status "error")."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10,
                             trust_env=False)
        body: dict[str, Any] = response.json()
        return body

    def vector(self, promql: str) -> list[float]:
        body = self.query(promql)
        assert body["status"] == "success", (promql, body)
        data = body["data"]
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(r["value"][1]) for r in data["result"]]

    def scrapes_since(self, since: float) -> int:
        """Successful scrapes of every target since `since` (time.time()), the fewest of any."""
        window = max(1, math.floor(time.time() - since))
        return int(min(self.vector(f'sum_over_time(up{{job="mirror"}}[{window}s])'),
                       default=0))

    def wait_scrapes(self, n: int, since: float) -> None:
        wait_until(f"{n} scrapes by Prometheus", lambda: self.scrapes_since(since) >= n)

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def start_prometheus(tmp_path: Path, request: pytest.FixtureRequest
                     ) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        prometheus = Prometheus(tmp_path / f"prometheus-{len(started)}", targets)
        started.append(prometheus)
        return prometheus

    yield start
    for prometheus in started:
        prometheus.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for prometheus in started:
            print(f"--- prometheus log ---\n{prometheus.proc.log_text()[-5000:]}")


def pull(mirror: MirrorProc, image: ImageInfo, dest: Path) -> None:
    skopeo_copy_to_dir(f"docker://{mirror.host}/{image.ref}", dest)
    assert (dest / "manifest.json").exists()


@pytest.mark.parametrize("separate_port", [False, True], ids=["main-port", "metrics-listen"])
def test_every_dashboard_query_works_in_prometheus(
    upstream: Upstream, start_mirror: StartMirror, start_prometheus: Callable[..., Prometheus],
    tmp_path: Path, separate_port: bool
) -> None:
    image = upstream.images[IMAGE]
    if separate_port:
        metrics_at = f"127.0.0.1:{free_port()}"
        mirror = start_mirror(workers=2, args=["--metrics-listen", metrics_at])
        wait_http(f"http://{metrics_at}/metrics", 30, ok=lambda s: s == 200)
        # /metrics has moved off the main address
        assert get(f"{mirror.url}/metrics").status_code == 404
    else:
        mirror = start_mirror(workers=2)
        metrics_at = mirror.host
    assert "mirror_http_requests" in httpx.get(f"http://{metrics_at}/metrics",
                                               trust_env=False).text
    started = time.time()
    prometheus = start_prometheus([metrics_at])
    prometheus.wait_scrapes(2, started)

    # A cold pull and a warm one, then another warm one once Prometheus has seen the first two,
    # so that every counter grows between scrapes (rate() and increase() need that).
    pull(mirror, image, tmp_path / "pull-1")
    pull(mirror, image, tmp_path / "pull-2")
    assert get(f"{mirror.url}/v2/{image.repo}/manifests/no-such-tag").status_code == 404
    prometheus.wait_scrapes(2, time.time())
    pull(mirror, image, tmp_path / "pull-3")
    pulled = time.time()
    prometheus.wait_scrapes(3, pulled)
    assert prometheus.vector('up{job="mirror"}') == [1.0]

    bad = {}
    for query in dashboard_queries():
        body = prometheus.query(query.promql)
        if body.get("status") != "success":
            bad[query.where] = (query.promql, body.get("error"))
    assert not bad, f"queries Prometheus rejects: {bad}"

    empty = {}
    for title in MAIN_PANELS:
        for query in panel_queries(title):
            values = prometheus.vector(query.promql)
            if not values or any(math.isnan(v) for v in values):
                empty[query.where] = (query.promql, values)
    assert not empty, f"queries with no data: {empty}"

    # The numbers make sense: warm pulls were served from the cache.
    def one(title: str, ref: int = 0) -> float:
        [value] = prometheus.vector(panel_queries(title)[ref].promql)
        return value

    # (the counters that the cold pull created began life with their value, so increase()
    # and the ratios see only what came later: the warm pulls)
    assert 0 < one("Blob hit ratio") <= 1
    blobs = 'sum(mirror_cache_lookups_total{kind="blob", result="%s"})'
    assert prometheus.vector(blobs % "miss") == [len(image.blobs)]  # the cold pull
    assert prometheus.vector(blobs % "hit")[0] >= 2 * len(image.blobs)  # the warm ones
    assert 0 < one("Manifest & tag hit ratio") <= 1
    assert one("Bytes saved") >= image.blob_bytes  # the third pull came from the cache
    # (the cold pull fetched every blob once, before the counter's first scrape: no increase)
    [fetched] = prometheus.vector("sum(mirror_upstream_fetched_bytes_total)")
    assert fetched >= image.blob_bytes
    assert one("Requests / s") > 0
    assert prometheus.vector("sum(mirror_upstream_requests_total)")[0] > 0


# --- health -----------------------------------------------------------------------------------

def test_healthz_and_readyz(upstream: Upstream, start_mirror: StartMirror) -> None:
    mirror = start_mirror(workers=2)
    healthz = get(f"{mirror.url}/healthz")
    assert healthz.status_code == 200
    assert healthz.json() == {"status": "ok"}
    readyz = get(f"{mirror.url}/readyz")
    assert readyz.status_code == 200, readyz.text
    assert readyz.json()["ready"] is True


def test_readyz_fails_while_the_upstream_is_down_unless_offline(
    start_mirror: StartMirror
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    mirror = start_mirror(upstreams=[("docker.io", dead)])
    assert get(f"{mirror.url}/healthz").status_code == 200
    readyz = get(f"{mirror.url}/readyz")
    assert readyz.status_code == 503, readyz.text
    assert readyz.json()["ready"] is False
    assert readyz.json()["upstream"] is False

    offline = start_mirror(upstreams=[("docker.io", dead)], args=["--offline"])
    readyz = get(f"{offline.url}/readyz")
    assert readyz.status_code == 200, readyz.text
    assert readyz.json()["upstream"] == "offline"


# --- the access log ---------------------------------------------------------------------------

# TIME CLIENT "METHOD PATH" STATUS BYTES SECONDS cache=… upstream=…
PLAIN = re.compile(r'^\S+ \S+ "\S+ (\S+)" \d{3} \d+ \d+\.\d+ cache=\S+ upstream=\S+$')


def access_lines(mirror: MirrorProc, fmt: str) -> list[str]:
    """The mirror's access-log lines in the format `fmt`: in JSON, whole lines that are JSON
    objects with a path (every JSON line must parse); in plain text, lines of the shape of
    PLAIN."""
    lines = mirror.log_text().splitlines()
    if fmt == "json":  # every line is JSON then: the access log's are those with a path
        return [line for line in lines if line.startswith("{") and "path" in json.loads(line)]
    return [line for line in lines if PLAIN.match(line)]


def logged_path(line: str, fmt: str) -> str:
    if fmt == "json":
        path: str = json.loads(line)["path"]
        return path
    match = PLAIN.match(line)
    assert match, line
    return match[1]


def make_requests(mirror: MirrorProc, image: ImageInfo) -> list[tuple[str, str, int]]:
    """A few requests with paths of their own; (method, path, status) of each."""
    made = []
    for path, status in [(f"/v2/{image.repo}/manifests/{image.tag}", 200),
                         (f"/v2/{image.repo}/blobs/{image.blobs[0][0]}", 200),
                         (f"/v2/{image.repo}/manifests/no-such-tag", 404),
                         ("/healthz?probe=1", 200)]:
        assert get(mirror.url + path).status_code == status
        made.append(("GET", path, status))
    return made


@pytest.mark.parametrize("fmt", ["plain", "json", "off"])
def test_access_log(upstream: Upstream, start_mirror: StartMirror, fmt: str) -> None:
    image = upstream.images[IMAGE]
    mirror = start_mirror(workers=2, args=["--access-log", fmt])
    made = make_requests(mirror, image)
    if fmt == "off":
        time.sleep(1)
        assert access_lines(mirror, "plain") == access_lines(mirror, "json") == []
        return
    paths = [path for _, path, _ in made]

    def ours() -> list[str]:  # the lines of `made` (not those of the start-up probes)
        return [line for line in access_lines(mirror, fmt) if logged_path(line, fmt) in paths]

    wait_until("an access log line per request", lambda: len(ours()) >= len(made), 10)
    lines = ours()
    assert sorted(logged_path(line, fmt) for line in lines) == sorted(paths), lines
    # Two workers write to one log: lines may come in any order, so match them by path.
    if fmt == "json":
        entries = {entry["path"]: entry for entry in map(json.loads, lines)}
        for method, path, status in made:
            entry = entries[path]
            assert {"method", "path", "status", "bytes", "duration", "cache",
                    "upstream"} <= entry.keys(), entry
            assert (entry["method"], entry["status"]) == (method, status), entry
            assert isinstance(entry["bytes"], int)
            assert isinstance(entry["duration"], float | int) and entry["duration"] >= 0
            if "/blobs/" in path:
                assert entry["bytes"] == image.blobs[0][1]
                assert entry["cache"] in ("hit", "miss")
                assert entry["upstream"] == "docker.io"
    else:
        for method, path, status in made:
            [line] = [line for line in lines if f'"{method} {path}" ' in line]
            assert f'"{method} {path}" {status} ' in line, line
            assert re.search(r" \d+ \d+\.\d+ cache=\S+ upstream=\S+$", line), line


# --- one worker (the default) and fresh servers ------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_count_with_one_worker_or_two(
    upstream: Upstream, start_mirror: StartMirror, workers: int
) -> None:
    image = upstream.images[IMAGE]
    mirror = start_mirror(workers=workers)
    fresh = scrape(mirror.url + "/metrics")
    # Every bounded label set is there from the start, at 0.
    for reason in ("unauthorized", "denied"):
        assert ("mirror_auth_denials_total", {"reason": reason}, 0.0) in fresh, reason
    for reason in ("digest_mismatch", "upstream", "error", "disk_full"):
        assert ("mirror_fill_failures_total", {"reason": reason}, 0.0) in fresh, reason
    for kind in ("manifest", "tag", "blob"):
        for result in ("hit", "miss", "stale", "negative"):
            assert ("mirror_cache_lookups_total", {"kind": kind, "result": result},
                    0.0) in fresh
    before = total(fresh, REQUESTS, route=MANIFESTS, method="GET", status="200")
    for _ in range(3):
        assert get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}").status_code == 200
    wait_until("three manifest requests counted", lambda: total(
        scrape(mirror.url + "/metrics"), REQUESTS, route=MANIFESTS, method="GET",
        status="200") - before == 3, 10)
    assert total(scrape(mirror.url + "/metrics"), "mirror_cache_lookups_total") > 0
