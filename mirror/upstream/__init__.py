"""The upstream side: talking to upstream registries.

    client     one upstream registry over HTTP: authentication on its challenge, requests
               for metadata (httpx) and blob bodies (aiohttp), transport failures and error
               answers turned into `RegistryError`s that name the upstream
    transport  how connections are made, for both HTTP clients from one place: timeouts,
               proxies from the environment, a CA bundle and a client certificate per upstream
    redirects  the redirect policy both clients follow: credentials never leave the origin
    answers    an upstream's error answer as the error our client should see
    download   blob GETs whose bodies a fill's thread reads from the socket
    tokens     the Docker registry token protocol: challenges, token fetches and their cache
"""

from mirror.upstream.answers import upstream_error
from mirror.upstream.client import UpstreamClient
from mirror.upstream.download import Answer, Body, BodyBroken, Downloader, SocketBody, Streamed
from mirror.upstream.redirects import MAX_REDIRECTS
from mirror.upstream.tokens import (
    ANONYMOUS,
    Challenge,
    Credential,
    TokenCache,
    parse_challenge,
    repository_scope,
)

__all__ = [
    "ANONYMOUS", "MAX_REDIRECTS", "Answer", "Body", "BodyBroken", "Challenge", "Credential",
    "Downloader", "SocketBody", "Streamed", "TokenCache", "UpstreamClient", "parse_challenge",
    "repository_scope", "upstream_error",
]
