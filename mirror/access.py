"""Authorization: who may read what from the cache. Every cached read asks this module.

Cached content is shared by every caller of every upstream, so a read is served from the
cache only when these rules allow it (U an upstream, R one of its repositories, D a digest,
C the caller; facts live in the metadata store, shared by every worker and replica):

1. Content belongs to the upstream that delivered it. U *holds* D once U itself sent D's
   bytes and they verified (a fill or manifest fetch from U), or U accepted them from a
   push through us, or an operator imported them under U's name. A read through U of a
   digest U does not hold is fetched from U and verified, never served from another
   upstream's bytes: nothing an upstream says unlocks another upstream's content.
2. D is *linked* to R when U showed that R holds D: U resolved one of R's tags to D, or
   answered a request for D under R with a 200 (a HEAD with the caller's credential
   decides when in doubt), or D is a descriptor that a manifest of R which U holds defines
   and registries validate on push: the config and layers of an image manifest (not
   foreign layers, which carry `urls`), the manifests of an index. Unknown fields, `subject`,
   artifact `blobs` and foreign layers link nothing, nor does a document without a
   `mediaType` of its own that has fields of two kinds; a push links nothing.
3. C may read R when U answered C's own credential with a 200 for R within `access_ttl`
   (a *grant*). An anonymous caller's grant rests on an anonymous probe: no credential at
   all, not even the mirror's own account (unless the upstream sets `expose_private`: then
   anonymous callers act as that account, by the operator's choice). A grant is never
   inferred from a 404, from a cached answer (positive or negative), or from another
   caller's grant; a 401 or 403 for C revokes C's grant: at once in the worker that saw
   it, and within `access_recheck` (1 s) in the others, which act on grants, links and
   holdings they read that recently (never on a grant past its time, never on an absence).
4. C may read D under R when C may read R (3) and D is linked to R (2); the bytes come from
   the cache only when U holds D (1). When C may read R but D is not linked, or C has no
   grant, an upstream HEAD of D under R with C's credential decides.
5. Offline, and while U cannot be reached (connection errors, timeouts, 5xx; not a 429,
   which a caller can bring on itself), a grant of any age counts, for the caller it was
   made for: content fetched with credentials
   stays private to the callers who proved access before. Rules 1, 2 and 4 hold
   unchanged. Identities are MACs of credentials (`mirror.identity`), never credentials.
6. Credentials are bound to one upstream: a token we minted names its upstream and is
   used there only; tokens we did not mint are forwarded only to `auth_passthrough`
   upstreams; a client's password goes only to upstreams that take client credentials
   (`client_credentials`: by default the default upstream alone), and only to the realm
   that upstream's own origin named; a token minted offline is refused online.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeAlias

import cachetools

from mirror import errors
from mirror.flight import SingleFlight
from mirror.identity import Caller
from mirror.metadata import Grant, Metadata
from mirror.reference import Digest
from mirror.upstream import ANONYMOUS, Credential, UpstreamClient, upstream_error

MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json", "*/*"))
INDEX_TYPES = frozenset(("application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"))
IMAGE_TYPES = frozenset(("application/vnd.oci.image.manifest.v1+json",
                         "application/vnd.docker.distribution.manifest.v2+json"))
SCHEMA1_TYPES = frozenset(("application/vnd.docker.distribution.manifest.v1+json",
                           "application/vnd.docker.distribution.manifest.v1+prettyjws"))
FOREIGN_LAYERS = frozenset((
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"))
# The fields that name descriptors, by kind of manifest (index, image, schema 1).
KINDS = (("manifests",), ("config", "layers"), ("fsLayers",))
# Failures that mean "the upstream cannot answer now", as opposed to an answer. A 429 is
# not one for access: rate limits are often per account, so a caller could bring one on
# for its own credential to have its old grants count again.
OUTAGE = (errors.UpstreamError, errors.Unavailable)
# What a worker read lately (rule 3): by key, when the read began and the grant it found.
Memo: TypeAlias = "cachetools.LRUCache[tuple[str, ...], tuple[float, Grant]]"


@dataclass(frozen=True, slots=True)
class Decision:
    """A read is allowed; `cached`: its bytes may come from the cache (else from U)."""

    cached: bool
    size: int | None = None  # the length the upstream announced, when it was asked


def linked_descriptors(data: bytes, media_type: str) -> list[str]:
    """The digests a manifest links to its repository (rule 2): those registries validate."""
    try:
        doc = json.loads(data)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared and declared != media_type:
        return []  # a document that contradicts its own type: link nothing
    if not declared and sum(any(key in doc for key in keys) for keys in KINDS) > 1:
        # Fields of two kinds and no type of its own: which of them a registry validated
        # depends on the type it was pushed as, and the type we keep per digest may be
        # another upstream's (or pusher's) word. Link nothing.
        return []
    if media_type in INDEX_TYPES:
        return _digests(doc.get("manifests"), "digest")
    if media_type in IMAGE_TYPES:
        config = doc.get("config")
        layers = [d for d in _items(doc.get("layers"))
                  if not d.get("urls") and d.get("mediaType") not in FOREIGN_LAYERS]
        return _digests([config], "digest") + _digests(layers, "digest")
    if media_type in SCHEMA1_TYPES:
        return _digests(doc.get("fsLayers"), "blobSum")
    return []


def _items(value: object) -> list[dict[str, object]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) \
        else []


def _digests(value: object, key: str) -> list[str]:
    return [d for d in (item.get(key) for item in _items(value)) if isinstance(d, str)]


class Access:
    def __init__(self, metadata: Metadata, ttl: float = 60.0,
                 clock: Callable[[], float] = time.time, memo: int = 100_000,
                 recheck: float = 1.0,
                 holds: Callable[[str, Digest], Awaitable[bool]] | None = None) -> None:
        self.metadata = metadata
        # Whether an upstream holds content: the store's answer (which rebuilds the fact from
        # the object store when the metadata store lost it), or the metadata's alone.
        self._holds = holds or (lambda upstream, digest: metadata.holds(upstream,
                                                                          str(digest)))
        self.ttl = ttl
        self.clock = clock
        # Links already written by this process: spares a write per read, decides nothing.
        self._written: cachetools.LRUCache[tuple[str, str, str], bool] = cachetools.LRUCache(
            memo)
        # Concurrent probes of one digest with one credential share one upstream HEAD.
        self._probes = SingleFlight()
        # Facts that allowed a read, as read within `recheck` seconds (rule 3): grants by
        # (U, R, C), and grants of C under which D linked to R was held, by (U, R, C, D).
        # A hit costs no metadata read; a grant's age is judged on every use. A fact's
        # time runs from when its read began, and a read begun before something was taken
        # back here (`_forget`, counted by `_epoch`) is not kept.
        self.recheck = recheck
        self._grants: Memo = cachetools.LRUCache(memo)  # (`_recall` judges the age)
        self._readable: Memo = cachetools.LRUCache(memo)
        self._epoch = 0

    # -- credentials (rule 6) --------------------------------------------------------------

    def check_binding(self, client: UpstreamClient, caller: Caller) -> None:
        """Refuse a credential that is not for `client`'s upstream."""
        if caller.upstream is not None and caller.upstream != client.name:
            raise errors.Unauthorized(
                f"this token is for upstream {caller.upstream}; log in for {client.name}")
        if (caller.credential is not None and caller.credential.basic is not None
                and caller.upstream is None and not client.client_credentials):
            raise errors.Unauthorized(
                f"upstream {client.name} does not take client credentials through this mirror")
        if caller.offline_only and not client.offline:
            raise errors.Unauthorized("this token was issued offline; log in again")
        if (caller.identity.startswith("t:") and caller.upstream is None
                and not client.upstream.auth_passthrough):
            raise errors.Unauthorized(
                f"token not issued by this mirror; log in for upstream {client.name}")

    def probe_credential(self, client: UpstreamClient, caller: Caller) -> Credential | None:
        """What to show the upstream to prove the caller's access (rule 3)."""
        if caller.credential is not None:
            return caller.credential
        return None if client.upstream.expose_private else ANONYMOUS

    # -- grants (rule 3, 5) ----------------------------------------------------------------

    async def granted(self, client: UpstreamClient, repo: str, caller: Caller,
                      lasting: bool = False) -> bool:
        """Whether C may read R now; `lasting`: a grant of any age counts (rule 5)."""
        key = (client.name, repo, caller.identity)
        if self._counts(client, self._recall(self._grants, key), lasting):
            return True
        since = self._since()
        grant = await self.metadata.granted(*key)
        self._keep(self._grants, key, grant, since)
        return self._counts(client, grant, lasting)

    def _counts(self, client: UpstreamClient, grant: Grant | None,
                lasting: bool = False) -> bool:
        if grant is None:
            return False
        if client.offline or lasting:
            return True
        return self.clock() - grant.at < self.ttl

    def proof(self, client: UpstreamClient, repo: str, caller: Caller) -> Proof:
        """C's access to R, for a tag resolution to check and record while it holds the
        lock that keeps other workers from asking the upstream for C at the same time."""
        return Proof(self, client, repo, caller)

    async def proven(self, client: UpstreamClient, repo: str, caller: Caller) -> None:
        """The upstream answered the caller's own credential with a 200 for `repo`."""
        grant = Grant(client.name, repo, caller.identity, self.clock(), caller.durable)
        since = self._since()
        await self.metadata.grant(grant)
        self._keep(self._grants, (client.name, repo, caller.identity), grant, since)

    async def refused(self, client: UpstreamClient, repo: str, caller: Caller,
                      exc: errors.RegistryError) -> errors.RegistryError:
        """What the caller sees when the upstream refused it; a refusal revokes its grant."""
        if isinstance(exc, errors.Unauthorized | errors.Denied):
            self._forget()
            try:
                await self.metadata.revoke(client.name, repo, caller.identity)
            finally:
                self._forget()  # and what was read while the store took it
        if isinstance(exc, errors.Unauthorized):
            if not caller.anonymous and exc.detail == "insufficient_scope":
                return errors.Denied(f"upstream {client.name} denied access to repository "
                                     f"{repo}")
            return errors.Unauthorized(
                f"upstream {client.name} requires authentication for repository {repo}")
        return exc

    def unproven(self, client: UpstreamClient, repo: str, caller: Caller) -> errors.RegistryError:
        """No grant and no upstream to ask (offline). One answer whether the content is not
        cached or not known readable by this caller: it tells nothing about either."""
        return errors.Unavailable(
            f"offline mode: {repo} of upstream {client.name} is not available from the cache "
            "to this caller (not cached, or not proven readable before)")

    # -- links (rule 2) --------------------------------------------------------------------

    async def link(self, client: UpstreamClient, repo: str, digests: list[str]) -> None:
        new = [d for d in digests if (client.name, repo, d) not in self._written]
        if new:
            await self.metadata.link(client.name, repo, new)
            for digest in new:
                self._written[(client.name, repo, digest)] = True

    async def link_manifest(self, client: UpstreamClient, repo: str, digest: Digest,
                            data: bytes, media_type: str) -> None:
        """A manifest of `repo` that the upstream holds: link what it validly names."""
        key = (client.name, repo, "manifest:" + str(digest))
        if key in self._written:
            return
        await self.link(client, repo, [str(digest), *linked_descriptors(data, media_type)])
        self._written[key] = True

    def _forget(self) -> None:
        """A grant or a link was taken back here: nothing read before it allows a read,
        nor does what a read begun before it finds (the store may have answered first)."""
        self._epoch += 1
        self._grants.clear()
        self._readable.clear()

    def _since(self) -> tuple[int, float]:
        """When a read of access facts begins: for `_keep`."""
        return self._epoch, time.monotonic()

    def _keep(self, memo: Memo, key: tuple[str, ...], grant: Grant | None,
              since: tuple[int, float]) -> None:
        """Keep what a read begun at `since` found, unless something was taken back here
        since it began. A grant found missing is no longer kept from an earlier read."""
        epoch, began = since
        if grant is None:
            memo.pop(key, None)
        elif self.recheck > 0 and epoch == self._epoch:
            memo[key] = (began, grant)

    def _recall(self, memo: Memo, key: tuple[str, ...]) -> Grant | None:
        """A grant kept from a read begun within `recheck` seconds."""
        kept = memo.get(key)
        if kept is None or time.monotonic() - kept[0] >= self.recheck:
            return None
        return kept[1]

    async def unlink(self, client: UpstreamClient, repo: str, digest: str) -> None:
        self._forget()
        self._written.pop((client.name, repo, digest), None)
        self._written.pop((client.name, repo, "manifest:" + digest), None)
        try:
            await self.metadata.unlink(client.name, repo, digest)
        finally:
            self._forget()  # and what was read while the store took it

    # -- content (rule 1) ------------------------------------------------------------------

    async def holds(self, client: UpstreamClient, digest: Digest) -> bool:
        return await self._holds(client.name, digest)

    # -- decisions (rule 4) ----------------------------------------------------------------

    async def authorize_digest(self, client: UpstreamClient, repo: str, caller: Caller,
                               digest: Digest, kind: str) -> Decision:
        """Return how `caller` may read `digest` under `repo` (a `kind` of "manifests" or
        "blobs"); raise the error it should see otherwise."""
        self.check_binding(client, caller)
        name, text = client.name, str(digest)
        key = (name, repo, caller.identity, text)
        if self._counts(client, self._recall(self._readable, key)):
            return Decision(True)
        since = self._since()
        grant, linked, held = await self.metadata.readable(name, repo, caller.identity, text)
        self._keep(self._grants, key[:3], grant, since)
        if linked and held and self._counts(client, grant):
            self._keep(self._readable, key, grant, since)
        if self._counts(client, grant) and linked:
            # (the store looks further than the metadata only when the metadata says no)
            return Decision(held or await self._holds(name, digest))
        if client.offline:
            raise self.unproven(client, repo, caller)
        credential = self.probe_credential(client, caller)
        size = await self._probes.do(
            (name, repo, kind, text, caller.identity, credential),
            lambda: self._probe(client, repo, caller, digest, kind, credential))
        return Decision(await self._holds(name, digest), size)

    async def _probe(self, client: UpstreamClient, repo: str, caller: Caller, digest: Digest,
                     kind: str, credential: Credential | None) -> int | None:
        """Ask the upstream with the caller's credential whether R holds D (a HEAD): raise
        what the caller should see if not, else record the proof and return the length the
        upstream announced."""
        name, text = client.name, str(digest)
        headers = {"Accept": MANIFEST_ACCEPT} if kind == "manifests" else {}
        try:
            response = await client.send("HEAD", f"/v2/{repo}/{kind}/{digest}", repo=repo,
                                         headers=headers, credential=credential)
            if response.status_code != 200:
                not_found = errors.BlobUnknown if kind == "blobs" else errors.ManifestUnknown
                raise upstream_error(response, name, not_found, f"{digest} in {repo}")
        except OUTAGE:
            if (await self.granted(client, repo, caller, lasting=True)
                    and await self.metadata.linked(name, repo, text)):
                return None
            raise
        except errors.RegistryError as exc:
            raise await self.refused(client, repo, caller, exc) from None
        await self.proven(client, repo, caller)
        await self.link(client, repo, [text])
        length = response.headers.get("content-length", "")
        return int(length) if length.isascii() and length.isdigit() else None


@dataclass(frozen=True, slots=True)
class Proof:
    """`Access.proof`: whether C's access to R counts now, and recording that it was proven."""

    access: Access
    client: UpstreamClient
    repo: str
    caller: Caller

    async def held(self) -> bool:
        return await self.access.granted(self.client, self.repo, self.caller)

    async def record(self) -> None:
        await self.access.proven(self.client, self.repo, self.caller)
