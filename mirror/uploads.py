"""Pushes: the upload protocol forwarded to the upstream, with the time and size limits.

Each upload session the upstream opens gets an id of ours (random, unguessable); the
client only ever sees `/v2/<name>/blobs/uploads/<id>`, which maps to that one upstream
session and nothing else, and only for the caller that opened it. Sessions live in a small
diskcache so every worker knows them. Bodies stream through (never whole in memory),
checked as they go (`mirror.upload_bodies`), and are teed into the cache
(`mirror.writethrough`), so the first pull after a push is a hit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import diskcache
import httpx

from mirror import errors
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.store import DISK_FULL, Store
from mirror.upload_bodies import Outgoing, TooLarge, client_body
from mirror.upstream import Credential, UpstreamClient, upstream_error
from mirror.writethrough import WriteThrough

log = logging.getLogger("mirror.uploads")
EXPIRED_KEPT = 3600.0  # how long past its time limit a session's id still explains itself
# Open sessions one worker holds: per caller (a CI pushing many images at once stays far
# below), and in all. Past either, a new upload is refused with 429 until some finish.
MAX_SESSIONS_PER_CALLER = 256
MAX_SESSIONS = 10_000
# A session this far past upload_timeout (capped at upload_timeout itself) is surely dead,
# whichever worker ran it: its write-through file goes and its upstream session is cancelled.
ORPHAN_MARGIN = 60.0
ORPHANS_PER_SWEEP = 100  # upstream cancels a sweep tries at most (the rest: next time)
ORPHAN_CANCEL_TIMEOUT = 10.0
SWEEP_SCAN = 100_000  # records and files one sweep looks at, at most
_DIGITS = r"[0-9]{1,18}"  # ASCII only: str.isdigit() also accepts '²', which int() refuses
_CONTENT_RANGE = re.compile(rf"(?:bytes )?({_DIGITS})-({_DIGITS})(?:/(?:\*|{_DIGITS}))?")
_UPSTREAM_RANGE = re.compile(rf"(?:bytes=)?0-({_DIGITS})")
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


class UploadInvalid(errors.RegistryError):
    code, status = "BLOB_UPLOAD_INVALID", 400


@dataclass(frozen=True)
class Session:
    id: str
    upstream: str
    repo: str
    location: str  # the upstream's absolute URL of this upload
    started: float  # time.time() of the POST
    owner: str = ""  # the identity of the caller that opened it (`mirror.identity`)
    offset: int = 0  # bytes the upstream acknowledged
    expired: bool = False


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


def disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of room (a file's ENOSPC, or SQLite's own word)."""
    if isinstance(exc, sqlite3.OperationalError):
        return "full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


class Uploads:
    def __init__(
        self, directory: Path, store: Store, timeout: float, max_size: int,
        metrics: Metrics | None = None, idle: float = 60.0,
    ) -> None:
        self.metrics = metrics
        self.sessions = diskcache.Cache(str(directory), eviction_policy="none")
        self.store = store
        self.timeout = timeout
        self.max_size = max_size
        self.idle = idle  # how long a client may stay silent mid-body
        self.kept = WriteThrough(store)
        # Sessions this worker serves: their caller's credential (in memory only, to cancel
        # them in time) and owner; and, per owner, how many.
        self._held: dict[str, tuple[Credential, str]] = {}
        self._per_owner: collections.Counter[str] = collections.Counter()
        # Records that could not be written for want of disk: this worker's memory only.
        self._local: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        self.sessions.close()

    @property
    def margin(self) -> float:
        return min(ORPHAN_MARGIN, self.timeout)

    # -- session records -----------------------------------------------------------------

    def _load(self, session_id: str) -> Session | None:
        value = self._local.get(session_id)
        if value is None:
            value = self.sessions.get(session_id)
        if not isinstance(value, dict):
            return None
        try:
            return Session(**value)
        except TypeError:  # a record of another version of ours: unknown
            return None

    def _save(self, session: Session) -> None:
        # Expiry counted from the start: saving again never extends a session's life.
        ends = session.started + self.timeout + EXPIRED_KEPT
        value = dataclasses.asdict(session)
        try:
            self.sessions.set(session.id, value, expire=max(ends - time.time(), 1.0))
        except (OSError, sqlite3.OperationalError) as exc:
            if not disk_full(exc):
                raise
            if session.id not in self._local:
                log.warning("cache disk full: upload %s known to this worker only",
                            session.id)
            self._local[session.id] = value
        else:
            self._local.pop(session.id, None)

    def _drop(self, session_id: str) -> None:
        self._local.pop(session_id, None)
        self._release(session_id)
        try:
            self.sessions.delete(session_id)
        except (OSError, sqlite3.OperationalError) as exc:
            # On a full disk the record just runs out (its upstream session is gone).
            if not disk_full(exc):
                raise

    def _hold(self, session_id: str, credential: Credential, owner: str) -> None:
        if session_id not in self._held:
            self._per_owner[owner] += 1
        self._held[session_id] = (credential, owner)

    def _release(self, session_id: str) -> None:
        held = self._held.pop(session_id, None)
        if held is not None:
            self._per_owner[held[1]] -= 1
            if self._per_owner[held[1]] <= 0:
                del self._per_owner[held[1]]

    # -- sessions ------------------------------------------------------------------------

    async def get(
        self, client: UpstreamClient, session_id: str, repo: str, credential: Credential,
        owner: str,
    ) -> Session:
        """The session behind one of our upload URLs, if it is this repository's, this
        caller's (`owner`: its identity, the same whichever of its tokens it uses), and
        alive."""
        session = self._load(session_id) if _SESSION_ID.fullmatch(session_id) else None
        if (session is None or (session.upstream, session.repo) != (client.name, repo)
                or not secrets.compare_digest(session.owner, owner)):
            raise errors.BlobUploadUnknown("no such upload session")
        if not session.expired:
            self._hold(session.id, credential, owner)  # to cancel it in time
            if time.time() - session.started > self.timeout:
                await self._expire(client, session, credential)
                session = replace(session, expired=True)
        if session.expired:
            raise self._too_late()
        return session

    def _too_late(self) -> UploadInvalid:
        return UploadInvalid(
            f"upload exceeded the time limit of {self.timeout:g} s and was cancelled")

    async def _expire(
        self, client: UpstreamClient, session: Session, credential: Credential | None
    ) -> None:
        self._count("timeout")
        self._release(session.id)
        await self._cancel_upstream(client, session, credential)
        self.kept.discard(session.id)
        self._save(replace(session, expired=True))

    async def _abandon(
        self, client: UpstreamClient, session: Session, credential: Credential
    ) -> None:
        """Cancel a session whose upstream state we no longer know (a body cut short)."""
        await self._cancel_upstream(client, session, credential)
        self.kept.discard(session.id)
        self._drop(session.id)

    async def _cancel_upstream(
        self, client: UpstreamClient, session: Session, credential: Credential | None
    ) -> None:
        with contextlib.suppress(errors.RegistryError):
            response = await client.send("DELETE", session.location, repo=session.repo,
                                         credential=credential, actions="pull,push")
            await response.aclose()

    async def run(self, clients: dict[str, UpstreamClient]) -> None:
        """The background task that keeps the time limit of sessions left idle, and sweeps
        up what dead workers left (at start, then as it ages)."""
        while True:
            try:
                await self.sweep(clients)
            except Exception:  # keep sweeping; one bad session must not stop the loop
                log.exception("upload sweep failed")
            await asyncio.sleep(min(5.0, self.timeout / 4))

    async def sweep(self, clients: dict[str, UpstreamClient]) -> None:
        """Cancel, upstream, the sessions this process served that ran out of time; then
        the sessions and write-through files no live worker will ever finish."""
        now = time.time()
        for session_id, (credential, _) in list(self._held.items()):
            session = self._load(session_id)
            if session is None or session.expired:
                self._release(session_id)
            elif now - session.started > self.timeout:
                if session.upstream in clients:
                    await self._expire(clients[session.upstream], session, credential)
                else:
                    self._release(session_id)
        for session_id, value in list(self._local.items()):
            if now - float(value.get("started", 0)) > self.timeout + EXPIRED_KEPT:
                self._local.pop(session_id, None)
        await self._sweep_orphans(clients)

    async def _sweep_orphans(self, clients: dict[str, UpstreamClient]) -> None:
        """Sessions past their time limit and a margin that no worker holds (it was killed):
        mark them expired (once, across workers) and try to cancel them upstream. Only
        the mirror's own access is left for that (credentials die with their worker); the
        upstream purges abandoned uploads itself if it refuses."""
        dead_after = self.timeout + self.margin
        cancels = 0
        for key in list(itertools.islice(self.sessions.iterkeys(), SWEEP_SCAN)):
            if cancels >= ORPHANS_PER_SWEEP:
                break
            if not isinstance(key, str) or key in self._held:
                continue
            session = self._claim(key, dead_after)
            if session is None:
                continue
            cancels += 1
            log.info("cancelling upload %s to %s left by a dead worker", key, session.repo)
            client = clients.get(session.upstream)
            if client is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ORPHAN_CANCEL_TIMEOUT):
                        await self._cancel_upstream(client, session, None)
            self.kept.discard(session.id)
        try:  # rows past their expiry go (a get would skip them anyway)
            self.sessions.expire()
        except (OSError, sqlite3.OperationalError) as exc:
            if not disk_full(exc):
                raise
        for part in itertools.islice(self.store.tmp.glob("upload-*.part"), SWEEP_SCAN):
            session_id = part.name.removeprefix("upload-").removesuffix(".part")
            if session_id in self._held:
                continue
            session = self._load(session_id)
            try:
                if session is not None and not session.expired:
                    age = time.time() - session.started
                else:  # finished, cancelled or gone: by the file's age (a PUT may hash it)
                    age = time.time() - part.stat().st_mtime
                if age > dead_after:
                    part.unlink()
                    log.info("removed write-through file of dead upload %s", session_id)
            except FileNotFoundError:
                pass

    def _claim(self, session_id: str, dead_after: float) -> Session | None:
        """The session, marked expired, if it is an orphan not yet claimed by any worker."""
        with self.sessions.transact():
            session = self._load(session_id)
            if (session is None or session.expired
                    or time.time() - session.started <= dead_after):
                return None
            self._save(replace(session, expired=True))
            return session

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
        if (self._per_owner[owner] >= MAX_SESSIONS_PER_CALLER
                or len(self._held) >= MAX_SESSIONS):
            raise errors.TooManyRequests(
                "too many uploads open at once; finish or cancel some first",
                headers={"Retry-After": "10"})
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
            self._count("ok")
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
        session = Session(secrets.token_hex(16), client.name, repo, location, started, owner)
        self._save(session)
        self._hold(session.id, credential, owner)
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
        self._drop(session.id)
        self._count("ok")
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
        self._drop(session.id)
        return Forwarded(204)

    # -- limits --------------------------------------------------------------------------

    def _check_declared(self, length: int | None, offset: int) -> None:
        if length is not None and offset + length > self.max_size:
            self._count("too_large")
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
                await self._expire(client, session, credential)
            else:
                self._count("timeout")
            raise self._too_late() from None
        except Exception as exc:
            if body is None or not (body.gone or body.failure):
                if isinstance(exc, errors.UpstreamError):
                    self._count("error")
                raise
            # The client's body broke off: the upstream got a part of it, so its session is
            # in an unknown state. Cancel it; the client starts again.
            if session is not None:
                await self._abandon(client, session, credential)
            if body.gone:
                self._count("error")
                what = f"upload {session.id}" if session else "monolithic upload"
                log.warning("client went away mid-body: %s to %s cancelled", what, repo)
                raise UploadInvalid("client went away mid-upload") from None
            assert body.failure is not None
            self._count("too_large" if isinstance(body.failure, TooLarge) else "error")
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
            await self._abandon(client, session, credential)
            raise
        # The upstream's word, else what we forwarded (an upstream answering nonsense).
        session = replace(session, offset=session.offset + sent if offset is None else offset,
                          location=url)
        self._save(session)
        return session

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.uploads.labels(outcome).inc()


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
