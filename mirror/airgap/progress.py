"""Progress of long transfers: live bars on a terminal, plain lines otherwise.

One `Task` per item (an image, a bundle) plus an overall line: bytes, rate and ETA. On a
terminal the live lines are redrawn in place (at most every `REDRAW` seconds) and finished
items scroll above them; elsewhere (logs, CI) each item's end is one line, and the overall
state is printed every `PLAIN_EVERY` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW = 0.1
PLAIN_EVERY = 10.0
BAR = 24
MAX_LIVE = 8  # live lines shown for items in progress


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Task:
    def __init__(self, progress: Progress, label: str, total: int | None) -> None:
        self.progress = progress
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.finished = False

    def set_total(self, total: int) -> None:
        self.total = total
        self.progress.update()

    def advance(self, n: int) -> None:
        self.done += n
        self.progress.bytes_done += n
        self.progress.update()

    def finish(self, message: str) -> None:
        self._end(f"{self.label}: {message}")

    def fail(self, message: str) -> None:
        self._end(f"{self.label}: FAILED: {message}")

    def _end(self, line: str) -> None:
        self.finished = True
        self.progress.tasks.remove(self)
        self.progress.print(line)

    def line(self) -> str:
        return f"{self.label} {bar(self.done, self.total)} {counts(self.done, self.total)}"


def bar(done: int, total: int | None) -> str:
    if not total:
        return "[" + " " * BAR + "]"
    filled = min(BAR, BAR * done // total)
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def counts(done: int, total: int | None) -> str:
    return human_bytes(done) + (f" / {human_bytes(total)}" if total else "")


class Progress:
    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.tasks: list[Task] = []
        self.bytes_done = 0
        self.bytes_total: int | None = None  # overall, when known up front
        self.started = time.monotonic()
        self._drawn = 0
        self._last = 0.0

    def task(self, label: str, total: int | None = None) -> Task:
        task = Task(self, label, total)
        self.tasks.append(task)
        self.update()
        return task

    def overall(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.bytes_done / elapsed
        total = self.bytes_total
        if total is None and self.tasks:
            # Overall so far: what is finished plus what the running items announced.
            known = [t.total for t in self.tasks]
            if all(k is not None for k in known):
                running = sum(t.done for t in self.tasks)
                total = self.bytes_done - running + sum(k or 0 for k in known)
        text = f"overall {counts(self.bytes_done, total)}, {human_bytes(rate)}/s"
        if total and rate > 0 and self.bytes_done < total:
            text += f", ETA {human_duration((total - self.bytes_done) / rate)}"
        return text

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self._last >= REDRAW:
                self._last = now
                self._redraw()
        elif force or now - self._last >= PLAIN_EVERY:
            if self._last:
                self.stream.write(self.overall() + "\n")
                self.stream.flush()
            self._last = now

    def print(self, line: str) -> None:
        """A line that stays (above the live lines on a terminal)."""
        if self.tty:
            self._clear()
            self.stream.write(line + "\n")
            self._redraw()
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._clear()
            self.stream.flush()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _redraw(self) -> None:
        self._clear()
        lines = [t.line() for t in self.tasks[:MAX_LIVE]]
        if len(self.tasks) > MAX_LIVE:
            lines.append(f"... and {len(self.tasks) - MAX_LIVE} more")
        lines.append(self.overall())
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)
