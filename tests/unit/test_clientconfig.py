"""`mirror client-config`: what each client is told, and that it parses as the client reads it."""

from __future__ import annotations

import json
import tomllib

import pytest
import yaml

from mirror import cli
from mirror.clientconfig import ClientConfigError, render, split_files
from mirror.settings import Settings, load

TWO = ["docker.io=https://registry-1.docker.io", "ghcr=https://ghcr.io",
       "https://registry.example:5443"]


def settings(upstreams: list[str] = TWO) -> Settings:
    return load({"upstreams": upstreams}, env={})


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_docker(scheme: str) -> None:
    config = json.loads(render("docker", settings(), f"{scheme}://mirror:5000"))
    assert config["registry-mirrors"] == [f"{scheme}://mirror:5000"]
    if scheme == "http":
        assert config["insecure-registries"] == ["mirror:5000"]
    else:
        assert "insecure-registries" not in config


def test_docker_needs_docker_hub_first() -> None:
    with pytest.raises(ClientConfigError, match="Docker Hub"):
        render("docker", settings(["ghcr=https://ghcr.io", "docker.io=https://registry-1.docker.io"]),
               "http://mirror:5000")


def test_containerd_one_hosts_toml_per_registry() -> None:
    text = render("containerd", settings(), "https://mirror:5000")
    files = split_files(text)
    assert list(files) == ["docker.io/hosts.toml", "ghcr.io/hosts.toml",
                           "registry.example:5443/hosts.toml"]
    hub = tomllib.loads(files["docker.io/hosts.toml"])
    assert hub == {"server": "https://registry-1.docker.io",
                   "host": {"https://mirror:5000": {"capabilities": ["pull", "resolve"]}}}
    assert tomllib.loads(files["ghcr.io/hosts.toml"])["server"] == "https://ghcr.io"
    # the header lines are the only lines that are not part of a file
    def lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line]

    assert sum(len(lines(f)) for f in files.values()) + len(files) == len(lines(text))
    assert text.startswith("# file: docker.io/hosts.toml\n")


@pytest.mark.parametrize("client", ["podman", "cri-o"])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_registries_conf(client: str, scheme: str) -> None:
    conf = tomllib.loads(render(client, settings(), f"{scheme}://mirror:5000"))
    registries = {r["prefix"]: r for r in conf["registry"]}
    assert list(registries) == ["docker.io", "ghcr.io", "registry.example:5443"]
    for prefix, name in [("docker.io", "docker.io"), ("ghcr.io", "ghcr"),
                         ("registry.example:5443", "registry.example:5443")]:
        assert registries[prefix]["location"] == prefix
        [mirror] = registries[prefix]["mirror"]
        assert mirror["location"] == f"mirror:5000/{name}"
        assert mirror.get("insecure", False) is (scheme == "http")


def test_k3s() -> None:
    conf = yaml.safe_load(render("k3s", settings(), "http://mirror:5000"))
    assert conf == {"mirrors": {r: {"endpoint": ["http://mirror:5000"]}
                                for r in ("docker.io", "ghcr.io", "registry.example:5443")}}


@pytest.mark.parametrize("url", ["mirror:5000", "ftp://mirror", "http://mirror:5000/v2",
                                 "http://mirror:5000/?x=1"])
def test_bad_mirror_url(url: str) -> None:
    with pytest.raises(ClientConfigError, match="--mirror"):
        render("k3s", settings(), url)


def test_cli_prints_only_the_configuration(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIRROR_UPSTREAMS", raising=False)
    monkeypatch.delenv("MIRROR_CONFIG", raising=False)
    assert cli.main(["client-config", "podman", "--mirror", "http://m:5000"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert tomllib.loads(out.out)["registry"][0]["mirror"][0]["location"] == "m:5000/docker.io"
    assert cli.main(["client-config", "docker", "--mirror", "http://m:5000",
                     "--upstream", "ghcr=https://ghcr.io"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "Docker Hub" in out.err
