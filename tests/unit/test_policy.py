"""The repository policy matcher: pattern semantics, refusals naming the rule, bad patterns
as bad settings, and what a check costs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mirror import cli, errors
from mirror.policy import Policy, PolicyError, Refused, translate
from mirror.settings import SettingsError, load, parse_upstream

POLICY = Policy("docker.io", ("library/*", "bitnami/**", "team/*/app"),
                ("library/evil*", "**/secret"))


@pytest.mark.parametrize(("repo", "served"), [
    ("library/alpine", True),
    ("library/a/b", False),  # `*` stays within one component
    ("bitnami/redis", True),
    ("bitnami/charts/redis", True),  # `**` crosses components
    ("bitnami", False),
    ("team/x/app", True),
    ("team/x/y/app", False),
    ("library/evil", False),  # deny wins over allow
    ("library/evil-twin", False),
    ("secret", False),  # `**/` also matches no component
    ("bitnami/a/secret", False),
    ("other/thing", False),  # not allowed
])
def test_patterns(repo: str, served: bool) -> None:
    assert POLICY.permits(repo) is served
    assert POLICY.permits(repo) is served  # the memoised answer is the same


def test_refusals_name_the_rule() -> None:
    with pytest.raises(Refused) as denied:
        POLICY.check("library/evil1")
    assert denied.value.code == "DENIED" and denied.value.status == 403
    assert "deny = 'library/evil*'" in denied.value.message
    assert "library/evil1" in denied.value.message
    with pytest.raises(errors.Denied) as other:
        POLICY.check("other/thing")
    assert "allow list ('library/*', 'bitnami/**', 'team/*/app')" in other.value.message


def test_no_rules_serve_everything_and_an_empty_allow_list_nothing() -> None:
    assert Policy("x").open and Policy("x").permits("any/thing")
    assert not Policy("x", allow=()).permits("any/thing")
    only_deny = Policy("x", deny=("a/*",))
    assert only_deny.permits("b/c") and not only_deny.permits("a/c")


def test_memo_is_bounded() -> None:
    policy = Policy("x", deny=("a/*",))
    for i in range(10_000):
        policy.permits(f"b/{i}")
    assert len(policy._memo) <= 4096


@pytest.mark.parametrize("pattern", ["", "Library/*", "/lead", "trail/", "a//b", "a/***",
                                     "sp ace", "a?b", "x" * 300])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(PolicyError, match="bad pattern"):
        translate(pattern)
    with pytest.raises(SettingsError, match=r"upstream docker.io: deny: bad pattern"):
        parse_upstream({"url": "https://registry-1.docker.io", "deny": [pattern]})


def test_patterns_must_be_a_list() -> None:
    with pytest.raises(SettingsError, match="allow: expected a list"):
        parse_upstream({"url": "https://r.example", "allow": "library/*"})


def test_a_bad_pattern_stops_start_up(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MIRROR_CONFIG", "MIRROR_UPSTREAMS"):
        monkeypatch.delenv(key, raising=False)
    config = tmp_path / "mirror.toml"
    config.write_text('[[upstream]]\nurl = "https://r.example"\nallow = ["ok/*", "Bad/*"]\n')
    assert cli.main(["serve", "--config", str(config), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mirror: bad setting: upstream r.example: allow: bad pattern 'Bad/*'" in err


def test_settings_round_trip_keeps_the_rules() -> None:
    settings = load({"upstreams": [parse_upstream({"url": "https://r.example",
                                                   "allow": ["a/*"], "deny": ["a/b"]})]},
                    env={})
    from mirror.settings import Settings
    again = Settings.from_json(settings.to_json())
    assert again.upstreams[0].allow == ("a/*",) and again.upstreams[0].deny == ("a/b",)
    assert again == settings


def test_a_check_costs_well_under_a_microsecond() -> None:
    """Thousands of checks per millisecond: memoised, and with every name new."""
    names = [f"library/image-{i}" for i in range(2000)]
    fresh = Policy("docker.io", ("library/*", "bitnami/**", "team/*/app"),
                   ("library/evil*", "**/secret"))
    started = time.perf_counter()
    for name in names:
        fresh.check(name)  # none memoised yet
    cold = len(names) / ((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    for _ in range(10):
        for name in names:
            fresh.check(name)
    warm = 10 * len(names) / ((time.perf_counter() - started) * 1000)
    print(f"policy checks per ms: {cold:.0f} new names, {warm:.0f} memoised")
    # Generous floors for a shared, loaded machine; an idle core does ~2000 and ~8000.
    assert cold > 100 and warm > 500
