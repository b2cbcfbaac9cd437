"""pytest fixtures for tests of many mirror replicas sharing an object store and Redis.

Import into a conftest:  from support.cluster_fixtures import ceph, redis_server, redis_url,
s3_bucket  # noqa: F401

- `ceph` (session): a single-node Ceph cluster with radosgw (`support.ceph.Ceph`); about 2.5 s
  to start, well under a second to stop.
- `s3_bucket` (per test): the name of a new, empty bucket on it, deleted with its objects and
  pending multipart uploads afterwards.
- `redis_server` (session): a redis-server (`support.redisd.RedisServer`).
- `redis_url` (per test): its URL, every key flushed first.

A missing binary fails the test with the packages to install; nothing is skipped.
"""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import Iterator

import pytest

from .ceph import Ceph, missing_binaries
from .redisd import RedisServer


def require_binaries(*binaries: str) -> None:
    """Fail clearly unless every binary is on PATH (tests/run installs them)."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)} (tests/run installs them)")


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ceph]:
    """A running single-node Ceph cluster with radosgw and an S3 user."""
    missing = missing_binaries()
    if missing:
        pytest.fail(f"missing: {', '.join(missing)} (tests/run installs ceph-mon, ceph-osd,"
                    " radosgw and ceph-common)")
    with Ceph(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster


def bucket_name(test_name: str) -> str:
    """A valid, unique S3 bucket name derived from a test's name."""
    stem = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:48].strip("-")
    return f"{stem or 'test'}-{secrets.token_hex(4)}"


@pytest.fixture
def s3_bucket(ceph: Ceph, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty bucket on `ceph`; its name."""
    name = bucket_name(request.node.name)
    ceph.create_bucket(name)
    try:
        yield name
    finally:
        ceph.delete_bucket(name)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_binaries("redis-server", "setpriv")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """redis://127.0.0.1:PORT/0 of the session's server, emptied first."""
    redis_server.flushall()
    return redis_server.url
