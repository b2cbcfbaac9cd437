"""Upstream rate limits, as Docker Hub reports them on manifest answers:

    RateLimit-Limit: 100;w=21600        (pulls per window of 21600 s)
    RateLimit-Remaining: 76;w=21600

A manifest GET spends one pull, a HEAD none (and reports the budget all the same). Each
upstream client keeps the last values it saw (`RateLimit.observe`, called where the client
sees every response), exports them as gauges and, while the remaining budget is below the
reserve (`ratelimit_reserve`: a number of pulls, or a share of the limit like "10%"), says
so (`low`): the manifest service then serves cached tags without revalidating them and only
fetches what the cache lacks. The reserve lifts when a later answer shows more budget, or
once the window the low answer named has passed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mirror.metrics import Metrics

log = logging.getLogger("mirror.ratelimit")

DEFAULT_RESERVE = "10%"
DEFAULT_WINDOW = 21600.0  # Docker Hub's, for answers that name none
_VALUE = re.compile(r"\s*(\d{1,12})\s*(?:;\s*w\s*=\s*(\d{1,9}))?")
_RESERVE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*")


@dataclass(frozen=True, slots=True)
class Reserve:
    """The budget kept back: `count` pulls, or `share` of the limit."""

    count: float = 0.0
    share: float = 0.0

    def of(self, limit: int) -> float:
        return self.count if not self.share else self.share * limit


def parse_reserve(value: object) -> Reserve:
    """`"10%"` (of the limit) or a number of pulls (`20`); raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number of pulls or a percentage, got {value!r}")
    match = _RESERVE.fullmatch(str(value))
    if match is None:
        raise ValueError(f"expected a number of pulls or a percentage like '10%', "
                         f"got {value!r}")
    number = float(match.group(1))
    if match.group(2):
        if number > 100:
            raise ValueError(f"a percentage is at most 100%, got {value!r}")
        return Reserve(share=number / 100)
    return Reserve(count=number)


def parse_header(value: str | None) -> tuple[int, float | None] | None:
    """`100;w=21600` -> (100, 21600.0); None if absent or not of that form."""
    if value is None:
        return None
    match = _VALUE.match(value)
    if match is None:
        return None
    window = float(match.group(2)) if match.group(2) else None
    return int(match.group(1)), window


class RateLimit:
    """One upstream's rate-limit budget as its last answers showed it (per process)."""

    def __init__(self, upstream: str, reserve: Reserve, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self.reserve = reserve
        self.clock = clock
        self.limit: int | None = None
        self.remaining: int | None = None
        self.window = DEFAULT_WINDOW
        self.at = 0.0
        self._warned = False
        # Exported from the start (0 until the upstream reports).
        self._gauges = metrics.ratelimit_gauges(upstream) if metrics is not None else None

    @classmethod
    def of(cls, name: str, own: str | None, default: str,
           metrics: Metrics | None = None) -> RateLimit:
        """For upstream `name` with its own reserve setting (None: the global `default`)."""
        return cls(name, parse_reserve(own if own is not None else default), metrics)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Any upstream answer: take its rate-limit headers, if it has them (cheap if not)."""
        limit = parse_header(headers.get("ratelimit-limit"))
        remaining = parse_header(headers.get("ratelimit-remaining"))
        if limit is None or remaining is None:
            return
        self.limit, self.remaining = limit[0], remaining[0]
        self.window = remaining[1] or limit[1] or DEFAULT_WINDOW
        self.at = self.clock()
        if self._gauges is not None:
            self._gauges[0].set(self.limit)
            self._gauges[1].set(self.remaining)
        low = self.low()
        if low and not self._warned:
            log.warning("upstream %s: rate limit nearly used up: %d of %d pulls left, below "
                        "the reserve of %g; cached tags are served without revalidation "
                        "until it recovers", self.upstream, self.remaining, self.limit,
                        self.reserve.of(self.limit))
        self._warned = low

    def low(self) -> bool:
        """Whether the remaining budget is below the reserve (and the answer still holds)."""
        if self.remaining is None or self.limit is None:
            return False
        if self.clock() - self.at > self.window:
            return False  # the window has passed: the budget is new
        return self.remaining < self.reserve.of(self.limit)

    def snapshot(self) -> dict[str, object]:
        return {"limit": self.limit, "remaining": self.remaining,
                "reserve": self.reserve.of(self.limit) if self.limit is not None else None,
                "low": self.low()}
