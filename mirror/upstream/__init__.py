"""The upstream side: talking to upstream registries.

    client     one upstream registry over HTTP: authentication on its challenge, requests
               for metadata (httpx) and blob bodies (aiohttp), transport failures and error
               answers turned into `RegistryError`s that name the upstream
    transport  how connections are made, for both HTTP clients from one place: timeouts,
               proxies from the environment, a CA bundle and a client certificate per upstream
    redirects  the redirect policy both clients follow: credentials never leave the origin
    answers    an upstream's error answer as the error our client should see
    downloader blob GETs whose bodies a fill's thread reads from the socket: the async facade
    pool       kept-alive connections, reused per origin and proxy
    sockets    blocking sockets cut from other threads, idle ones checked for stray bytes
    exchange   one HTTP/1.1 GET on a blocking socket, up to its answer's head
    bodies     the body of an answer on a blocking socket, read into the fill's buffer
    fallback   blob GETs through aiohttp where those sockets cannot go (TLS in TLS)
    streamed   what a fill reads: an answer whose body streams, and a body that broke
    tokens     the Docker registry token protocol: challenges, token fetches and their cache
"""

from mirror.upstream.answers import upstream_error
from mirror.upstream.bodies import SocketBody
from mirror.upstream.client import UpstreamClient
from mirror.upstream.downloader import Answer, Downloader
from mirror.upstream.fallback import Body
from mirror.upstream.redirects import MAX_REDIRECTS
from mirror.upstream.streamed import BodyBroken, Streamed
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
