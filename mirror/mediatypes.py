"""Manifest media types, and the Accept sets that choose between them."""

from __future__ import annotations

import json

from mirror.metadata import AcceptKey

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


def accept_key(headers: list[str]) -> AcceptKey:
    """The set of media types a client accepts, normalised (order, params, case dropped)."""
    types = {part.split(";")[0].strip().lower() for h in headers for part in h.split(",")}
    return tuple(sorted(types & ACCEPT_KEPT))


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
