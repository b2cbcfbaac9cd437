"""What a fill reads from an upstream: an answer whose body streams, and the error of a body
that broke on the way (a resume may help)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from mirror import errors
from mirror.upstream.answers import Answer


class Streamed(Answer, Protocol):
    """What a fill reads: an upstream answer with a streamed body (SocketBody, Body,
    httpx.Response)."""

    def aiter_raw(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


class BodyBroken(errors.UpstreamError):
    """The upstream's body ended early or the connection broke (a resume may help)."""
