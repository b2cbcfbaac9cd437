"""How connections to an upstream are made, from one place, for every client: httpx
(metadata), the blocking sockets blob bodies are read from (`open_socket`), and aiohttp (blob
bodies through the proxies those sockets do not speak):

- timeouts: connect and read, per upstream or the global ones;
- proxies: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` from the environment (in
  either case, as curl and Docker read them), decided for each request's URL, so a redirect
  to a CDN goes through the proxy or not by the CDN's own host;
- TLS: the system's CAs, plus the upstream's `ca_file`; a client certificate (`client_cert`,
  `client_key`) is presented to the upstream's own origin only, never to a redirect target.
"""

from __future__ import annotations

import base64
import importlib
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import httpx

from mirror.upstream.redirects import origin

LIMIT = 200  # connections per upstream and HTTP client
KEEPALIVE = 50


def tls_context(ca_file: str | None = None, client_cert: str | None = None,
                client_key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if client_cert:
        context.load_cert_chain(client_cert, client_key or None)
    return context


@dataclass
class Transport:
    url: str  # the upstream's base URL: its origin gets `upstream_tls`
    connect: float
    read: float
    proxies: Mapping[str, str] = field(default_factory=dict)
    upstream_tls: ssl.SSLContext = field(default_factory=tls_context)
    other_tls: ssl.SSLContext = field(default_factory=tls_context)

    @classmethod
    def for_upstream(cls, url: str, connect: float, read: float, *, ca_file: str | None,
                     client_cert: str | None, client_key: str | None,
                     environ: Mapping[str, str] | None = None) -> Transport:
        proxies = (urllib.request.getproxies_environment() if environ is None
                   else _proxies(environ))
        return cls(url, connect, read, proxies,
                   tls_context(ca_file, client_cert, client_key), tls_context(ca_file))

    def proxy_for(self, url: str) -> str | None:
        parts = urlsplit(url)
        if _bypass(parts.hostname or "", parts.port, self.proxies.get("no", "")):
            return None
        return self.proxies.get(parts.scheme) or self.proxies.get("all") or None

    def tls_for(self, url: str) -> ssl.SSLContext:
        return self.upstream_tls if origin(url) == origin(self.url) else self.other_tls

    # -- blocking connections (a fill's own socket) -----------------------------------------

    def can_open(self, url: str) -> bool:
        """Whether `open_socket` can reach `url`: directly, or through an http:// proxy (or an
        https:// one for a plain-http URL: TLS in TLS is left to aiohttp)."""
        proxy = self.proxy_for(url)
        if proxy is None:
            return True
        scheme = urlsplit(proxy).scheme
        return scheme == "http" or (scheme == "https" and url.startswith("http://"))

    def open_socket(self, url: str, watch: Watch | None = None,
                    until: float | None = None) -> Connected:
        """A blocking socket ready for a request to `url` (see `can_open`): connected
        within the connect timeout, through the proxy the URL needs (CONNECT for https, the
        absolute URL for http), TLS-wrapped with the context its origin gets; reads then time
        out after the read timeout. `watch` is given each socket before it connects (so that
        another thread can cut it); no step waits past `until` (a `time.monotonic()`).
        Raises OSError (ssl.SSLError, TimeoutError) or ProxyRefused."""
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host, port = parts.hostname or "", parts.port or (443 if https else 80)
        proxy = self.proxy_for(url)
        headers: dict[str, str] = {}
        if proxy is None:
            sock = _connect(host, port, budget(self.connect, until), watch)
        else:
            via = urlsplit(proxy)
            sock = _connect(via.hostname or "", via.port or (443 if via.scheme == "https" else 80),
                            budget(self.connect, until), watch)
            if via.username is not None:
                pair = f"{unquote(via.username)}:{unquote(via.password or '')}"
                headers["Proxy-Authorization"] = \
                    "Basic " + base64.b64encode(pair.encode()).decode()
            if via.scheme == "https":
                sock = _wrap(self.other_tls, sock, via.hostname, budget(self.connect, until))
            if not https:  # the proxy forwards the request: it carries the absolute URL
                sock.settimeout(self.read)
                return Connected(sock, True, headers)
            try:
                sock.settimeout(budget(self.read, until))
                _tunnel(sock, f"{bracket(host)}:{port}", headers, until)
            except BaseException:
                sock.close()
                raise
            headers = {}
        if https:
            sock = _wrap(self.tls_for(url), sock, host, budget(self.connect, until))
        sock.settimeout(self.read)
        return Connected(sock, False, headers)

    # -- the two clients -------------------------------------------------------------------

    def httpx_client(self) -> httpx.AsyncClient:
        timeout = httpx.Timeout(connect=self.connect, read=self.read, write=self.read,
                                pool=self.connect)
        return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                                 transport=_Routing(self))

    def aiohttp_session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect,
                                        sock_read=self.read)
        return aiohttp.ClientSession(
            auto_decompress=False, timeout=timeout, trust_env=False,
            connector=aiohttp.TCPConnector(limit=LIMIT, ttl_dns_cache=60))

    def aiohttp_options(self, url: str) -> dict[str, Any]:
        """Per request: where to connect through, and how to check the server."""
        if url.startswith("https://"):
            return {"proxy": self.proxy_for(url), "ssl": self.tls_for(url)}
        return {"proxy": self.proxy_for(url)}


@dataclass
class Connected:
    """A socket from `Transport.open_socket`: requests on it name the absolute URL when it leads
    to a forward proxy (`absolute`), and carry `headers` (the proxy's credentials)."""

    sock: socket.socket
    absolute: bool
    headers: dict[str, str]


class ProxyRefused(OSError):
    """A forward proxy would not open a tunnel to the upstream."""


# Called with each socket `open_socket` makes, before it connects; raises OSError to give up.
Watch = Callable[[socket.socket], None]


def budget(limit: float, until: float | None) -> float:
    """A blocking step's timeout: `limit`, or less so as to end by `until`."""
    if until is None:
        return limit
    left = until - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request's deadline passed")
    return min(limit, left)


def _connect(host: str, port: int, timeout: float, watch: Watch | None) -> socket.socket:
    """`socket.create_connection`, each socket shown to `watch` before it connects."""
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0,
                                                               socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            if watch is not None:
                watch(sock)
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}")


def _wrap(context: ssl.SSLContext, sock: socket.socket, host: str | None,
          timeout: float) -> ssl.SSLSocket:
    """`sock` with TLS over it, the handshake done within `timeout` (closed on failure)."""
    try:
        sock.settimeout(timeout)
        return context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def _tunnel(sock: socket.socket, target: str, headers: Mapping[str, str],
            until: float | None = None) -> None:
    """CONNECT through the proxy at the other end of `sock` to `target` (host:port)."""
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    answer = b""
    while b"\r\n\r\n" not in answer:  # the proxy sends nothing past its answer's head
        sock.settimeout(budget(sock.gettimeout() or 60.0, until))  # a trickle ends by it too
        data = sock.recv(4096)
        if not data or len(answer) > 65536:
            raise ProxyRefused(f"the proxy closed the tunnel to {target}")
        answer += data
    status = answer.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"200":
        line = answer.split(b"\r\n", 1)[0].decode("latin-1")[:200]
        raise ProxyRefused(f"the proxy refused a tunnel to {target}: {line}")


def bracket(host: str) -> str:
    """`host` as a URL or a Host header names it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


class _Routing(httpx.AsyncBaseTransport):
    """httpx transports chosen per request: through the proxy the URL needs (or none), with
    the TLS context its origin gets."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._inner: dict[tuple[str | None, bool], httpx.AsyncHTTPTransport] = {}
        # Made now, not on the first request: it imports httpcore, and that anyio's asyncio
        # backend, which took that request 60-90 ms (the first pull after a start).
        self._for(transport.url)
        importlib.import_module("anyio._backends._asyncio")

    def _for(self, url: str) -> httpx.AsyncHTTPTransport:
        proxy = self.transport.proxy_for(url)
        key = (proxy, origin(url) == origin(self.transport.url))
        inner = self._inner.get(key)
        if inner is None:
            inner = self._inner[key] = httpx.AsyncHTTPTransport(
                proxy=proxy, verify=self.transport.tls_for(url),
                limits=httpx.Limits(max_connections=LIMIT, max_keepalive_connections=KEEPALIVE))
        return inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._for(str(request.url)).handle_async_request(request)

    async def aclose(self) -> None:
        for inner in self._inner.values():
            await inner.aclose()


def _bypass(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether NO_PROXY exempts `host`: `*`, the host itself, or a domain it is under
    (`example.com` and `.example.com` both cover `a.example.com`), optionally with a port."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.strip("[]").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def _proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """`urllib.request.getproxies_environment`, over a given environment (tests)."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        lower = name.lower()
        if value and lower.endswith("_proxy"):
            found[lower[:-6]] = value
    for name, value in environ.items():  # the lowercase form wins, as in urllib
        if value and name.endswith("_proxy") and name.islower():
            found[name[:-6]] = value
    return found
