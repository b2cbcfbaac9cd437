"""A private containerd (driven with `ctr`) for tests, plus helpers shared with dockerd.py."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

# Any fallback to a real registry goes to a dead proxy on loopback (Go never proxies loopback).
PROXY = "http://127.0.0.1:9"
NO_PROXY = "127.0.0.1,localhost"


def proxy_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ with every *_proxy variable replaced by the dead loopback proxy."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    for key, value in (("HTTP_PROXY", PROXY), ("HTTPS_PROXY", PROXY), ("NO_PROXY", NO_PROXY)):
        env[key] = env[key.lower()] = value
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphans if pytest dies


def spawn(cmd: list[str], log_path: Path,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session with the dead-proxy env (or `env`), output appended
    to log_path."""
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, env=env or proxy_env(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path,
               what: str, timeout: float = 30.0) -> None:
    """Poll `ready()` until true; fail early (with the log tail) if `proc` exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            state = f"exited {proc.returncode}" if proc.returncode is not None else "timed out"
            raise RuntimeError(f"{what} {state} before becoming ready:\n{tail}")
        time.sleep(0.02)


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; always reaps."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # \040 etc.
        if point == prefix[:-1] or point.startswith(prefix):
            points.append(point)
    return points


def remove_tree(root: Path) -> None:
    """Lazily unmount everything under `root` (deepest first), then `rm -rf` it."""
    for point in sorted(set(mounts_under(root)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if root.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
    shutil.rmtree(root, ignore_errors=True)


class Containerd:
    """`containerd --config F` with everything (root, state, sockets) under one short temp dir."""

    SNAPSHOTTER = "native"
    DISABLED_PLUGINS = (
        "io.containerd.grpc.v1.cri",  # needs CNI etc.; not used by ctr
        "io.containerd.internal.v1.opt",  # would create /opt/containerd
        "io.containerd.tracing.processor.v1.otlp",
        *(f"io.containerd.snapshotter.v1.{s}" for s in ("aufs", "btrfs", "zfs", "devmapper")),
    )

    def __init__(self, base: Path | None = None, namespace: str = "default") -> None:
        self._own_base = base is None
        self.base = base or Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        self.address = str(self.base / "c.sock")
        self.namespace = namespace
        self.log_path = self.base / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def config_toml(self) -> str:
        disabled = ", ".join(f'"{p}"' for p in self.DISABLED_PLUGINS)
        return (
            f'version = 2\nroot = "{self.base}/root"\nstate = "{self.base}/state"\n'
            f'temp = "{self.base}/tmp"\ndisabled_plugins = [{disabled}]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
        )

    def start(self) -> Containerd:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "tmp").mkdir(exist_ok=True)
        config = self.base / "config.toml"
        config.write_text(self.config_toml())
        started = time.monotonic()
        self.proc = spawn(["containerd", "--config", str(config)], self.log_path)
        try:
            wait_until(lambda: self.ctr("version", timeout=5).returncode == 0,
                       self.proc, self.log_path, "containerd")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        if self._own_base:
            remove_tree(self.base)
        else:
            for point in sorted(mounts_under(self.base), key=len, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `ctr --address SOCK --namespace NS ARGS...` (never raises on failure)."""
        cmd = ["ctr", "--address", self.address, "--namespace", self.namespace, *args]
        return subprocess.run(cmd, env=proxy_env(), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def pull(self, ref: str, hosts_dir: Path | str, user: str | None = None,
             platform: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`ctr images pull --hosts-dir DIR [--user u:p] [--platform p] --snapshotter native REF`.

        `ref` must be fully qualified (docker.io/library/x:tag). `user` is "user:password".
        """
        args = ["images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", self.SNAPSHOTTER]
        if user is not None:
            args += ["--user", user]
        if platform is not None:
            args += ["--platform", platform]
        return self.ctr(*args, ref, timeout=timeout)

    def image_digest(self, ref: str) -> str | None:
        """Target digest of image `ref` (as stored, e.g. docker.io/library/x:1), or None."""
        out = self.ctr("images", "ls").stdout
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == ref:
                return fields[2]
        return None

    def rmi(self, *refs: str) -> subprocess.CompletedProcess[str]:
        return self.ctr("images", "rm", "--sync", *refs)

    def clean(self) -> None:
        """Remove every image, then all remaining content, so the next pull fetches everything."""
        refs = self.ctr("images", "ls", "-q").stdout.split()
        if refs:
            self.rmi(*refs)
        digests = self.ctr("content", "ls", "-q").stdout.split()
        if digests:
            self.ctr("content", "rm", *digests)


def write_hosts_toml(hosts_dir: Path | str, registry: str = "docker.io", *, mirror_url: str,
                     server: str = PROXY, capabilities: tuple[str, ...] = ("pull", "resolve"),
                     extra: str = "") -> Path:
    """Write `hosts_dir/registry/hosts.toml` with one mirror host; return the file.

    `server` defaults to a dead loopback address so a fallback never leaves the machine
    (the real default would be https://registry-1.docker.io).
    """
    path = Path(hosts_dir) / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    caps = ", ".join(f'"{c}"' for c in capabilities)
    path.write_text(f'server = "{server}"\n\n[host."{mirror_url}"]\n'
                    f"  capabilities = [{caps}]\n{extra}")
    return path
