"""Who may read what. Cached content is shared, so every read is checked first.

A caller reads repository R of an upstream only if R is known readable by anyone (an
anonymous probe succeeded) or the caller's own credential was verified upstream for R; and
reads digest D under R only if R is known to hold D (a manifest of R lists it, or an
upstream HEAD of D under R answered). Decisions are kept in memory for a short TTL, keyed by
a hash of the credential: no credential is ever written anywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

import cachetools
import httpx

from mirror import errors
from mirror.index import Index
from mirror.reference import Digest
from mirror.tokens import ANONYMOUS, Credential

__all__ = ["ANONYMOUS", "Access", "Caller", "caller_of"]
from mirror.upstream import UpstreamClient, upstream_error

# What our token endpoint hands to callers without credentials.
ANONYMOUS_TOKEN = "anonymous"
MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json", "*/*"))


@dataclass(frozen=True, slots=True)
class Caller:
    credential: Credential | None  # None: anonymous
    key: str  # names the credential in decision caches: a hash, never the secret

    @property
    def anonymous(self) -> bool:
        return self.credential is None


ANONYMOUS_CALLER = Caller(None, "anonymous")


def caller_of(authorization: str | None) -> Caller:
    """The caller behind an Authorization header (Bearer token or Basic credentials)."""
    if not authorization:
        return ANONYMOUS_CALLER
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    key = hashlib.sha256(authorization.encode()).hexdigest()
    if scheme.lower() == "bearer":
        if not value or value == ANONYMOUS_TOKEN:
            return ANONYMOUS_CALLER
        if not (value.isascii() and value.isprintable()):  # it goes into our upstream header
            raise errors.Unauthorized("malformed bearer token")
        return Caller(Credential(bearer=value), key)
    if scheme.lower() == "basic":
        return Caller(Credential(basic=basic_auth(value)), key)
    raise errors.Unauthorized(f"unsupported authorization scheme {scheme[:20]!r}")


def basic_auth(encoded: str) -> httpx.BasicAuth:
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        user, sep, password = "", "", ""
    if not sep or not user:
        raise errors.Unauthorized("malformed Basic credentials")
    return httpx.BasicAuth(user, password)


def manifest_children(data: bytes) -> list[str]:
    """Digests a manifest refers to: config, layers, blobs, child manifests."""
    try:
        doc = json.loads(data)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    found = []
    config = doc.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        found.append(config["digest"])
    for key in ("layers", "manifests", "blobs", "fsLayers"):
        for item in doc.get(key) or []:
            if isinstance(item, dict):
                value = item.get("digest") or item.get("blobSum")
                if isinstance(value, str):
                    found.append(value)
    return found


class Access:
    def __init__(self, index: Index, ttl: float = 60.0) -> None:
        self.index = index
        self.ttl = ttl
        self._granted: cachetools.TTLCache[tuple[str, str, str], bool] = cachetools.TTLCache(
            100_000, ttl)
        self._links: cachetools.LRUCache[tuple[str, str, str], bool] = cachetools.LRUCache(
            200_000)

    # -- what R holds --------------------------------------------------------------------

    def linked(self, upstream: str, repo: str, digest: str) -> bool:
        key = (upstream, repo, digest)
        if key in self._links:
            return True
        if self.index.linked(upstream, repo, digest):
            self._links[key] = True
            return True
        return False

    def link(self, upstream: str, repo: str, digests: list[str]) -> None:
        new = [d for d in digests if (upstream, repo, d) not in self._links]
        if new:
            self.index.link(upstream, repo, new)
            for digest in new:
                self._links[(upstream, repo, digest)] = True

    def unlink(self, upstream: str, repo: str, digest: str) -> None:
        self._links.pop((upstream, repo, digest), None)
        self.index.unlink(upstream, repo, digest)

    def link_manifest(self, upstream: str, repo: str, digest: Digest, data: bytes) -> None:
        if (upstream, repo, str(digest)) in self._links:
            return  # its children were linked along with it
        self.link(upstream, repo, [*manifest_children(data), str(digest)])

    # -- who may read R ------------------------------------------------------------------

    def granted(self, client: UpstreamClient, repo: str, caller: Caller) -> bool:
        """Whether `caller` is known (recently) to be allowed to read `repo`."""
        name = client.name
        if (name, repo, caller.key) in self._granted:
            return True
        if client.offline:
            # No one to verify credentials with: serve what the cache holds to anyone, but
            # never what was ever seen private.
            return not self.index.private(name, repo)
        if caller.anonymous:
            if client.upstream.expose_private:
                return True
            if self.index.public(name, repo, self.ttl):  # another worker's probe
                self._granted[(name, repo, caller.key)] = True
                return True
        return False

    def grant(self, client: UpstreamClient, repo: str, caller: Caller) -> None:
        self._granted[(client.name, repo, caller.key)] = True
        if caller.anonymous:
            self.index.set_public(client.name, repo, True)

    def refused(self, client: UpstreamClient, repo: str, caller: Caller,
                exc: errors.RegistryError) -> errors.RegistryError:
        """What the caller sees when the upstream refused its access to `repo`."""
        if isinstance(exc, errors.Unauthorized):
            if caller.anonymous:
                self.index.set_public(client.name, repo, False)
            elif exc.detail == "insufficient_scope":
                return errors.Denied(f"upstream {client.name} denied access to repository {repo}")
            return errors.Unauthorized(
                f"upstream {client.name} requires authentication for repository {repo}")
        return exc

    async def authorize(
        self,
        client: UpstreamClient,
        repo: str,
        caller: Caller,
        probe: str,
        digest: Digest | None = None,
    ) -> None:
        """Return if `caller` may read `repo` (and `digest` in it); raise otherwise.

        `probe` is the upstream path to HEAD when we do not know yet.
        """
        name = client.name
        granted = self.granted(client, repo, caller)
        if granted and (digest is None or client.offline
                        or self.linked(name, repo, str(digest))):
            return
        credential = caller.credential or (None if granted else ANONYMOUS)
        headers = {"Accept": MANIFEST_ACCEPT} if "/manifests/" in probe else {}
        try:
            response = await client.send("HEAD", probe, repo=repo, headers=headers,
                                         credential=credential)
        except (errors.UpstreamError, errors.Unavailable):
            # The upstream is down: content of repositories known public stays served.
            if self.index.public(name, repo) and (
                    digest is None or self.linked(name, repo, str(digest))):
                return
            raise
        if response.status_code == 200:
            self.grant(client, repo, caller)
            if digest is not None:
                self.link(name, repo, [str(digest)])
            return
        not_found = errors.BlobUnknown if "/blobs/" in probe else errors.ManifestUnknown
        what = f"{probe.rsplit('/', 1)[-1]} in {repo}"
        raise self.refused(client, repo, caller, upstream_error(response, name, not_found, what))
