"""Replicas on one object store and one metadata store: one upstream download per blob for
the whole cluster, every client streaming from the first byte.

A replica that starts a fill claims it in the metadata store: lock `fill:<digest>`, owned by
`<its address>|<a random id>|<the upstream it downloads from>`, with a lease its heartbeat
renews while the fill runs.
Clients of other replicas stream the fill in progress from the owner, over the internal
route `/_mirror/fills/<digest>` (`mirror.routes_internal`), authenticated by a MAC under the
installation secret that every replica reads from the metadata store: no setting is needed
beyond `storage` and `redis_url`. The owner holds back a blob's last byte until it verified
and committed the blob, and a follower checks the digest of a whole blob itself before it
passes the last byte on: a wrong byte never reaches a client. If the owner dies, its lease
expires and the next request claims the fill anew; a client following it sees a cut
connection, and its retry succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from mirror.errors import StreamAborted, UpstreamError
from mirror.metadata import Metadata
from mirror.readers import Part, Reader
from mirror.reference import Digest

log = logging.getLogger("mirror.cluster")

PEER_HEADER = "X-Mirror-Peer"
SIZE_HEADER = "X-Mirror-Size"
MAC_LIFETIME = 60.0  # seconds an internal request's MAC is good for
ROUTE = "/_mirror/fills/"


def advertised(listen_host: str, listen_port: int, redis_url: str, tls: bool) -> str:
    """The base URL other replicas reach this one at: the listen address, or (listening on
    every address) the local address this host reaches the metadata store from."""
    host = listen_host
    if host in ("", "0.0.0.0", "::"):
        target = urlsplit(redis_url).hostname or "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((target, 9))  # no packet is sent: this only picks a route
                host = probe.getsockname()[0]
            except OSError:
                host = socket.gethostbyname(socket.gethostname())
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{listen_port}"


@dataclass(frozen=True, slots=True)
class Holder:
    """Another replica running a fill: where to reach it, and the upstream it downloads
    from ("" when its claim does not say: a replica of an older version)."""

    address: str
    upstream: str


class Claim:
    """This replica's claim on a fill, renewed by a heartbeat until released."""

    def __init__(self, metadata: Metadata, name: str, owner: str, lease: float) -> None:
        self.metadata = metadata
        self.name = name
        self.owner = owner
        self.lease = lease
        self._beat = asyncio.create_task(self._heartbeat(), name=f"claim {name}")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                if not await self.metadata.acquire(self.name, self.owner, self.lease):
                    log.warning("lost the claim on %s to another replica", self.name)
                    return
            except Exception as exc:  # the metadata store blinked: try again next beat
                log.warning("could not renew the claim on %s: %r", self.name, exc)

    async def release(self) -> None:
        self._beat.cancel()
        with contextlib.suppress(BaseException):
            await self._beat
        with contextlib.suppress(Exception):
            await self.metadata.release(self.name, self.owner)


class Cluster:
    def __init__(self, metadata: Metadata, address: str, lease: float,
                 secret: Callable[[], Awaitable[bytes]]) -> None:
        self.metadata = metadata
        self.address = address  # our base URL, as other replicas reach us
        self.lease = lease
        self._secret_source = secret
        self._secret = b""
        self._session: aiohttp.ClientSession | None = None

    async def _key(self) -> bytes:
        if not self._secret:
            self._secret = await self._secret_source()
        return self._secret

    # -- claims ----------------------------------------------------------------------------

    async def claim(self, digest: Digest, upstream: str = "") -> Claim | Holder:
        """Our claim on filling `digest` from `upstream`, or the replica that has it."""
        name = f"fill:{digest}"
        owner = f"{self.address}|{secrets.token_hex(8)}|{upstream}"
        for _ in range(3):
            if await self.metadata.acquire(name, owner, self.lease):
                return Claim(self.metadata, name, owner, self.lease)
            holder = await self.metadata.holder(name)
            if holder is not None:
                address, _, rest = holder.partition("|")
                return Holder(address, rest.partition("|")[2])
        raise UpstreamError(f"could not claim or find the download of {digest}")

    # -- authentication between replicas ---------------------------------------------------

    async def sign(self, digest: Digest) -> str:
        expires = int(time.time() + MAC_LIFETIME)
        mac = hmac.new(await self._key(), f"fill:{digest}:{expires}".encode(), hashlib.sha256)
        return f"{expires}:{mac.hexdigest()}"

    async def verify(self, digest: Digest, header: str | None) -> bool:
        expires, _, mac = (header or "").partition(":")
        if not expires.isascii() or not expires.isdigit() or int(expires) < time.time():
            return False
        expected = hmac.new(await self._key(), f"fill:{digest}:{expires}".encode(),
                            hashlib.sha256).hexdigest()
        return hmac.compare_digest(mac, expected)

    # -- following another replica's fill --------------------------------------------------

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False, trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120),
                connector=aiohttp.TCPConnector(limit=100, ssl=False))
        return self._session

    async def follow(self, owner: str, digest: Digest) -> PeerReader:
        reader = PeerReader(self, owner, digest)
        await reader.start(0, None)
        return reader

    async def request(self, owner: str, digest: Digest, start: int,
                      end: int | None) -> aiohttp.ClientResponse:
        headers = {PEER_HEADER: await self.sign(digest), "Accept-Encoding": "identity"}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            response = await self._open().get(f"{owner}{ROUTE}{digest}", headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"the replica fetching {digest} ({owner}) cannot be reached: "
                                f"{exc!r}") from exc
        if response.status not in (200, 206):
            response.release()
            raise UpstreamError(f"the replica fetching {digest} ({owner}) answered "
                                f"{response.status}")
        return response

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class PeerReader(Reader):
    """Streams a fill running on another replica. A whole read is hashed as it goes, and
    its last byte held back until the digest matches."""

    source = "upstream"

    def __init__(self, cluster: Cluster, owner: str, digest: Digest) -> None:
        super().__init__(-1, None)
        self.cluster = cluster
        self.owner = owner
        self.digest = digest
        self._response: aiohttp.ClientResponse | None = None
        self._span: tuple[int, int | None] = (0, None)

    async def start(self, start: int, end: int | None) -> None:
        self._response = await self.cluster.request(self.owner, self.digest, start, end)
        self._span = (start, end)
        size = self._response.headers.get(SIZE_HEADER, "")
        self.size = int(size) if size.isascii() and size.isdigit() else None

    def close(self) -> None:
        if self._response is not None:
            self._response.release()
            self._response = None

    async def parts(self, start: int, end: int | None) -> AsyncGenerator[Part, None]:
        try:
            if self._response is None or self._span != (start, end):
                self.close()
                await self.start(start, end)
            assert self._response is not None
            whole = start == 0 and (end is None or end == self.size)
            hasher = hashlib.new(self.digest.algorithm) if whole else None
            held: bytes = b""
            received = 0
            async for chunk in self._response.content.iter_any():
                received += len(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                    if held:
                        yield held
                    held = chunk  # the newest piece waits: it may hold the last byte
                else:
                    yield chunk
            if hasher is not None:
                if self.size is not None and received != self.size:
                    raise StreamAborted(f"replica sent {received} of {self.size} bytes")
                if hasher.hexdigest() != self.digest.hex:
                    raise StreamAborted(f"replica sent bytes that do not match {self.digest}")
                if held:
                    yield held
        except (aiohttp.ClientError, TimeoutError, UpstreamError) as exc:
            raise StreamAborted(f"the replica fetching {self.digest} went away: {exc!r}") \
                from None
        finally:
            self.close()
