"""How the Redis metadata store names things and reads them back: key parts and members
(names joined by NUL, which no name holds), lexical bounds, scores, record encodings, and the
translation of redis-py's failures into the interface's errors.

Key layout (P the prefix, "\\0" between names: no upstream, repository, tag, digest,
identity, owner or id holds one; `joined` refuses names that do):

    P schema                 string   layout version
    P secret                 string   the installation's MAC key (hex)
    P generation             string   counter (INCR)
    P tag\\0U\\0R\\0T           hash     Accept text ("-": latest) -> record JSON
    P tags\\0U\\0R              zset     tag names (score 0: lexical order)
    P repos                  zset     "U\\0R" with a tag or a ref (score 0)
    P names\\0D                zset     "t\\0U\\0R\\0T" tags and "r\\0U\\0R" refs naming D
    P refs                   hash     "U\\0R\\0D" -> ref JSON
    P refnames               zset     "U\\0R\\0D" (score 0)
    P manifests              hash     D -> media type
    P children\\0D / parents\\0D set      what manifest D names / the manifests naming D
    P sizes                  hash     D -> size of committed content
    P used                   zset     D, score = last use (LRU order)
    P content                zset     D (score 0: digest order)
    P totals                 hash     bytes, entries
    P holders\\0D              set      upstreams holding D
    P links\\0U\\0R             set      digests linked to the repository
    P grants\\0U\\0R            hash     identity -> {"at": ..., "durable": ...}
    P transient              zset     "U\\0R\\0I" of grants that are not durable, score = at
    P pins                   zset     "O\\0D" (score 0)
    P pinners\\0D              set      owners pinning D
    P pushed                 hash     "U\\0R\\0T" -> time of the last push
    P upload\\0ID              string   session JSON, expiring at the session's end
    P uploads                zset     ID, score = expiry
    P lock\\0NAME              string   owner, expiring with the lease
    P pulls                  zset     "U\\0R\\0T" of a recorded tag, score = its pull count
"""

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
