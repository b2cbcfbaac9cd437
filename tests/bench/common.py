"""What the benchmarks (run.py, metadata.py, cluster.py) share: the result table and the
report's sections, the machine and tool versions a report names, a process tree's RSS and
CPU time from /proc, and the signals that end a run (and clean it up)."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


class BenchError(RuntimeError):
    """A measurement could not be made, or what it measured was wrong."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- results --------------------------------------------------------------------------------


def show(v: float | str | None, fmt: str = "{:.1f}") -> str:
    """A table cell: `-` for nothing, strings as they are, numbers in `fmt`."""
    if v is None:
        return "-"
    return v if isinstance(v, str) else fmt.format(v)


def show_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def show_ok(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def fmt_table(head: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    cells = [list(head)] + [list(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "| " + " | ".join("---" for _ in head) + " |")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class Results:
    """A benchmark's table (a row a metric, the columns of `head`), its raw runs, errors
    and notes. Each benchmark names its columns and adds its rows its own way."""

    head: ClassVar[tuple[str, ...]] = ()
    rows: list[list[str]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error(self, metric: str, message: str) -> None:
        self.errors.append(f"{metric}: {message}")
        self.rows.append([metric, "error", "error", "-", "-", "error"])

    def table(self, markdown: bool) -> str:
        return fmt_table(self.head, self.rows, markdown)


@dataclass
class Comparison(Results):
    """Rows of a metric, two values, their ratio, a target and whether it is met."""

    def add(self, metric: str, one: float | str | None, two: float | str | None,
            ratio: float | None = None, target: str = "-", ok: bool | None = None,
            fmt: str = "{:.1f}") -> None:
        self.rows.append([metric, show(one, fmt), show(two, fmt), show_ratio(ratio), target,
                          show_ok(ok)])


class Runner:
    """What every benchmark's runner shares: the cleanups it registers as it starts
    servers, and phases whose failure is recorded in the results instead of ending the run."""

    res: Results
    cleanups: list[Callable[[], object]]

    def cleanup(self) -> None:
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()
        self.cleanups.clear()

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


def append_report(path: Path, text: str) -> None:
    """Append a section to the report at `path`, keeping what the file holds."""
    old = path.read_text() if path.exists() else ""
    path.write_text(old.rstrip("\n") + "\n\n" + text if old.strip() else text)


def raw_text(raw: dict[str, Any], depth: int = 0, nest: int = 2) -> str:
    """Nested dicts (down to `nest` levels) as indented `key: compact JSON` lines."""
    lines = []
    for key, value in raw.items():
        if isinstance(value, dict) and depth < nest:
            lines.append(f"{'  ' * depth}{key}:")
            lines.append(raw_text(value, depth + 1, nest))
        else:
            lines.append(f"{'  ' * depth}{key}: {json.dumps(value)}")
    return "\n".join(lines)


def report_tail(res: Results, level: str = "##", nest: int = 2) -> list[str]:
    """A report's table, then its errors, notes and raw runs under `level` headings."""
    lines = [res.table(markdown=True), ""]
    if res.errors:
        lines += [f"{level} Errors", "", *(f"- {e}" for e in res.errors), ""]
    if res.notes:
        lines += [f"{level} Notes", "", *(f"- {n}" for n in res.notes), ""]
    lines += [f"{level} Raw runs", "", "```", raw_text(res.raw, nest=nest), "```", ""]
    return lines


def print_results(res: Results, output: Path, verb: str, nest: int = 2) -> int:
    """The table, raw runs, errors and notes on stdout; 1 if anything failed, else 0."""
    print("\n" + res.table(markdown=False) + "\n")
    print("raw runs:\n" + raw_text(res.raw, nest=nest))
    for e in res.errors:
        print(f"ERROR: {e}")
    for n in res.notes:
        print(f"note: {n}")
    print(f"\nreport {verb} to {output}")
    return 1 if res.errors else 0


# -- the machine ----------------------------------------------------------------------------


def tool_version(argv: Sequence[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def loadavg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def packages(names: Iterable[str]) -> str:
    """`name version` of each installed Python package, `?` for one not installed."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return ", ".join(f"{p} {version(p)}" for p in names)


def machine() -> dict[str, str]:
    """The date, the machine, its load and the mirror's commit, for a report's header."""
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
    }


def warn_if_busy() -> None:
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: the machine is busy (load average {loadavg()}): numbers will be noisy")


# -- processes ------------------------------------------------------------------------------


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


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime + cutime + cstime of `pids` (all their threads, reaped children too)."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])  # fields 14-17 of proc_pid_stat(5)
    return ticks / TICK


class CpuMeter:
    """CPU seconds a process tree spends between `start()` and `stop()` (processes that
    appear meanwhile count from their start; gone ones count up to the last look)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, float] = {}
        self.base: dict[int, float] = {}

    def _look(self) -> None:
        for pid in process_tree(self.root):
            self.seen[pid] = cpu_seconds([pid])

    def start(self) -> None:
        self._look()
        self.base = dict(self.seen)

    def stop(self) -> float:
        self._look()
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.seen.items())


# -- signals --------------------------------------------------------------------------------


def _abort(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def abort_on(signals: Iterable[signal.Signals], seconds: int) -> None:
    """Turn `signals` into KeyboardInterrupt (so the run cleans up) and raise SIGALRM after
    `seconds`, the run's hard limit."""
    for signum in signals:
        signal.signal(signum, _abort)
    signal.alarm(seconds)
