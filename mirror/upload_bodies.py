"""Push request bodies as they stream: checked against their declared length and the size
limits, cut off when the client goes silent or away, and teed into write-through.

Nothing is held whole in memory but a manifest, which may not pass 4 MiB.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect

from mirror import errors
from mirror.writethrough import Tee

MAX_MANIFEST = 4 * 1024 * 1024


class TooLarge(errors.SizeInvalid):
    status = 413


class ManifestTooLarge(errors.ManifestInvalid):
    status = 413


class ClientGone(Exception):
    """The client dropped its connection mid-body: there is no one left to answer."""


async def client_body(
    stream: AsyncIterator[bytes], declared: int | None, idle: float,
    stalled: type[errors.RegistryError],
) -> AsyncIterator[bytes]:
    """A client's request body as it arrives, checked against its declared length.

    A client silent for `idle` seconds mid-body gets `stalled` (400); a body longer or
    shorter than its Content-Length, SIZE_INVALID; a client that hangs up, `ClientGone`.
    """
    received = 0
    chunks = aiter(stream)
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except TimeoutError:
            of = f" of {declared}" if declared is not None else ""
            raise stalled(f"client sent nothing for {idle:g} s mid-body "
                          f"(after {received}{of} bytes)") from None
        except ClientDisconnect:
            raise ClientGone() from None
        received += len(chunk)
        if declared is not None and received > declared:
            raise errors.SizeInvalid(
                f"body longer than its Content-Length of {declared} bytes")
        if chunk:
            yield chunk
    if declared is not None and received < declared:
        raise errors.SizeInvalid(
            f"body of {received} bytes shorter than its Content-Length of {declared}")


class Outgoing:
    """A client's body on its way upstream: limited, teed, and why it stopped, if it did.

    httpx may wrap what the body raised; `failure` and `gone` say what happened whatever
    reaches the caller.
    """

    def __init__(self, chunks: AsyncIterator[bytes], offset: int, limit: int,
                 tee: Tee | None) -> None:
        self.chunks, self.offset, self.limit, self.tee = chunks, offset, limit, tee
        self.sent = 0
        self.failure: errors.RegistryError | None = None
        self.gone = False

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.chunks:
                if self.offset + self.sent + len(chunk) > self.limit:
                    raise TooLarge(f"layer larger than the limit of {self.limit} bytes")
                self.sent += len(chunk)
                if self.tee is not None:
                    await self.tee.write(chunk)
                yield chunk
            if self.tee is not None:
                await self.tee.flush()
        except ClientGone:
            self.gone = True
            raise
        except errors.RegistryError as exc:
            self.failure = exc
            raise


async def read_manifest(body: AsyncIterator[bytes], declared: int | None,
                        idle: float) -> bytes:
    """A pushed manifest, refused past 4 MiB without reading further."""
    if declared is not None and declared > MAX_MANIFEST:
        raise ManifestTooLarge("manifest larger than 4 MiB")
    data = bytearray()
    async for chunk in client_body(body, declared, idle, errors.ManifestInvalid):
        data += chunk
        if len(data) > MAX_MANIFEST:
            raise ManifestTooLarge("manifest larger than 4 MiB")
    return bytes(data)
