"""Subprocess and networking helpers for integration tests (loopback only)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

_counter = itertools.count()


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without proxies (loopback traffic only), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy",
                                                                       "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str,
    timeout: float = 20,
    ok: Callable[[int], bool] = lambda status: True,
    proc: Proc | None = None,
    verify: ssl.SSLContext | bool = True,
) -> int:
    """Poll `url` until an HTTP answer whose status satisfies `ok` arrives; return the status.

    If `proc` is given and dies, fail at once with its log.
    """
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while True:
        try:
            r = httpx.get(url, timeout=2, trust_env=False, verify=verify)
            if ok(r.status_code):
                return r.status_code
            last = f"status {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if proc is not None and not proc.alive:
            raise RuntimeError(f"{proc.name} exited ({proc.returncode}) before {url} answered;"
                               f" log:\n{proc.log_text()[-4000:]}")
        if time.monotonic() > deadline:
            tail = f"; log:\n{proc.log_text()[-4000:]}" if proc else ""
            raise TimeoutError(f"{url} did not answer within {timeout}s ({last}){tail}")
        time.sleep(0.05)


class Proc:
    """A subprocess in its own process group, with stdout+stderr appended to `log_dir/NAME.log`."""

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        log_dir: Path,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        log_name: str | None = None,
    ) -> None:
        """`log_name` names a log file to append to (e.g. across restarts); by default each
        Proc gets a new `NAME-N.log`. `env` defaults to `clean_env()`."""
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / (log_name or f"{self.name}-{next(_counter)}.log")
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else clean_env(),
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_text(self) -> str:
        """What this process has logged so far."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM the process group, wait up to `timeout` s, then SIGKILL it."""
        if self.alive:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait()
        # Children left behind in the group (if the leader exited first) go too.
        self._signal_group(signal.SIGKILL)
        return self.popen.returncode

    def kill(self) -> int:
        """SIGKILL the whole process group at once."""
        self._signal_group(signal.SIGKILL)
        return self.popen.wait()

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, alive={self.alive})"


REPO_ROOT = Path(__file__).resolve().parents[2]


class MirrorProc:
    """`python -m mirror serve` on 127.0.0.1:<port>; restartable with the same port, cache dir
    and arguments."""

    def __init__(
        self,
        upstreams: Sequence[tuple[str, str]],
        cache_dir: Path,
        log_dir: Path,
        *,
        args: Sequence[str] = (),
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        tls_ca: Path | None = None,
        code: Path = REPO_ROOT,
    ) -> None:
        """`tls_ca`: the mirror serves HTTPS (its --tls-* flags are in `args`) with a
        certificate this CA signed; `url` is then https and start-up is checked with it.
        `code`: the directory whose `mirror` package runs (another release's, say)."""
        self.tls_ca = tls_ca
        self.code = code
        self.upstreams = list(upstreams)
        self.cache_dir = cache_dir
        self.log_dir = log_dir
        self.args = list(args)
        self.workers = workers
        self.env = dict(env or {})
        self.port = port or free_port()
        self.proc: Proc | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://{self.host}"

    @property
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "mirror", "serve", "--listen", self.host]
        for name, url in self.upstreams:
            argv += ["--upstream", f"{name}={url}"]
        argv += ["--cache-dir", str(self.cache_dir)]
        if self.workers != 1:
            argv += ["--workers", str(self.workers)]
        return argv + self.args

    def start(self, timeout: float = 30) -> MirrorProc:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        pythonpath = os.pathsep.join(
            p for p in (str(self.code), os.environ.get("PYTHONPATH", "")) if p)
        env = clean_env({"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **self.env})
        self.proc = Proc(self.argv, self.log_dir, name="mirror", env=env, cwd=self.code,
                         log_name="mirror.log")
        wait_http(f"{self.url}/v2/", timeout, ok=lambda s: s in (200, 401), proc=self.proc,
                  verify=ssl.create_default_context(cafile=self.tls_ca) if self.tls_ca else True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    def stop(self) -> int | None:
        return self.proc.stop() if self.proc is not None else None

    def kill(self) -> int | None:
        return self.proc.kill() if self.proc is not None else None

    def restart(self, timeout: float = 30) -> MirrorProc:
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        """Everything logged by this mirror, across restarts."""
        path = self.log_dir / "mirror.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __repr__(self) -> str:
        return f"MirrorProc({self.url}, alive={self.alive})"
