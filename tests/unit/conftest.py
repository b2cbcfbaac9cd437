"""Unit-test fixtures: a store over a fresh embedded metadata database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.metadata import SqliteMetadata, database_path
from mirror.store import Store


@pytest.fixture
def metadata(tmp_path: Path) -> Iterator[SqliteMetadata]:
    metadata = SqliteMetadata(database_path(tmp_path / "cache"))
    metadata.open_sync()
    yield metadata
    metadata.close_sync()


@pytest.fixture
def store(tmp_path: Path, metadata: SqliteMetadata) -> Store:
    return Store(tmp_path / "cache", metadata)
