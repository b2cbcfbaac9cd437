"""The mirror's state at a glance: hit ratios and bytes since start and today, disk use
against the budget, and the downloads in progress.

Since start: the counters of this `mirror serve`, summed over its workers from the
multiprocess directory every worker writes its samples to (the same sums `/metrics`
answers); without that directory (an app built in-process) this process's own.

Today: since local midnight. The since-start sums are read at the day's start (when the
server starts, and at each midnight) into a small file in that same directory, one per day,
written by whichever worker gets there first; today's counts are the sums now minus that
snapshot. Nothing is written anywhere else, and a restart starts the day's counts afresh
(the directory is per run), which the page says.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.metrics_core import Metric

from mirror.fills import Fills
from mirror.metrics import MULTIPROC_ENV, Metrics
from mirror.store import Store

log = logging.getLogger("mirror.ui")

DAY_FILE = "ui-day-{}.json"  # in the multiprocess directory; its collector reads *.db only
MAX_DOWNLOADS = 100  # listed at most
TMP_SCAN = 2_000  # entries of tmp/ looked at, at most, for other workers' downloads


@dataclass(frozen=True, slots=True)
class Counts:
    blob_hits: float = 0.0
    blob_lookups: float = 0.0
    meta_hits: float = 0.0  # manifests and tags
    meta_lookups: float = 0.0
    served_cache: float = 0.0  # blob bytes sent to clients from the cache
    served_upstream: float = 0.0  # ... relayed from a download
    fetched: float = 0.0  # blob bytes downloaded from the upstreams

    def minus(self, base: Counts) -> Counts:
        """Counts since `base` (never below zero: a counter never goes back)."""
        return Counts(*(max(0.0, getattr(self, f.name) - getattr(base, f.name))
                        for f in fields(self)))

    @property
    def blob_ratio(self) -> float | None:
        return self.blob_hits / self.blob_lookups if self.blob_lookups else None

    @property
    def meta_ratio(self) -> float | None:
        return self.meta_hits / self.meta_lookups if self.meta_lookups else None


def read_counts(metrics: Metrics) -> Counts:
    """The counters since start, summed over workers when they share a directory."""
    families: Iterable[Metric]
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        families = registry.collect()
    else:  # only the three counters read here (the histograms have many samples)
        families = [*metrics.lookups.collect(), *metrics.served_bytes.collect(),
                    *metrics.upstream_bytes.collect()]
    totals: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        totals[name] = totals.get(name, 0.0) + value

    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "mirror_cache_lookups_total":
                kind = "blob" if labels.get("kind") == "blob" else "meta"
                add(f"{kind}_lookups", sample.value)
                if labels.get("result") != "miss":  # as the dashboard counts hits
                    add(f"{kind}_hits", sample.value)
            elif sample.name == "mirror_served_bytes_total":
                add("served_" + ("cache" if labels.get("source") == "cache" else "upstream"),
                    sample.value)
            elif sample.name == "mirror_upstream_fetched_bytes_total":
                add("fetched", sample.value)
    return Counts(**totals)


def local_day(now: datetime.datetime | None = None) -> str:
    return (now or datetime.datetime.now()).date().isoformat()


def seconds_to_midnight(now: datetime.datetime | None = None) -> float:
    now = now or datetime.datetime.now()
    midnight = datetime.datetime.combine(now.date() + datetime.timedelta(days=1),
                                         datetime.time())
    return max(1.0, (midnight - now).total_seconds())


class Today:
    """Counts since local midnight (or since the server started, if later)."""

    def __init__(self, read: Callable[[], Counts], directory: str | None,
                 day: Callable[[], str] = local_day) -> None:
        self.read = read
        self.directory = Path(directory) if directory else None
        self.day = day
        self._snapshot: tuple[str, Counts] | None = None

    def counts(self) -> Counts:
        return self.read().minus(self.base())

    def base(self) -> Counts:
        """The since-start sums at the start of the day: kept once read."""
        day = self.day()
        if self._snapshot is None or self._snapshot[0] != day:
            self._snapshot = (day, self._shared(day) if self.directory else self.read())
        return self._snapshot[1]

    def _shared(self, day: str) -> Counts:
        """The day's snapshot in the workers' directory; the first worker to need it
        writes it (a new name per day: link(2) lets one writer win, whole)."""
        assert self.directory is not None
        path = self.directory / DAY_FILE.format(day)
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
            return Counts(**json.loads(path.read_text()))
        counts = self.read()
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(asdict(counts)))
            os.link(tmp, path)
        except FileExistsError:  # another worker wrote it meanwhile: theirs counts
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
                return Counts(**json.loads(path.read_text()))
        except OSError as exc:
            log.warning("cannot keep today's counts in %s: %s", self.directory, exc)
        finally:
            tmp.unlink(missing_ok=True)
        self._forget_before(day)
        return counts

    def _forget_before(self, day: str) -> None:
        assert self.directory is not None
        with contextlib.suppress(OSError), os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("ui-day-") and name != DAY_FILE.format(day):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    async def run(self) -> None:
        """Take each day's snapshot when the day starts (and now, at start-up)."""
        while True:
            try:
                self.base()
            except Exception:  # the page computes it again when asked
                log.exception("cannot take today's snapshot of the counters")
            await asyncio.sleep(min(seconds_to_midnight() + 1.0, 3600.0))


@dataclass(frozen=True, slots=True)
class Disk:
    used: int
    entries: int
    budget: int | None  # None: not known yet (the evictor's first pass sets it), or none

    @property
    def share(self) -> float | None:
        return self.used / self.budget if self.budget else None


@dataclass(frozen=True, slots=True)
class Download:
    """One download in progress. Its digest is not shown: a download belongs to no
    repository the page could check the visitor's access to."""

    upstream: str
    written: int
    size: int | None

    @property
    def share(self) -> float | None:
        return min(1.0, self.written / self.size) if self.size else None


def downloads(fills: Fills, store: Store, other_workers: bool) -> list[Download]:
    """This process's downloads (`Fills.active`) and, with several workers, the others'
    (their partial files and announced sizes in tmp/, which they share)."""
    found: dict[str, Download] = {}
    for digest, fill in list(fills.active.items()):
        found[str(digest)] = Download(fill.upstream, fill.written, fill.size)
    if other_workers:
        for key, download in _partials(store.tmp, len(found)):
            found.setdefault(key, download)
    return [found[k] for k in sorted(found)][:MAX_DOWNLOADS]


def _partials(tmp: Path, have: int) -> Iterable[tuple[str, Download]]:
    """`<alg>-<hex>.size` (size and upstream, written once the size is known) beside the
    growing `<alg>-<hex>.part`."""
    seen = 0
    with contextlib.suppress(OSError), os.scandir(tmp) as entries:
        for entry in entries:
            seen += 1
            if seen > TMP_SCAN or have >= MAX_DOWNLOADS:
                return
            stem, dot, suffix = entry.name.rpartition(".")
            if not dot or suffix != "size" or "-" not in stem:
                continue
            try:
                size_text, _, upstream = (tmp / entry.name).read_text().partition("\n")
                written = os.stat(tmp / f"{stem}.part").st_size
            except OSError:
                continue  # finished meanwhile
            size = int(size_text) if size_text.isascii() and size_text.isdigit() else None
            have += 1
            yield stem.replace("-", ":", 1), Download(upstream.strip(), written, size)


@dataclass(frozen=True, slots=True)
class AtAGlance:
    since_start: Counts
    today: Counts
    summed: bool  # the counts are the whole server's (else this process's)
    workers: int
    disk: Disk
    downloads: list[Download]


class Glance:
    def __init__(self, metrics: Metrics, store: Store, fills: Fills,
                 budget: Callable[[], int | None], workers: int) -> None:
        self.metrics = metrics
        self.store = store
        self.fills = fills
        self.budget = budget
        self.workers = workers
        self.directory = os.environ.get(MULTIPROC_ENV) or None
        self.today = Today(self.counts, self.directory)

    def counts(self) -> Counts:
        return read_counts(self.metrics)

    def downloads(self) -> list[Download]:
        return downloads(self.fills, self.store, other_workers=self.workers > 1)

    async def snapshot(self) -> AtAGlance:
        used, entries = await self.store.metadata.totals()
        return AtAGlance(self.counts(), self.today.counts(), self.directory is not None,
                         self.workers, Disk(used, entries, self.budget()), self.downloads())
