"""Prometheus metrics, right across uvicorn workers.

`mirror serve` always runs prometheus-client's multiprocess mode, with one worker or many:
every process writes its samples to files in PROMETHEUS_MULTIPROC_DIR and `/metrics` sums
them. Without that directory (the cache commands, tests building an app) the app's own
registry is exposed. Labels are bounded:
no repository names or digests, only routes, methods, statuses, upstream names, codes.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
    values,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
AUTH_DENIALS = ("unauthorized", "denied")  # lowercased OCI error codes of 401 and 403
FILL_FAILURES = ("digest_mismatch", "upstream", "error", "disk_full")
LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mirror_http_requests", "Requests answered, by route, method and status.",
            ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram(
            "mirror_http_request_duration_seconds", "Time to answer a request, by route.",
            ["route"], buckets=LATENCY, registry=r)
        self.lookups = Counter(
            "mirror_cache_lookups", "Cache lookups by kind (manifest, tag, blob) and result "
            "(hit, miss, stale, negative, deleted).", ["kind", "result"], registry=r)
        self.served_bytes = Counter(
            "mirror_served_bytes", "Blob bytes sent to clients, by source (cache, upstream).",
            ["source"], registry=r)
        self.upstream_requests = Counter(
            "mirror_upstream_requests", "Requests sent upstream, by upstream and status.",
            ["upstream", "status"], registry=r)
        self.upstream_seconds = Histogram(
            "mirror_upstream_request_duration_seconds", "Upstream answer time (headers).",
            ["upstream"], buckets=LATENCY, registry=r)
        self.upstream_bytes = Counter(
            "mirror_upstream_fetched_bytes", "Blob bytes fetched from each upstream.",
            ["upstream"], registry=r)
        self.fills = Gauge(
            "mirror_fills_in_progress", "Upstream downloads running now.",
            multiprocess_mode="livesum", registry=r)
        self.fill_joins = Counter(
            "mirror_fill_joins", "Clients that joined a download another client started.",
            registry=r)
        self.fill_failures = Counter(
            "mirror_fill_failures", "Downloads that failed, by reason.", ["reason"],
            registry=r)
        self.tokens = Counter(
            "mirror_upstream_tokens_fetched", "Bearer tokens fetched from upstream realms.",
            ["upstream"], registry=r)
        self.challenges = Counter(
            "mirror_auth_challenges", "401 answers with a challenge sent to clients.",
            registry=r)
        self.denials = Counter(
            "mirror_auth_denials", "Reads refused for want of access, by reason.",
            ["reason"], registry=r)
        self.uploads = Counter(
            "mirror_uploads", "Blob uploads by outcome (ok, timeout, too_large, error).",
            ["outcome"], registry=r)
        self.evictions = Counter(
            "mirror_evictions", "Cache entries evicted to keep within the budget.", registry=r)
        self.evicted_bytes = Counter(
            "mirror_evicted_bytes", "Bytes evicted to keep within the budget.", registry=r)
        self.cache_bytes = Gauge(
            "mirror_cache_size_bytes", "Bytes of content in the cache.",
            multiprocess_mode="max", registry=r)
        self.cache_entries = Gauge(
            "mirror_cache_entries", "Content files in the cache.",
            multiprocess_mode="max", registry=r)
        self.cache_budget = Gauge(
            "mirror_cache_budget_bytes", "The cache's size budget.",
            multiprocess_mode="max", registry=r)
        self.errors = Counter(
            "mirror_errors", "Error answers, by OCI error code.", ["code"], registry=r)
        # The last values an upstream reported (0 until it does): the most recent answer
        # any worker saw wins.
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit", "Pulls an upstream allows per window "
            "(its RateLimit-Limit; 0 until reported).", ["upstream"],
            multiprocess_mode="mostrecent", registry=r)
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining", "Pulls left in the upstream's window "
            "(its RateLimit-Remaining; 0 until reported).", ["upstream"],
            multiprocess_mode="mostrecent", registry=r)
        self.audit_dropped = Counter(
            "mirror_audit_dropped_lines", "Audit log lines dropped because the writer could "
            "not keep up (or could not write).", registry=r)

        # Fixed label sets exist from the start at 0, so rates and ratios are right at once.
        for kind in ("manifest", "tag", "blob"):
            for result in ("hit", "miss", "stale", "negative"):
                self.lookups.labels(kind, result)
        self.lookups.labels("tag", "deleted")  # tags deleted upstream, served (serve_deleted)
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source)
        for outcome in ("ok", "timeout", "too_large", "error"):
            self.uploads.labels(outcome)
        for reason in AUTH_DENIALS:
            self.denials.labels(reason)
        for reason in FILL_FAILURES:
            self.fill_failures.labels(reason)

    def ratelimit_gauges(self, upstream: str) -> tuple[Gauge, Gauge]:
        """The upstream's (limit, remaining) gauges, exported at once at 0. The 0 is stamped
        older than any answer: in multiprocess mode the most recent value any worker saw
        wins, so a worker started later (a restart) must not hide it."""
        gauges = (self.ratelimit_limit.labels(upstream),
                  self.ratelimit_remaining.labels(upstream))
        for gauge in gauges:
            gauge._value.set(0.0, timestamp=1.0)  # Gauge.set would stamp it "now"
        return gauges

    def _summed(self) -> CollectorRegistry:
        """The registry to read: every worker's samples in multiprocess mode, else ours."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return registry
        return self.registry

    def exposition(self) -> tuple[bytes, str]:
        """The text to answer a scrape with: summed over workers in multiprocess mode."""
        return generate_latest(self._summed()), CONTENT_TYPE_LATEST

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every sample called `name` (e.g. `mirror_fills_in_progress`),
        summed over workers like a scrape."""
        return [(dict(s.labels), s.value) for family in self._summed().collect()
                for s in family.samples if s.name == name]


def serve_metrics(host: str, port: int) -> None:
    """`/metrics` on its own address, from a thread of the parent process."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, host, registry=registry)


def prepare_multiprocess(directory: str) -> None:
    """Before workers start: an empty directory for their sample files."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))
    os.environ[MULTIPROC_ENV] = directory
    # prometheus-client picks its value class when it is first imported, which in this process
    # was before the directory existed: pick again, so metrics built here (the app itself with
    # one worker) write to the directory too. Spawned workers import it afresh.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
