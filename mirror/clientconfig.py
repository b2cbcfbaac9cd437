"""`mirror client-config CLIENT --mirror URL`: the configuration a client needs to pull
through the mirror, for every upstream the mirror is configured with.

- docker: daemon.json keys. dockerd uses `registry-mirrors` for Docker Hub images only and
  sends their paths without a registry prefix, so Docker Hub must be the default upstream.
- containerd: one `certs.d/<registry>/hosts.toml` per upstream; containerd adds `?ns=<registry>`
  to its requests, which the mirror routes by. Printed one after another, each after a line
  `# file: <registry>/hosts.toml` (see `split_files`).
- podman, cri-o: `registries.conf` with a `[[registry.mirror]]` per upstream at
  `MIRROR/<upstream name>`: the mirror routes by that path prefix.
- k3s: `registries.yaml`; k3s writes containerd's hosts.toml from it (so `?ns=` again).
"""

from __future__ import annotations

import json  # JSON strings are valid TOML and YAML strings
from collections.abc import Callable
from urllib.parse import urlsplit

from mirror.settings import DOCKER_HUB, Settings, Upstream

DOCKER_HUB_HOSTS = frozenset({DOCKER_HUB, "index.docker.io", "registry-1.docker.io"})
FILE_MARK = "# file: "
CLIENTS = ("docker", "containerd", "podman", "cri-o", "k3s")


class ClientConfigError(ValueError):
    """The configuration cannot be made (the message says why)."""


def registry_of(upstream: Upstream) -> str:
    """The registry name clients write in image references for this upstream."""
    if upstream.name in DOCKER_HUB_HOSTS or upstream.host in DOCKER_HUB_HOSTS:
        return DOCKER_HUB
    return upstream.host


def _mirror(url: str) -> tuple[str, str]:
    """(base URL without a trailing slash, host:port) of the mirror; checks the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientConfigError(f"--mirror: expected an http(s) URL, got {url!r}")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ClientConfigError(f"--mirror: expected no path, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}", parts.netloc


def docker(settings: Settings, mirror_url: str) -> str:
    base, host = _mirror(mirror_url)
    if registry_of(settings.default_upstream) != DOCKER_HUB:
        raise ClientConfigError(
            "docker: dockerd mirrors only Docker Hub and sends no registry name, so Docker Hub "
            f"must be the mirror's first upstream (it is {settings.default_upstream.name!r})")
    config: dict[str, list[str]] = {"registry-mirrors": [base]}
    if base.startswith("http://"):
        config["insecure-registries"] = [host]
    return json.dumps(config, indent=2) + "\n"


def containerd(settings: Settings, mirror_url: str) -> str:
    base, _ = _mirror(mirror_url)
    files = []
    for upstream in settings.upstreams:
        registry = registry_of(upstream)
        files.append(
            f"{FILE_MARK}{registry}/hosts.toml\n"
            f"server = {json.dumps(upstream.url)}\n\n"
            f"[host.{json.dumps(base)}]\n"
            '  capabilities = ["pull", "resolve"]\n')
    return "\n".join(files)


def registries_conf(settings: Settings, mirror_url: str) -> str:
    base, host = _mirror(mirror_url)
    blocks = []
    for upstream in settings.upstreams:
        registry = registry_of(upstream)
        block = (f"[[registry]]\nprefix = {json.dumps(registry)}\n"
                 f"location = {json.dumps(registry)}\n\n"
                 f"[[registry.mirror]]\nlocation = {json.dumps(host + '/' + upstream.name)}\n")
        if base.startswith("http://"):
            block += "insecure = true\n"
        blocks.append(block)
    return "\n".join(blocks)


def k3s(settings: Settings, mirror_url: str) -> str:
    base, _ = _mirror(mirror_url)
    lines = ["mirrors:"]
    for upstream in settings.upstreams:
        lines += [f"  {json.dumps(registry_of(upstream))}:", "    endpoint:",
                  f"      - {json.dumps(base)}"]
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[Settings, str], str]] = {
    "docker": docker,
    "containerd": containerd,
    "podman": registries_conf,
    "cri-o": registries_conf,
    "k3s": k3s,
}


def render(client: str, settings: Settings, mirror_url: str) -> str:
    return RENDERERS[client](settings, mirror_url)


def split_files(text: str) -> dict[str, str]:
    """The files of containerd's output: {"docker.io/hosts.toml": "server = ...", ...}."""
    files: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith(FILE_MARK):
            name = line[len(FILE_MARK):].strip()
            files[name] = ""
        elif name is not None:
            files[name] += line
    return {k: v.rstrip("\n") + "\n" for k, v in files.items()}
