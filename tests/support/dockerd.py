"""A private Docker daemon (dockerd 20.10, vfs) using a registry mirror, driven with the CLI."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from .containerd import Containerd, proxy_env, remove_tree, spawn, terminate, wait_until

HUB_AUTH_KEY = "https://index.docker.io/v1/"


def docker_hub_credentials(config_dir: Path | str, user: str, password: str) -> Path:
    """Write a DOCKER_CONFIG dir holding Docker Hub credentials, as `docker login` would."""
    path = Path(config_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {HUB_AUTH_KEY: {"auth": auth}}}))
    return path


def familiar_repo(ref: str) -> str:
    """docker.io/library/small:latest -> small; 127.0.0.1:5000/a/b:1 -> 127.0.0.1:5000/a/b."""
    name = ref.split("@", 1)[0]
    slash = name.rfind("/")
    if ":" in name[slash + 1 :]:
        name = name[: name.rfind(":")]
    for prefix in ("docker.io/", "index.docker.io/", "library/"):
        name = name.removeprefix(prefix)
    return name


def _ping(sock_path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(sock_path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return s.recv(4096).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


class Dockerd:
    """`dockerd --config-file F` with `registry-mirrors = [mirror_url]`, all state in a temp dir.

    dockerd gets its own private containerd (see Containerd) through the "containerd" option,
    so it never shares /run/containerd/containerd.sock nor creates /opt/containerd.
    """

    def __init__(self, mirror_url: str | None = None, *, insecure_registries: Sequence[str] = (),
                 log_level: str = "info", extra_config: dict[str, Any] | None = None,
                 proxy: str | None = None) -> None:
        """`proxy`: the daemon's HTTP(S)_PROXY, a loopback proxy of the test's (default: a
        dead one)."""
        self.mirror_url = mirror_url
        self.proxy = proxy
        self.base = Path(tempfile.mkdtemp(prefix="dkd-", dir="/tmp"))
        self.sock_path = str(self.base / "docker.sock")
        self.host = f"unix://{self.sock_path}"
        self.config_dir = self.base / "cli"  # default DOCKER_CONFIG: never the user's ~/.docker
        self.log_path = self.base / "dockerd.log"
        insecure = list(insecure_registries)
        if mirror_url:
            insecure.insert(0, urlsplit(mirror_url).netloc)
        self.config: dict[str, Any] = {
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "ip-forward": False,
            "ip-masq": False,
            "bridge": "none",
            "data-root": str(self.base / "data"),
            "exec-root": str(self.base / "exec"),
            "pidfile": str(self.base / "docker.pid"),
            "deprecated-key-path": str(self.base / "key.json"),  # else /etc/docker/key.json
            "hosts": [self.host],
            "registry-mirrors": [mirror_url] if mirror_url else [],
            "insecure-registries": insecure,
            "log-level": log_level,
            **(extra_config or {}),
        }
        self.containerd = Containerd(self.base / "ctd")
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def start(self) -> Dockerd:
        started = time.monotonic()
        try:
            self.containerd.start()
            self.config["containerd"] = self.containerd.address
            config = self.base / "daemon.json"
            config.write_text(json.dumps(self.config, indent=1))
            self.config_dir.mkdir(exist_ok=True)
            env = None
            if self.proxy:
                env = proxy_env({k: self.proxy for k in ("HTTP_PROXY", "HTTPS_PROXY",
                                                         "http_proxy", "https_proxy")})
            self.proc = spawn(["dockerd", "--config-file", str(config)], self.log_path, env)
            wait_until(lambda: _ping(self.sock_path), self.proc, self.log_path, "dockerd")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop dockerd and its containerd, unmount what they left, and delete the temp dir."""
        terminate(self.proc)
        self.proc = None
        self.containerd.stop()
        remove_tree(self.base)

    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def docker(self, *args: str, docker_config_dir: Path | str | None = None,
               input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this daemon (never raises on failure)."""
        env = proxy_env({"DOCKER_CONFIG": str(docker_config_dir or self.config_dir)})
        env.pop("DOCKER_HOST", None)
        env.pop("DOCKER_CONTEXT", None)
        return subprocess.run(["docker", "--host", self.host, *args], env=env, input=input,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def pull(self, ref: str, docker_config_dir: Path | str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.docker("pull", ref, docker_config_dir=docker_config_dir, timeout=timeout)

    def push(self, ref: str, docker_config_dir: Path | str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.docker("push", ref, docker_config_dir=docker_config_dir, timeout=timeout)

    def login(self, host: str, user: str, password: str,
              docker_config_dir: Path | str | None = None) -> subprocess.CompletedProcess[str]:
        return self.docker("login", "--username", user, "--password-stdin", host,
                           input=password, docker_config_dir=docker_config_dir)

    def tag(self, src: str, dst: str) -> subprocess.CompletedProcess[str]:
        return self.docker("tag", src, dst)

    def rmi(self, *refs: str, force: bool = True) -> subprocess.CompletedProcess[str]:
        return self.docker("rmi", *(["--force"] if force else []), *refs)

    def inspect(self, ref: str) -> dict[str, Any] | None:
        out = self.docker("image", "inspect", ref)
        if out.returncode != 0:
            return None
        info: dict[str, Any] = json.loads(out.stdout)[0]
        return info

    def image_id(self, ref: str) -> str | None:
        info = self.inspect(ref)
        return info["Id"] if info else None

    def image_digest(self, ref: str) -> str | None:
        """Manifest digest the image was pulled by (from RepoDigests), or None."""
        digests: list[str] = (self.inspect(ref) or {}).get("RepoDigests") or []
        matching = [d for d in digests if familiar_repo(d) == familiar_repo(ref)]
        chosen = matching or (digests if len(digests) == 1 else [])
        return chosen[0].split("@", 1)[1] if chosen else None
