"""HTTP Range requests on blobs (RFC 9110 byte ranges, one range at a time)."""

from __future__ import annotations

import re

from mirror.errors import RangeInvalid

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The half-open span [start, end) asked for, or None for the whole body.

    Multiple ranges and malformed headers are ignored (the whole body is a valid answer);
    a well-formed range that misses the body raises `RangeInvalid` (416).
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if len(first) > 19 or len(last) > 19:
        return None
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> RangeInvalid:
    return RangeInvalid(
        f"range not satisfiable for a blob of {size} bytes",
        headers={"Content-Range": f"bytes */{size}"})
