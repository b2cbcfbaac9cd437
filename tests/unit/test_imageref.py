"""Image references as typed on the command line: `[registry/]repo[:tag][@digest]`."""

from __future__ import annotations

import pytest

from mirror.imageref import ImageRef, RefError, parse, split
from mirror.settings import Upstream, parse_upstream

HEX = "0123456789abcdef" * 4
HUB = parse_upstream("https://registry-1.docker.io")
GHCR = parse_upstream("ghcr.io=https://ghcr.io")
LOCAL = parse_upstream("mine=http://127.0.0.1:5001")
UPSTREAMS = [HUB, GHCR, LOCAL]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx", (None, "nginx", None, None)),
        ("nginx:1.27", (None, "nginx", "1.27", None)),
        ("library/nginx@sha256:" + HEX, (None, "library/nginx", None, "sha256:" + HEX)),
        ("ghcr.io/owner/img:1.0", ("ghcr.io", "owner/img", "1.0", None)),
        ("localhost/x", ("localhost", "x", None, None)),
        ("127.0.0.1:5000/a/b:2@sha256:" + HEX, ("127.0.0.1:5000", "a/b", "2", "sha256:" + HEX)),
        ("owner/img", (None, "owner/img", None, None)),
    ],
)
def test_split(text: str, expected: tuple[str | None, str, str | None, str | None]) -> None:
    assert split(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx:1.27", "docker.io/library/nginx:1.27"),
        ("nginx", "docker.io/library/nginx:latest"),
        ("docker.io/library/alpine@sha256:" + HEX, f"docker.io/library/alpine@sha256:{HEX}"),
        ("index.docker.io/owner/img:1", "docker.io/owner/img:1"),
        ("registry-1.docker.io/alpine:3", "docker.io/library/alpine:3"),
        ("ghcr.io/owner/img:1.0", "ghcr.io/owner/img:1.0"),
        ("ghcr.io/img:1.0", "ghcr.io/img:1.0"),  # no library prefix off Docker Hub
        ("mine/team/app:7", "mine/team/app:7"),  # a configured name that is not a host
        ("127.0.0.1:5001/team/app:7", "mine/team/app:7"),  # by host
        ("owner/img:1@sha256:" + HEX, f"docker.io/owner/img:1@sha256:{HEX}"),
    ],
)
def test_parse_picks_the_upstream_and_normalises(text: str, expected: str) -> None:
    assert str(parse(text, UPSTREAMS)) == expected


def test_parse_fields() -> None:
    ref = parse("ghcr.io/owner/img:1.0", UPSTREAMS)
    assert ref == ImageRef("ghcr.io", "owner/img", "1.0", None)
    assert ref.name == "ghcr.io/owner/img"


def test_default_upstream_is_the_first() -> None:
    first = Upstream("docker.io", "http://127.0.0.1:9", library_prefix=True)
    assert str(parse("small", [first, GHCR])) == "docker.io/library/small:latest"
    assert str(parse("x/y:1", [GHCR, first])) == "ghcr.io/x/y:1"


def test_unknown_registry() -> None:
    with pytest.raises(RefError, match=r"no upstream is configured for registry 'quay\.io'"):
        parse("quay.io/a/b:1", UPSTREAMS)
    # Accepted for bundles: the registry's name becomes the upstream name.
    assert str(parse("quay.io/a/b:1", UPSTREAMS, known_only=False)) == "quay.io/a/b:1"
    assert str(parse("docker.io/alpine", [GHCR], known_only=False)) == (
        "docker.io/library/alpine:latest")


@pytest.mark.parametrize(
    "text", ["Nginx", "nginx:", "nginx:bad tag", "nginx@sha256:short", "a//b", "nginx@md5:" + HEX,
             ""],
)
def test_bad_references(text: str) -> None:
    with pytest.raises(RefError):
        parse(text, UPSTREAMS)
