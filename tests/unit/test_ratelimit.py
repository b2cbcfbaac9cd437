"""Rate-limit tracking: Docker Hub's headers, the reserve, gauges and the warning."""

from __future__ import annotations

import logging

import pytest

from mirror.metrics import Metrics
from mirror.ratelimit import RateLimit, Reserve, parse_header, parse_reserve
from mirror.settings import SettingsError, load, parse_upstream


def test_parse_header() -> None:
    assert parse_header("100;w=21600") == (100, 21600.0)
    assert parse_header("76") == (76, None)
    assert parse_header(" 5 ; w = 60") == (5, 60.0)
    assert parse_header(None) is None
    assert parse_header("lots") is None


def test_parse_reserve() -> None:
    assert parse_reserve("10%") == Reserve(share=0.1)
    assert parse_reserve("20") == Reserve(count=20)
    assert parse_reserve(3) == Reserve(count=3)
    assert parse_reserve("10%").of(200) == 20
    for bad in ("ten", "-1", "150%", True):
        with pytest.raises(ValueError):
            parse_reserve(bad)


def test_reserve_settings() -> None:
    assert load({}, env={}).ratelimit_reserve == "10%"
    assert load({}, env={"MIRROR_RATELIMIT_RESERVE": "25"}).ratelimit_reserve == "25"
    assert parse_upstream({"url": "https://r.example", "ratelimit_reserve": "5%"}
                          ).ratelimit_reserve == "5%"
    with pytest.raises(SettingsError, match="ratelimit_reserve"):
        load({}, env={"MIRROR_RATELIMIT_RESERVE": "some"})
    with pytest.raises(SettingsError, match=r"upstream r\.example: ratelimit_reserve"):
        parse_upstream({"url": "https://r.example", "ratelimit_reserve": "x%"})


def sample(metrics: Metrics, name: str, upstream: str) -> float:
    return next(v for labels, v in metrics.samples(name) if labels["upstream"] == upstream)


def test_observe_sets_gauges_and_low_below_the_reserve(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    metrics = Metrics()
    limits = RateLimit("hub", parse_reserve("10%"), metrics, clock=lambda: now[0])
    # Exported from the start, at 0.
    assert sample(metrics, "mirror_upstream_ratelimit_limit", "hub") == 0
    limits.observe({"content-type": "x"})  # no headers: nothing changes
    assert limits.limit is None and not limits.low()
    limits.observe({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "50;w=21600"})
    assert sample(metrics, "mirror_upstream_ratelimit_limit", "hub") == 100
    assert sample(metrics, "mirror_upstream_ratelimit_remaining", "hub") == 50
    assert not limits.low()
    with caplog.at_level(logging.WARNING, logger="mirror.ratelimit"):
        limits.observe({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "9;w=21600"})
        limits.observe({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "8;w=21600"})
    assert limits.low()
    warnings = [r for r in caplog.records if "rate limit nearly used up" in r.getMessage()]
    assert len(warnings) == 1, "one warning when the budget falls into the reserve"
    assert "9 of 100 pulls left" in warnings[0].getMessage()
    # The window named by the low answer passes: the budget is new.
    now[0] += 21601
    assert not limits.low()
    now[0] -= 21601
    limits.observe({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "60;w=21600"})
    assert not limits.low()


def test_a_count_reserve() -> None:
    limits = RateLimit.of("hub", "3", "10%")
    limits.observe({"ratelimit-limit": "100", "ratelimit-remaining": "5"})
    assert not limits.low()  # the upstream's own reserve (3) wins over the global 10 %
    limits.observe({"ratelimit-limit": "100", "ratelimit-remaining": "2"})
    assert limits.low()
    assert limits.snapshot() == {"limit": 100, "remaining": 2, "reserve": 3.0, "low": True}
