"""Pushes: the blob upload protocol forwarded to the upstream with the client's own
credentials, within the time and size limits.

`POST` opens an upstream session (or uploads monolithically, or mounts), `PATCH` forwards a
chunk, `PUT` closes it, `GET` asks where it is, `DELETE` cancels it. The client only ever sees
`/v2/<name>/blobs/uploads/<id>`, an id of ours whose record (`mirror.upload_sessions`) any
process sharing the metadata can continue. Bodies stream through, checked as they go
(`mirror.upload_bodies`), and are teed into the cache (`mirror.writethrough`), so the first
pull after a push is a hit.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from urllib.parse import urljoin, urlsplit

import httpx

from mirror import errors
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.store import Store
from mirror.upload_bodies import Outgoing, TooLarge, client_body
from mirror.upload_sessions import Session, Sessions, UploadInvalid, new_id
from mirror.upstream import Credential, UpstreamClient, upstream_error
from mirror.writethrough import WriteThrough

log = logging.getLogger("mirror.uploads")
_DIGITS = r"[0-9]{1,18}"  # ASCII only: str.isdigit() also accepts '²', which int() refuses
_CONTENT_RANGE = re.compile(rf"(?:bytes )?({_DIGITS})-({_DIGITS})(?:/(?:\*|{_DIGITS}))?")
_UPSTREAM_RANGE = re.compile(rf"(?:bytes=)?0-({_DIGITS})")


@dataclass(frozen=True)
class Forwarded:
    """What to answer the client: status and headers (Location already ours)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def parse_content_range(value: str) -> tuple[int, int]:
    """A PATCH's `Content-Range: <start>-<end>` (inclusive), or 416 RANGE_INVALID."""
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if not match or int(match.group(2)) < int(match.group(1)):
        raise errors.RangeInvalid(f"malformed Content-Range {value[:40]!r}: "
                                  "expected <start>-<end>")
    return int(match.group(1)), int(match.group(2))


def _upstream_offset(value: str | None) -> int | None:
    """The next byte of an upload, from the upstream's `Range: 0-<last>`, if well-formed."""
    match = _UPSTREAM_RANGE.fullmatch((value or "").strip())
    return int(match.group(1)) + 1 if match else None


def _range(offset: int) -> str:
    return f"0-{max(offset - 1, 0)}"


class Uploads:
    def __init__(
        self, store: Store, timeout: float, max_size: int, metrics: Metrics | None = None,
        idle: float = 60.0,
    ) -> None:
        self.timeout = timeout
        self.max_size = max_size
        self.idle = idle  # how long a client may stay silent mid-body
        self.kept = WriteThrough(store)
        self.sessions = Sessions(store.metadata, self.kept, timeout, metrics)

    def close(self) -> None:
        self.sessions.close()

    async def get(
        self, client: UpstreamClient, session_id: str, repo: str, credential: Credential,
        owner: str,
    ) -> Session:
        """The live session behind one of our upload URLs, for its own caller only."""
        return await self.sessions.get(client, session_id, repo, credential, owner)

    async def run(self, clients: dict[str, UpstreamClient]) -> None:
        """The background task of time limits and sweeps (`Sessions.run`)."""
        await self.sessions.run(clients)

    def _ours(self, session: Session, name: str) -> dict[str, str]:
        return {"Location": f"/v2/{name}/blobs/uploads/{session.id}",
                "Docker-Upload-UUID": session.id}

    def _deadline(self, session: Session) -> float:
        """The session's deadline on the event loop's clock."""
        remaining = session.started + self.timeout - time.time()
        return asyncio.get_running_loop().time() + max(remaining, 0.0)

    # -- the protocol ----------------------------------------------------------------------

    async def start(
        self, client: UpstreamClient, repo: str, name: str, credential: Credential,
        owner: str, params: dict[str, str], body: AsyncIterator[bytes], length: int | None,
    ) -> Forwarded:
        """POST: open a session (or a monolithic upload with `digest`, or a mount) for the
        caller whose identity is `owner`.

        `params`: `digest`, `mount` and `from`, already checked. `length` None: chunked.
        """
        self._check_declared(length, 0)
        self.sessions.admit(owner)
        started = time.time()
        path = f"/v2/{repo}/blobs/uploads/"
        outgoing = None
        if "digest" in params and length != 0:
            outgoing = Outgoing(client_body(body, length, self.idle, UploadInvalid), 0,
                                self.max_size, None)
        response = await self._send(
            client, "POST", path, repo, credential, params=params, body=outgoing,
            length=length, deadline=asyncio.get_running_loop().time() + self.timeout)
        if response.status_code == 201:
            self.sessions.count("ok")
            digest = _digest_header(response) or params.get("digest") or params.get("mount")
            if digest is None:
                raise errors.UpstreamError(f"upstream {client.name} accepted a blob for "
                                           f"{repo} without saying which")
            return Forwarded(201, {"Location": f"/v2/{name}/blobs/{digest}",
                                   "Docker-Content-Digest": digest})
        if response.status_code != 202:
            raise upstream_error(response, client.name, errors.NameUnknown,
                                 f"upload to {repo}", response.content)
        location = _on_origin(client, urljoin(client.upstream.url + path,
                                              response.headers.get("location", "")))
        session = Session(new_id(), client.name, repo, location, started, owner)
        await self.sessions.save(session)
        self.sessions.hold(session.id, credential, owner)
        return Forwarded(202, {**self._ours(session, name), "Range": "0-0",
                               "Content-Length": "0"})

    async def patch(
        self, client: UpstreamClient, session: Session, name: str, credential: Credential,
        body: AsyncIterator[bytes], length: int | None, content_range: str | None,
    ) -> Forwarded:
        start = session.offset
        headers = {}
        if content_range is not None:
            first, last = parse_content_range(content_range)
            if first != session.offset:
                raise errors.RangeInvalid(
                    f"chunk starts at byte {first}; the upload is at byte {session.offset}",
                    headers={**self._ours(session, name), "Range": _range(session.offset)})
            if length is not None and length != last - first + 1:
                raise errors.SizeInvalid("Content-Length does not match Content-Range")
            length = last - first + 1
            headers["Content-Range"] = f"{first}-{last}"
        self._check_declared(length, start)
        outgoing = Outgoing(client_body(body, length, self.idle, UploadInvalid), start,
                            self.max_size, self.kept.tee(session.id, start))
        response = await self._send(
            client, "PATCH", session.location, session.repo, credential,
            body=outgoing, length=length, deadline=self._deadline(session),
            headers=headers, session=session)
        if response.status_code != 202:
            raise upstream_error(response, client.name, errors.BlobUploadUnknown,
                                 f"upload to {session.repo}", response.content)
        session = await self._advance(client, session, credential, response, outgoing.sent)
        return Forwarded(202, {**self._ours(session, name), "Range": _range(session.offset),
                               "Content-Length": "0"})

    async def finish(
        self, client: UpstreamClient, session: Session, name: str, credential: Credential,
        digest: Digest, body: AsyncIterator[bytes], length: int | None,
    ) -> Forwarded:
        self._check_declared(length, session.offset)
        url = str(httpx.URL(session.location).copy_merge_params({"digest": str(digest)}))
        outgoing = None
        if length != 0:  # a last chunk (None: chunked)
            outgoing = Outgoing(client_body(body, length, self.idle, UploadInvalid),
                                session.offset, self.max_size,
                                self.kept.tee(session.id, session.offset))
        response = await self._send(
            client, "PUT", url, session.repo, credential, body=outgoing,
            length=length, deadline=self._deadline(session), session=session)
        if response.status_code != 201:
            self.kept.discard(session.id)
            raise upstream_error(response, client.name, errors.BlobUploadUnknown,
                                 f"upload to {session.repo}", response.content)
        await self.sessions.drop(session.id)
        self.sessions.count("ok")
        await self.kept.keep(session.id, digest, client.name)
        return Forwarded(201, {"Location": f"/v2/{name}/blobs/{digest}",
                               "Docker-Content-Digest": str(digest), "Content-Length": "0"})

    async def status(
        self, client: UpstreamClient, session: Session, name: str, credential: Credential
    ) -> Forwarded:
        response = await client.send("GET", session.location, repo=session.repo,
                                     credential=credential, actions="pull,push")
        if response.status_code not in (200, 204):
            raise upstream_error(response, client.name, errors.BlobUploadUnknown,
                                 f"upload to {session.repo}", response.content)
        offset = _upstream_offset(response.headers.get("range"))
        return Forwarded(204, {**self._ours(session, name),
                               "Range": _range(session.offset if offset is None else offset)})

    async def cancel(
        self, client: UpstreamClient, session: Session, credential: Credential
    ) -> Forwarded:
        """DELETE by the client: forgotten here once the upstream agrees (or never knew)."""
        response = await client.send("DELETE", session.location, repo=session.repo,
                                     credential=credential, actions="pull,push")
        if response.status_code not in (200, 202, 204, 404):
            raise upstream_error(response, client.name, errors.BlobUploadUnknown,
                                 f"upload to {session.repo}", response.content)
        self.kept.discard(session.id)
        await self.sessions.drop(session.id)
        return Forwarded(204)

    # -- limits --------------------------------------------------------------------------

    def _check_declared(self, length: int | None, offset: int) -> None:
        if length is not None and offset + length > self.max_size:
            self.sessions.count("too_large")
            raise TooLarge(f"layer larger than the limit of {self.max_size} bytes")

    async def _send(
        self, client: UpstreamClient, method: str, url: str, repo: str,
        credential: Credential, *, deadline: float, params: dict[str, str] | None = None,
        body: Outgoing | None = None, length: int | None = None,
        headers: dict[str, str] | None = None, session: Session | None = None,
    ) -> httpx.Response:
        # A mount reads the source repository too.
        extra = f"repository:{params['from']}:pull" if params and "from" in params else ""
        request_headers = dict(headers or {})
        if body is not None:
            request_headers["Content-Type"] = "application/octet-stream"
            if length is not None:
                request_headers["Content-Length"] = str(length)
        try:
            async with asyncio.timeout_at(deadline):
                return await client.send(
                    method, url, repo=repo, params=params, headers=request_headers,
                    credential=credential, actions="pull,push",
                    content=body.stream() if body is not None else None, extra_scope=extra)
        except TimeoutError:
            if session is not None:
                await self.sessions.expire(client, session, credential)
            else:
                self.sessions.count("timeout")
            raise self.sessions.too_late() from None
        except Exception as exc:
            if body is None or not (body.gone or body.failure):
                if isinstance(exc, errors.UpstreamError):
                    self.sessions.count("error")
                raise
            # The client's body broke off: the upstream got a part of it, so its session is
            # in an unknown state. Cancel it; the client starts again.
            if session is not None:
                await self.sessions.abandon(client, session, credential)
            if body.gone:
                self.sessions.count("error")
                what = f"upload {session.id}" if session else "monolithic upload"
                log.warning("client went away mid-body: %s to %s cancelled", what, repo)
                raise UploadInvalid("client went away mid-upload") from None
            assert body.failure is not None
            self.sessions.count("too_large" if isinstance(body.failure, TooLarge) else "error")
            raise body.failure from None

    async def _advance(
        self, client: UpstreamClient, session: Session, credential: Credential,
        response: httpx.Response, sent: int,
    ) -> Session:
        """The session after a PATCH the upstream accepted: where it is, and its URL."""
        offset = _upstream_offset(response.headers.get("range"))
        location = response.headers.get("location")
        try:
            url = _on_origin(client, urljoin(session.location, location)) if location \
                else session.location
        except errors.UpstreamError:
            await self.sessions.abandon(client, session, credential)
            raise
        # The upstream's word, else what we forwarded (an upstream answering nonsense).
        session = replace(session, offset=session.offset + sent if offset is None else offset,
                          location=url)
        await self.sessions.save(session)
        return session


def _on_origin(client: UpstreamClient, url: str) -> str:
    """`url` if it is on the upstream's own origin (an upload URL elsewhere is refused)."""
    if urlsplit(url)[:2] != urlsplit(client.upstream.url)[:2]:
        raise errors.UpstreamError(
            f"upstream {client.name} pointed an upload at another host")
    return url


def _digest_header(response: httpx.Response) -> str | None:
    try:
        return str(parse_digest(response.headers.get("docker-content-digest", "")))
    except errors.DigestInvalid:
        return None


