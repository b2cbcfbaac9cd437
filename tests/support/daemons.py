"""pytest fixtures for real Docker / containerd clients of a mirror.

Import into a conftest:  from support.daemons import containerd, containerd_session,
dockerd_factory  # noqa: F401

Start-up: a Dockerd (private containerd + dockerd) takes ~0.1 s, a Containerd ~0.03 s;
a pull of a tiny image ~0.1 s. Dockerd state is per test, containerd is cleaned per test.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence

import pytest

from .containerd import Containerd
from .dockerd import Dockerd


def require(*binaries: str) -> None:
    """Fail clearly unless we are root and every binary is on PATH (tests/run installs them)."""
    if os.geteuid() != 0:
        pytest.fail("needs root to run dockerd/containerd")
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)} (tests/run installs them)")


class DockerdFactory:
    """`factory(mirror_url)` -> a started Dockerd, one per distinct arguments; close() stops all."""

    def __init__(self) -> None:
        self.daemons: dict[tuple[str | None, tuple[str, ...]], Dockerd] = {}

    def __call__(self, mirror_url: str | None,
                 insecure_registries: Sequence[str] = ()) -> Dockerd:
        key = (mirror_url, tuple(insecure_registries))
        if key not in self.daemons:
            self.daemons[key] = Dockerd(mirror_url, insecure_registries=insecure_registries).start()
        return self.daemons[key]

    def close(self) -> None:
        while self.daemons:
            _, daemon = self.daemons.popitem()
            daemon.stop()


@pytest.fixture
def dockerd_factory() -> Iterator[DockerdFactory]:
    """Per test: fresh daemons (empty image store), so every pull really goes to the mirror."""
    require("dockerd", "docker", "containerd")
    factory = DockerdFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def containerd_session() -> Iterator[Containerd]:
    require("containerd", "ctr")
    with Containerd() as daemon:
        yield daemon


@pytest.fixture
def containerd(containerd_session: Containerd) -> Containerd:
    """The session's containerd with all images and content removed first."""
    containerd_session.clean()
    return containerd_session
