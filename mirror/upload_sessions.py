"""Upload session records: kept in the metadata store, so that every worker and every replica
sharing it can continue a session, bound to the caller that opened it, capped per caller and
per worker, expiring with a time limit counted from the POST, and swept up once a dead
process left them behind.

A session's id is ours (random, unguessable) and maps to one upstream session. What a
session needs beyond its record stays in the memory of the processes serving it: the
caller's credential (never written anywhere), used to cancel the session upstream in time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mirror import errors
from mirror.evict import lock_owner
from mirror.metadata import Metadata, MetadataError
from mirror.metrics import Metrics
from mirror.upstream import Credential, UpstreamClient
from mirror.writethrough import WriteThrough

log = logging.getLogger("mirror.uploads")
EXPIRED_KEPT = 3600.0  # how long past its time limit a session's id still explains itself
# Open sessions one worker holds: per caller (a CI pushing many images at once stays far
# below), and in all. Past either, a new upload is refused with 429 until some finish.
MAX_SESSIONS_PER_CALLER = 256
MAX_SESSIONS = 10_000
# A session this far past upload_timeout (capped at upload_timeout itself) is surely dead,
# whichever process ran it: its write-through file goes and its upstream session is cancelled.
ORPHAN_MARGIN = 60.0
ORPHANS_PER_SWEEP = 100  # upstream cancels a sweep tries at most (the rest: next time)
ORPHAN_CANCEL_TIMEOUT = 10.0
SWEEP_SCAN = 100_000  # records and files one sweep looks at, at most
# Held only while an orphan is marked expired (a read and a write), then released; long
# enough to outlast a write waiting on another process's transaction.
CLAIM_LEASE = 120.0
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


def new_id() -> str:
    return secrets.token_hex(16)


def _parse(value: Mapping[str, Any] | None) -> Session | None:
    if value is None:
        return None
    try:
        return Session(**value)
    except TypeError:  # a record of another version of ours: unknown
        return None


class Sessions:
    def __init__(self, metadata: Metadata, kept: WriteThrough, timeout: float,
                 metrics: Metrics | None = None) -> None:
        self.metadata = metadata
        self.kept = kept
        self.timeout = timeout
        self.metrics = metrics
        self.lock_owner = lock_owner()  # this process, for claims of orphans
        # Sessions this worker serves: their caller's credential (in memory only, to cancel
        # them in time) and owner; and, per owner, how many.
        self._held: dict[str, tuple[Credential, str]] = {}
        self._per_owner: collections.Counter[str] = collections.Counter()
        # Records the metadata store did not keep (a full disk, the store unreachable):
        # this worker's memory only.
        self._local: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        """Forget what this worker held in memory (credentials among it); the records stay
        for the other processes and the sweeps."""
        self._held.clear()
        self._per_owner.clear()
        self._local.clear()

    @property
    def margin(self) -> float:
        return min(ORPHAN_MARGIN, self.timeout)

    # -- records ---------------------------------------------------------------------------

    async def load(self, session_id: str) -> Session | None:
        value = self._local.get(session_id)
        if value is None:
            value = await self.metadata.get_upload(session_id)
        return _parse(value)

    async def save(self, session: Session) -> None:
        # Expiry counted from the start: saving again never extends a session's life.
        expires = session.started + self.timeout + EXPIRED_KEPT
        value = dataclasses.asdict(session)
        why = "cache disk full"  # what makes SQLite skip a write, without an error
        try:
            await self.metadata.put_upload(session.id, value, expires)
            stored = await self.metadata.get_upload(session.id)  # so read it back
        except MetadataError as exc:
            why, stored = f"metadata store failed ({exc})", None
        if stored == value:
            self._local.pop(session.id, None)
            return
        if session.id not in self._local:
            log.warning("%s: upload %s known to this worker only", why, session.id)
        self._local[session.id] = value

    async def drop(self, session_id: str) -> None:
        self._local.pop(session_id, None)
        self.release(session_id)
        try:
            await self.metadata.drop_upload(session_id)
        except MetadataError as exc:  # its upstream session is gone: the record runs out
            log.warning("upload %s not forgotten: %s", session_id, exc)

    def admit(self, owner: str) -> None:
        """Refuse a new session (429) past this worker's caps."""
        if (self._per_owner[owner] >= MAX_SESSIONS_PER_CALLER
                or len(self._held) >= MAX_SESSIONS):
            raise errors.TooManyRequests(
                "too many uploads open at once; finish or cancel some first",
                headers={"Retry-After": "10"})

    def hold(self, session_id: str, credential: Credential, owner: str) -> None:
        if session_id not in self._held:
            self._per_owner[owner] += 1
        self._held[session_id] = (credential, owner)

    def release(self, session_id: str) -> None:
        held = self._held.pop(session_id, None)
        if held is not None:
            self._per_owner[held[1]] -= 1
            if self._per_owner[held[1]] <= 0:
                del self._per_owner[held[1]]

    # -- a session's life ------------------------------------------------------------------

    async def get(
        self, client: UpstreamClient, session_id: str, repo: str, credential: Credential,
        owner: str,
    ) -> Session:
        """The session behind one of our upload URLs, if it is this repository's, this
        caller's (`owner`: its identity, the same whichever of its tokens it uses), and
        alive."""
        session = await self.load(session_id) if _SESSION_ID.fullmatch(session_id) else None
        if (session is None or (session.upstream, session.repo) != (client.name, repo)
                or not secrets.compare_digest(session.owner, owner)):
            raise errors.BlobUploadUnknown("no such upload session")
        if not session.expired:
            self.hold(session.id, credential, owner)  # to cancel it in time
            if time.time() - session.started > self.timeout:
                await self.expire(client, session, credential)
                session = replace(session, expired=True)
        if session.expired:
            raise self.too_late()
        return session

    def too_late(self) -> UploadInvalid:
        return UploadInvalid(
            f"upload exceeded the time limit of {self.timeout:g} s and was cancelled")

    async def expire(
        self, client: UpstreamClient, session: Session, credential: Credential | None
    ) -> None:
        """Cancel a session past its time limit; its id keeps explaining why for a while."""
        self.count("timeout")
        self.release(session.id)
        await self.cancel_upstream(client, session, credential)
        self.kept.discard(session.id)
        await self.save(replace(session, expired=True))

    async def abandon(
        self, client: UpstreamClient, session: Session, credential: Credential
    ) -> None:
        """Cancel a session whose upstream state we no longer know (a body cut short)."""
        await self.cancel_upstream(client, session, credential)
        self.kept.discard(session.id)
        await self.drop(session.id)

    async def cancel_upstream(
        self, client: UpstreamClient, session: Session, credential: Credential | None
    ) -> None:
        with contextlib.suppress(errors.RegistryError):
            response = await client.send("DELETE", session.location, repo=session.repo,
                                         credential=credential, actions="pull,push")
            await response.aclose()

    def count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.uploads.labels(outcome).inc()

    # -- sweeps ----------------------------------------------------------------------------

    async def run(self, clients: dict[str, UpstreamClient]) -> None:
        """The background task that keeps the time limit of sessions left idle, and sweeps
        up what dead processes left (at start, then as it ages)."""
        while True:
            try:
                await self.sweep(clients)
            except MetadataError as exc:  # the store is down: try again next time
                log.warning("upload sweep failed: %s", exc)
            except Exception:  # keep sweeping; one bad session must not stop the loop
                log.exception("upload sweep failed")
            await asyncio.sleep(min(5.0, self.timeout / 4))

    async def sweep(self, clients: dict[str, UpstreamClient]) -> None:
        """Cancel, upstream, the sessions this process served that ran out of time; then
        the sessions and write-through files no live process will ever finish."""
        now = time.time()
        for session_id, (credential, _) in list(self._held.items()):
            session = await self.load(session_id)
            if session is None or session.expired:
                self.release(session_id)
            elif now - session.started > self.timeout:
                if session.upstream in clients:
                    await self.expire(clients[session.upstream], session, credential)
                else:
                    self.release(session_id)
        for session_id, value in list(self._local.items()):
            if now - float(value.get("started", 0)) > self.timeout + EXPIRED_KEPT:
                self._local.pop(session_id, None)
        await self._sweep_orphans(clients)
        await self._sweep_files()

    def _dead(self, session: Session | None) -> bool:
        """Whether the session is past its time limit and the margin, yet not expired: no
        live process holds it (each expires those it holds in time)."""
        return (session is not None and not session.expired
                and time.time() - session.started > self.timeout + self.margin)

    async def _sweep_orphans(self, clients: dict[str, UpstreamClient]) -> None:
        """Sessions a dead process left: mark them expired (once, across processes) and
        try to cancel them upstream. Only the mirror's own access is left for that
        (credentials die with their process); the upstream purges abandoned uploads itself
        if it refuses."""
        cancels = scanned = 0
        async for session_id, value in self.metadata.iter_uploads():
            scanned += 1
            if scanned > SWEEP_SCAN or cancels >= ORPHANS_PER_SWEEP:
                break
            if session_id in self._held or not self._dead(_parse(value)):
                continue
            session = await self._claim(session_id)
            if session is None:
                continue
            cancels += 1
            log.info("cancelling upload %s to %s left by a dead worker", session_id,
                     session.repo)
            client = clients.get(session.upstream)
            if client is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ORPHAN_CANCEL_TIMEOUT):
                        await self.cancel_upstream(client, session, None)
            self.kept.discard(session.id)

    async def _claim(self, session_id: str) -> Session | None:
        """The session, marked expired, if it is an orphan that no process claimed yet."""
        name = f"upload-orphan:{session_id}"
        if not await self.metadata.acquire(name, self.lock_owner, CLAIM_LEASE):
            return None  # another process is claiming it right now
        try:
            # Read again under the lock: a claim that came first marked it expired.
            session = await self.load(session_id)
            if session is None or not self._dead(session):
                return None
            await self.save(replace(session, expired=True))
            return session
        finally:
            await self.metadata.release(name, self.lock_owner)

    async def _sweep_files(self) -> None:
        """Write-through files of sessions no live process will finish."""
        dead_after = self.timeout + self.margin
        for session_id, part in self.kept.partials(SWEEP_SCAN):
            if session_id in self._held:
                continue
            ours = _SESSION_ID.fullmatch(session_id)
            session = await self.load(session_id) if ours else None
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
