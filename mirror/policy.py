"""Repository policy: which repositories of an upstream the mirror serves at all.

Each `[[upstream]]` may set `allow` and `deny`, lists of repository patterns: `*` matches
within one path component, `**` across components (`**/` also matches no component at
all), anything else matches itself. `deny` always wins; when `allow` is set (even empty), a
repository it does not match is refused. A refused repository gets 403 `DENIED` naming the
rule, whatever is cached: the check comes before any cache is looked at.

Both lists compile once into one regular expression (deny's alternatives first, each a
named group), so a check is one `fullmatch` on the repository name, and its answer is
memoised (bounded): well under a microsecond either way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mirror import errors

# Repository names are lowercase path components of these characters (plus our wildcards).
PATTERN = re.compile(r"[a-z0-9._/*-]+")
MAX_PATTERN = 255
MEMO = 4096  # answers remembered per upstream (then forgotten all at once): bounded


class PolicyError(ValueError):
    """A pattern that cannot be a repository pattern; the message says why."""


class Refused(errors.Denied):
    """A repository the policy refuses (403 DENIED, naming the rule)."""


class _Rules(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def allow(self) -> Sequence[str] | None: ...
    @property
    def deny(self) -> Sequence[str]: ...


def translate(pattern: str) -> str:
    """The regular expression of one pattern; raises `PolicyError` if it is not one."""
    if not isinstance(pattern, str) or not pattern:
        raise PolicyError(f"bad pattern {pattern!r}: expected a non-empty string")
    if len(pattern) > MAX_PATTERN or not PATTERN.fullmatch(pattern):
        raise PolicyError(f"bad pattern {pattern!r}: use lowercase letters, digits, "
                          "'.', '_', '-', '/' and the wildcards '*' and '**'")
    if pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
        raise PolicyError(f"bad pattern {pattern!r}: empty path component")
    if "***" in pattern:
        raise PolicyError(f"bad pattern {pattern!r}: '***' is no wildcard (use * or **)")
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _combined(deny: Iterable[str], allow: Iterable[str]) -> re.Pattern[str] | None:
    """One expression for both lists: a deny alternative matches first when one does."""
    parts = [f"(?P<d{i}>{translate(p)})" for i, p in enumerate(deny)]
    parts += [f"(?P<a{i}>{translate(p)})" for i, p in enumerate(allow)]
    return re.compile("|".join(parts)) if parts else None


def check_patterns(value: object) -> tuple[str, ...]:
    """A settings value as a tuple of valid patterns (for `mirror.settings`)."""
    if not isinstance(value, list | tuple):
        raise PolicyError(f"expected a list of repository patterns, got {value!r}")
    patterns = tuple(value)
    for pattern in patterns:
        translate(pattern)
    return patterns


@dataclass(frozen=True)
class Policy:
    upstream: str
    allow: tuple[str, ...] | None = None  # None: every repository not denied
    deny: tuple[str, ...] = ()
    _rules: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _memo: dict[str, str | None] = field(init=False, repr=False, compare=False,
                                         default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rules", _combined(self.deny, self.allow or ()))

    @classmethod
    def of(cls, rules: _Rules) -> Policy:
        allow = None if rules.allow is None else tuple(rules.allow)
        return cls(rules.name, allow, tuple(rules.deny))

    @property
    def open(self) -> bool:
        """No rules at all: every repository is served."""
        return self.allow is None and not self.deny

    def refusal(self, repo: str) -> str | None:
        """Why `repo` is refused (naming the rule), or None if it is served."""
        if repo in self._memo:
            return self._memo[repo]
        if len(self._memo) >= MEMO:
            self._memo.clear()
        why = self._memo[repo] = self._decide(repo)
        return why

    def _decide(self, repo: str) -> str | None:
        match = self._rules.fullmatch(repo) if self._rules is not None else None
        rule = match.lastgroup if match is not None else None
        if rule is not None and rule.startswith("d"):
            return (f"repository {repo} of upstream {self.upstream} is refused by the "
                    f"mirror's rule deny = {self.deny[int(rule[1:])]!r}")
        if self.allow is not None and rule is None:
            listed = ", ".join(repr(p) for p in self.allow) or "nothing"
            return (f"repository {repo} of upstream {self.upstream} is not in the mirror's "
                    f"allow list ({listed})")
        return None

    def permits(self, repo: str) -> bool:
        return self.refusal(repo) is None

    def check(self, repo: str) -> None:
        """Raise `Refused` (403 DENIED) for a repository the policy refuses."""
        if self.open:
            return
        why = self.refusal(repo)
        if why is not None:
            raise Refused(why)


def policies(upstreams: Iterable[_Rules]) -> dict[str, Policy]:
    """One compiled policy per upstream, by name."""
    return {u.name: Policy.of(u) for u in upstreams}


def check(table: dict[str, Policy], upstream: str, repo: str) -> None:
    """`Policy.check` for an upstream that may have no policy (not configured: none)."""
    found = table.get(upstream)
    if found is not None:
        found.check(repo)
