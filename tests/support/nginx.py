"""nginx in front of mirror replicas, from the repository's own config/nginx.conf."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import pytest

from .procs import REPO_ROOT, Proc, free_port, wait_http

TEMPLATE = REPO_ROOT / "config" / "nginx.conf"


class Nginx:
    def __init__(self, work: Path, backends: Sequence[str]) -> None:
        if shutil.which("nginx") is None:
            pytest.fail("missing: nginx (tests/run installs it)")
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backends = list(backends)  # host:port of each replica
        self.proc: Proc | None = None

    def config(self) -> Path:
        text = TEMPLATE.read_text()
        replicas = "\n        ".join(f"server {b} max_fails=1 fail_timeout=2s;"
                                     for b in self.backends)
        text = (text.replace("@PREFIX@", str(self.work)).replace("@REPLICAS@", replicas)
                .replace("@LISTEN@", f"127.0.0.1:{self.port}"))
        path = self.work / "nginx.conf"
        path.write_text(text)
        return path

    def __enter__(self) -> Nginx:
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.config()
        self.proc = Proc(["nginx", "-c", str(config), "-p", str(self.work), "-g",
                          "daemon off;"], self.work, name="nginx")
        wait_http(f"{self.url}/v2/", 20, proc=self.proc)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.stop()
