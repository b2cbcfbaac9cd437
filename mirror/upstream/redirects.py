"""The redirect policy both HTTP clients follow (httpx for metadata, aiohttp for blobs).

Registries send blob GETs to CDNs with 307s. A redirect is followed up to `MAX_REDIRECTS`
times; once it leaves the origin (scheme, host and port) of the request it started from,
the request carries no `Authorization` header any more: a CDN never sees our credentials.
What a redirect target answers never teaches the client anything about authentication
(`mirror.upstream.client` learns challenges only from the upstream's own origin).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 5
REDIRECTS = frozenset((301, 302, 303, 307, 308))


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def follow(start: str, current: str, location: str,
           headers: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """Where a redirect from `current` leads, and the headers to send there: without
    Authorization once off the origin of `start`."""
    target = urljoin(current, location)
    if origin(target) != origin(start):
        return target, {k: v for k, v in headers.items() if k.lower() != "authorization"}
    return target, dict(headers)
