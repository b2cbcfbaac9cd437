"""HTTP byte ranges on blobs: the half-open span asked for, None for the whole body, or 416."""

from __future__ import annotations

import pytest

from mirror.errors import RangeInvalid
from mirror.ranges import parse_range

SIZE = 100


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=0-0", (0, 1)),
        ("bytes=5-", (5, SIZE)),
        ("bytes=0-", (0, SIZE)),
        ("bytes=99-", (99, SIZE)),
        ("bytes=99-99", (99, SIZE)),
        ("bytes=-3", (SIZE - 3, SIZE)),
        ("bytes=-1", (SIZE - 1, SIZE)),
        ("bytes=-100", (0, SIZE)),
        ("bytes=-1000", (0, SIZE)),  # a suffix longer than the body is the whole body
        ("bytes=10-99", (10, SIZE)),
        ("bytes=10-100", (10, SIZE)),  # end past size clamps
        ("bytes=10-999999", (10, SIZE)),
        (" bytes = 2 - 4 ", (2, 5)),
    ],
)
def test_satisfiable_ranges(header: str, expected: tuple[int, int]) -> None:
    assert parse_range(header, SIZE) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes=0-1,5-6",  # multiple ranges: the whole body is a valid answer
        "bytes=0-1, 5-",
        "bytes=9-0",  # reversed
        "bytes=200-100",  # reversed, even past the end
        "bytes=-",
        "bytes=",
        "bytes",
        "bytes=a-b",
        "bytes=1-2-3",
        "bytes=--1",
        "bytes=+1-2",
        "bytes=1.5-2",
        "items=0-9",
        "0-9",
        "bytes 0-9",
        "bytes=0-9;x",
    ],
)
def test_ignored_ranges_mean_whole_body(header: str | None) -> None:
    assert parse_range(header, SIZE) is None


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=150-", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeInvalid) as info:
        parse_range(header, SIZE)
    error = info.value
    assert error.status == 416
    assert error.code == "SIZE_INVALID"
    assert error.headers == {"Content-Range": f"bytes */{SIZE}"}


def test_any_start_on_an_empty_blob_is_unsatisfiable() -> None:
    with pytest.raises(RangeInvalid) as info:
        parse_range("bytes=0-", 0)
    assert info.value.headers["Content-Range"] == "bytes */0"


def test_huge_numbers() -> None:
    big = "9" * 19
    huge = "9" * 40
    # Past the end but parseable: unsatisfiable.
    with pytest.raises(RangeInvalid):
        parse_range(f"bytes={big}-", SIZE)
    # Absurdly long numbers are ignored rather than parsed (whole body).
    assert parse_range(f"bytes={huge}-", SIZE) is None
    assert parse_range(f"bytes=0-{huge}", SIZE) is None
    assert parse_range(f"bytes=-{huge}", SIZE) is None
    # A large but parseable end clamps to the body.
    assert parse_range(f"bytes=3-{big}", SIZE) == (3, SIZE)
    assert parse_range(f"bytes=-{big}", SIZE) == (0, SIZE)


def test_large_blob() -> None:
    size = 10 * 2**30
    assert parse_range(f"bytes={size - 1}-", size) == (size - 1, size)
    assert parse_range("bytes=-1", size) == (size - 1, size)
