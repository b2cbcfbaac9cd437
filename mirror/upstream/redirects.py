"""The redirect policy both HTTP clients follow (httpx for metadata, aiohttp for blobs).

Registries send blob GETs to CDNs with 307s. A redirect is followed up to `MAX_REDIRECTS`
times; once it leaves the origin (scheme, host and port) of the request it started from,
the request carries no `Authorization` header any more: a CDN never sees our credentials.
What a redirect target answers never teaches the client anything about authentication
(`mirror.upstream.client` learns challenges only from the upstream's own origin).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from mirror import errors

MAX_REDIRECTS = 5
REDIRECTS = frozenset((301, 302, 303, 307, 308))


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def follow(start: str, current: str, location: str,
           headers: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """Where a redirect from `current` leads, and the headers to send there: without
    Authorization once off the origin of `start`."""
    target = _checked(urljoin(current, location))
    if origin(target) != origin(start):
        return target, {k: v for k, v in headers.items() if k.lower() != "authorization"}
    return target, dict(headers)


def location(values: Sequence[str]) -> str | None:
    """The one place a redirect leads to, from its Location headers: two that differ are
    refused (joined, they would name a place neither meant)."""
    if not values:
        return None
    if any(v != values[0] for v in values):
        raise errors.UpstreamError("an upstream redirect named more than one location")
    return values[0]


_STRAY = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SAFE = "/!$&'()*+,;=:@~%"  # and letters, digits, `-._`: what a URL may carry as is


def _checked(url: str) -> str:
    """A redirect target fit to request: http(s), a valid port, a plain host; its path and
    query percent-encoded as HTTP clients send them (`%XX` kept as is)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise errors.UpstreamError(f"an upstream redirected to a {parts.scheme or 'relative'}"
                                   " URL")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise errors.UpstreamError(f"an upstream redirected to a bad port: {exc}") from None
    if not parts.hostname or any(c <= " " or c == "\x7f" for c in parts.netloc):
        raise errors.UpstreamError("an upstream redirected to a bad host")
    path = quote(_STRAY.sub("%25", parts.path), safe=_SAFE)
    query = quote(_STRAY.sub("%25", parts.query), safe=_SAFE + "?")
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))
