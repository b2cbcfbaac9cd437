"""Reading and writing a cache's metadata from tests, as the tools do (synchronously)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from mirror.metadata import SqliteMetadata, database_path

T = TypeVar("T")


@contextmanager
def opened(cache_dir: Path) -> Iterator[SqliteMetadata]:
    """The cache's embedded metadata store, opened for the block."""
    metadata = SqliteMetadata(database_path(cache_dir), legacy_root=cache_dir)
    metadata.open_sync()
    try:
        yield metadata
    finally:
        metadata.close_sync()


def run(work: Callable[[SqliteMetadata], Awaitable[T]], cache_dir: Path) -> T:
    """`work(metadata)` on the cache's store, run to completion."""

    async def main() -> T:
        with opened(cache_dir) as metadata:
            return await work(metadata)

    return asyncio.run(main())
