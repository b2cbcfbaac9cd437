"""Manifest media types, and the Accept sets that choose between them."""

from __future__ import annotations

import json

from mirror.metadata import AcceptKey
from mirror.reference import ALGORITHMS

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, SCHEMA1_SIGNED, SCHEMA1)
# What we ask for when fetching by digest: the bytes are fixed, any type will do.
ACCEPT_ALL = ", ".join((*MANIFEST_TYPES, "*/*"))
MAX_MANIFEST = 4 * 1024 * 1024

# The Accept entries that can change which manifest a tag resolves to. Others are dropped:
# they cannot change the answer, and keying tag records by them would let a client grow the
# index without bound (and anything not a plain media type must not reach upstream headers).
ACCEPT_KEPT = frozenset((*MANIFEST_TYPES, "application/vnd.oci.artifact.manifest.v1+json",
                         "application/json", "application/*", "*/*"))


# The tag cache keeps up to `tag_cache_entries` resolutions per upstream; each entry holds
# its own repository and tag only: Accept sets, media types and digest algorithms are shared
# objects (one tuple per Accept set: at most 2 ** len(ACCEPT_KEPT), bounded by construction).
_SHARED = {text: text for text in (*ACCEPT_KEPT, *ALGORITHMS)}
_ACCEPT_KEYS: dict[frozenset[str], AcceptKey] = {}


def shared(text: str) -> str:
    """The one str object of a known media type or algorithm (others as they are)."""
    return _SHARED.get(text, text)


def accept_key(headers: list[str]) -> AcceptKey:
    """The set of media types a client accepts, normalised (order, params, case dropped).
    Equal sets give the same tuple object, of shared strings."""
    types = {part.split(";")[0].strip().lower() for h in headers for part in h.split(",")}
    kept = frozenset(types & ACCEPT_KEPT)
    key = _ACCEPT_KEYS.get(kept)
    if key is None:
        key = _ACCEPT_KEYS[kept] = tuple(sorted(_SHARED[t] for t in kept))
    return key


def media_type_of(data: bytes, content_type: str | None) -> str:
    """The manifest's media type: the upstream's Content-Type, else the document's own."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if not declared.isascii() or not declared.isprintable():
        declared = ""
    if declared in MANIFEST_TYPES or declared.endswith("+json"):
        return declared
    try:
        value = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        value = None
    if isinstance(value, str) and value and value.isascii() and value.isprintable():
        return value
    return declared or OCI_MANIFEST
