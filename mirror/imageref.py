"""Image references as people type them: `[registry/]repo[:tag][@digest]`.

The registry part picks a configured upstream (by name or host; Docker Hub's aliases count
as one); without it the default (first) upstream is meant, and on an upstream with the
library prefix a one-component name `nginx` means `library/nginx`. A reference with neither
tag nor digest means `:latest`, as `docker pull` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mirror.errors import RegistryError
from mirror.reference import check_name, check_tag, parse_digest
from mirror.settings import DOCKER_HUB, Upstream

DOCKER_HUB_HOSTS = frozenset({DOCKER_HUB, "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"


class RefError(ValueError):
    """A reference that does not parse, or names a registry with no upstream."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    upstream: str  # the upstream's name, e.g. `docker.io`
    repo: str  # e.g. `library/nginx`
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.upstream}/{self.repo}"

    def __str__(self) -> str:
        """The full reference, e.g. `docker.io/library/nginx:1.27`."""
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def split(text: str) -> tuple[str | None, str, str | None, str | None]:
    """(registry or None, path, tag, digest), by syntax alone; the registry is the first
    component when it looks like a host (has `.` or `:`, or is `localhost`)."""
    rest, _, digest = text.strip().partition("@")
    slash = rest.rfind("/")
    tag: str | None = None
    if ":" in rest[slash + 1:]:
        rest, _, tag = rest.rpartition(":")
    registry: str | None = None
    first, sep, path = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, rest = first, path
    return registry, rest, tag, digest or None


def find_upstream(registry: str, upstreams: Sequence[Upstream]) -> Upstream | None:
    for upstream in upstreams:
        names = {upstream.name, upstream.host}
        if names & DOCKER_HUB_HOSTS:
            names |= DOCKER_HUB_HOSTS
        if registry in names:
            return upstream
    return None


def parse(
    text: str, upstreams: Sequence[Upstream], *, known_only: bool = True,
    default_tag: str | None = DEFAULT_TAG,
) -> ImageRef:
    """Parse `text` against the configured upstreams.

    `known_only=False` accepts a registry no upstream is configured for, keeping its name
    as the upstream name (what an imported bundle may name).
    """
    registry, path, tag, digest = split(text)
    upstream: Upstream | None = upstreams[0]
    if registry is None:
        first, sep, rest = path.partition("/")
        named = next((u for u in upstreams if u.name == first), None) if sep else None
        if named is not None:  # a configured name that does not look like a host
            upstream, path = named, rest
    else:
        upstream = find_upstream(registry, upstreams)
        if upstream is None and known_only:
            raise RefError(f"{text!r}: no upstream is configured for registry {registry!r}")
    if upstream is not None:
        name, library = upstream.name, upstream.library_prefix
    else:
        assert registry is not None
        name = DOCKER_HUB if registry in DOCKER_HUB_HOSTS else registry
        library = name == DOCKER_HUB
    if library and "/" not in path:
        path = f"library/{path}"
    try:
        check_name(path)
        if tag is not None:
            check_tag(tag)
        if digest is not None:
            digest = str(parse_digest(digest))
    except RegistryError as exc:
        raise RefError(f"{text!r}: {exc.message}") from None
    if tag is None and digest is None:
        tag = default_tag
    return ImageRef(name, path, tag, digest)
