"""Shared fixtures: a seeded token-auth upstream registry and a mirror process factory."""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # `support` importable however we're loaded
    sys.path.insert(0, str(Path(__file__).parent))

from support.cluster_fixtures import ceph, redis_server, redis_url, s3_bucket
from support.daemons import containerd, containerd_session, dockerd_factory
from support.images import ImageInfo, seed, skopeo, skopeo_copy_to_dir
from support.procs import MirrorProc
from support.registry import Registry, TokenIssuer, Upstream

from mirror.metadata import SqliteMetadata, database_path
from mirror.store import Store

__all__ = [
    "ImageInfo", "MirrorProc", "StartMirror", "Upstream", "ceph", "containerd",
    "containerd_session", "dockerd_factory", "redis_server", "redis_url", "s3_bucket", "skopeo",
    "skopeo_copy_to_dir",
]

StartMirror = Callable[..., MirrorProc]


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A distribution 2.8 registry with token auth (alice/bob/anonymous), seeded with the test
    images (see `support.images.seed`)."""
    work = tmp_path_factory.mktemp("upstream")
    with TokenIssuer(work) as issuer, Registry(work, auth=issuer) as registry:
        images = seed(registry)
        issuer.requests.clear()
        yield Upstream(registry, issuer, images)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)  # lets fixtures see whether the test failed
    return report


@pytest.fixture
def start_mirror(
    upstream: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StartMirror]:
    """Factory: `start_mirror(upstreams=None, args=(), workers=1, cache_dir=None, env=None,
    tls_ca=None)`
    starts `python -m mirror serve` (default upstream: docker.io -> the seeded upstream) and
    waits until `/v2/` answers. Every mirror started is stopped at teardown."""
    mirrors: list[MirrorProc] = []

    def start(
        upstreams: Sequence[tuple[str, str]] | None = None,
        args: Sequence[str] = (),
        workers: int = 1,
        cache_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        tls_ca: Path | None = None,
    ) -> MirrorProc:
        n = len(mirrors)
        mirror = MirrorProc(
            upstreams if upstreams is not None else [("docker.io", upstream.url)],
            cache_dir or tmp_path / f"mirror-cache-{n}",
            tmp_path / f"mirror-logs-{n}",
            args=args,
            workers=workers,
            env=env,
            tls_ca=tls_ca,
        )
        mirrors.append(mirror)
        mirror.start()
        return mirror

    yield start
    for mirror in mirrors:
        mirror.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for mirror in mirrors:  # shown under "Captured stdout teardown"
            print(f"--- {mirror.url} log ({mirror.log_dir}) ---\n{mirror.log_text()[-20000:]}")


@pytest.fixture
def metadata(tmp_path: Path) -> Iterator[SqliteMetadata]:
    """A fresh embedded metadata store (for unit tests of the parts that use one)."""
    store = SqliteMetadata(database_path(tmp_path / "cache"))
    store.open_sync()
    yield store
    store.close_sync()


@pytest.fixture
def store(tmp_path: Path, metadata: SqliteMetadata) -> Store:
    """A store over `metadata`, in a fresh cache directory."""
    return Store(tmp_path / "cache", metadata)
