"""Metadata: the interface (`Metadata`) and its implementations, chosen from settings."""

from __future__ import annotations

from pathlib import Path

from mirror.metadata.base import (
    PAGE,
    AcceptKey,
    ContentRecord,
    Grant,
    Metadata,
    MetadataError,
    MetadataUnavailable,
    PullCount,
    RefRecord,
    TagRecord,
)
from mirror.metadata.sqlite import SqliteMetadata
from mirror.metadata.sqlite_db import database_path

__all__ = [
    "PAGE", "AcceptKey", "ContentRecord", "Grant", "Metadata", "MetadataError",
    "MetadataUnavailable", "PullCount", "RefRecord", "SqliteMetadata", "TagRecord", "create",
]


def create(cache_dir: Path, redis_url: str = "") -> Metadata:
    """The metadata store settings ask for: Redis when a URL is given, else SQLite in the
    cache directory (importing a previous release's index there once)."""
    if redis_url:
        # Imported here: loading redis-py takes ~90 ms that the embedded default need not pay.
        from mirror.metadata.redis import RedisMetadata

        return RedisMetadata(redis_url)
    return SqliteMetadata(database_path(cache_dir), legacy_root=cache_dir)
