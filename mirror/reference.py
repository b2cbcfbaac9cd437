"""Repository names, tags and digests: the OCI distribution-spec grammar."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mirror.errors import DigestInvalid, NameInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
MAX_NAME = 255

# Digest algorithms we can verify, with the length of their hex encoding.
ALGORITHMS = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(value: str) -> Digest:
    """Parse `algorithm:hex`; only verifiable algorithms with well-formed hex pass."""
    if not DIGEST_RE.fullmatch(value):
        raise DigestInvalid(f"invalid digest {value[:200]!r}")
    algorithm, _, encoded = value.partition(":")
    length = ALGORITHMS.get(algorithm)
    if length is None:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm[:50]!r}")
    if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise DigestInvalid(f"{algorithm} digest must be {length} lowercase hex characters")
    return Digest(algorithm, encoded)


def is_digest(reference: str) -> bool:
    return ":" in reference


def check_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise NameInvalid(f"repository name longer than {MAX_NAME} characters")
    if not NAME_RE.fullmatch(name):
        if NAME_RE.fullmatch(name.lower()):
            raise NameInvalid(f"invalid repository name {name!r}: names must be lowercase")
        raise NameInvalid(f"invalid repository name {name[:200]!r}")
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise TagInvalid(f"invalid tag {tag[:200]!r}")
    return tag


def check_reference(reference: str) -> str | Digest:
    """A manifest reference is a digest (contains ':') or a tag."""
    return parse_digest(reference) if is_digest(reference) else check_tag(reference)
