"""How the Redis metadata store names things and reads them back: key parts and members
(names joined by NUL, which no name holds), lexical bounds, scores, record encodings, and the
translation of redis-py's failures into the interface's errors."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from redis import exceptions as rx

from mirror.metadata.base import (
    Grant,
    MetadataError,
    MetadataUnavailable,
    RefRecord,
    TagRecord,
)

P = ParamSpec("P")
T = TypeVar("T")
Scored = list[tuple[str, float]]  # (member, score) of a sorted set

SEP = "\0"
NEXT = "\x01"  # the byte after SEP: "[a\0" .. "(a\x01" bounds every name under "a"
BATCH = 256  # digests per script call, grants per prune step: bounded work per call



def joined(*names: str) -> str:
    """Names joined into one key part or member; a name holding the separator is refused
    (it could alias another)."""
    for name in names:
        if SEP in name:
            raise MetadataError(f"a name holds a NUL character: {name!r}")
    return SEP.join(names)


def under(*names: str) -> tuple[str, str]:
    """ZRANGEBYLEX bounds of every member that starts with `names` and a separator."""
    stem = joined(*names)
    return "[" + stem + SEP, "(" + stem + NEXT


def lex_after(member: str) -> str:
    """The ZRANGEBYLEX lower bound just past `member` ("" is the start)."""
    return "(" + member if member else "-"


def where(url: str) -> str:
    """The server a URL names, without its credentials (for messages)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def score_text(value: float) -> str:
    """A score as Redis reads it back exactly (repr round-trips a double)."""
    return repr(float(value))


def guarded(work: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn redis-py's failures into the interface's errors."""

    @functools.wraps(work)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await work(*args, **kwargs)
        except (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, OSError) as exc:
            raise MetadataUnavailable(f"Redis metadata store unreachable: {exc}") from exc
        except rx.RedisError as exc:
            raise MetadataError(f"Redis metadata store failed: {exc}") from exc

    return call


def tag_value(record: TagRecord) -> str:
    return json.dumps({"digest": record.digest, "media_type": record.media_type,
                       "size": record.size, "at": record.at}, separators=(",", ":"))


def tag_record(upstream: str, repo: str, tag: str, value: str | bytes) -> TagRecord:
    data = json.loads(value)
    return TagRecord(upstream, repo, tag, str(data["digest"]), str(data["media_type"]),
                     int(data["size"]), float(data["at"]))


def grant_record(upstream: str, repo: str, identity: str, value: str | bytes) -> Grant:
    data = json.loads(value)
    return Grant(upstream, repo, identity, float(data["at"]), bool(data["durable"]))


def ref_record(member: str, value: str | bytes) -> RefRecord:
    upstream, repo, digest = member.split(SEP)
    data = json.loads(value)
    return RefRecord(upstream, repo, digest, str(data["media_type"]), int(data["size"]))


def pairs(rows: list[Any]) -> Scored:
    """A flat [member, score, ...] script reply as (member, score) pairs."""
    return [(str(rows[i]), float(rows[i + 1])) for i in range(0, len(rows), 2)]


def chunks(items: list[str], size: int = BATCH) -> Iterable[list[str]]:
    return (items[i:i + size] for i in range(0, len(items), size))
