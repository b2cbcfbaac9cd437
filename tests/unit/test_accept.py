"""Accept-header normalisation for the tag cache key, and a manifest's media type."""

from __future__ import annotations

import json

import pytest

from mirror import mediatypes
from mirror.manifestbytes import ManifestInfo
from mirror.manifests import (
    ACCEPT_KEPT,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1_SIGNED,
    accept_key,
    media_type_of,
)
from mirror.metadata import TagRecord


def test_accept_key_is_one_shared_tuple_per_set() -> None:
    """The tag cache keeps up to 100,000 keys per upstream: equal Accept sets, however a
    client spells them, are one tuple of the module's own strings, not copies per request."""
    one = accept_key([f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"])
    other = accept_key([f" {DOCKER_MANIFEST.upper()};q=0.9", f"{OCI_MANIFEST}"])
    assert one is other
    assert one[0] is DOCKER_MANIFEST and one[1] is OCI_MANIFEST
    # Junk never reaches the key, so the shared tuples stay bounded by construction.
    for n in range(1000):
        assert accept_key([f"application/x-{n}", "text/plain"]) is accept_key([])
    assert len(mediatypes._ACCEPT_KEYS) <= 2 ** len(ACCEPT_KEPT)


def test_cached_resolutions_share_media_type_and_algorithm() -> None:
    """A resolution read back from the metadata store holds the module's media type and
    algorithm strings (one object each, whatever the cache holds), not the row's copies."""
    row_type = "".join(list(OCI_MANIFEST))  # a string equal to, but not, the constant
    assert row_type is not OCI_MANIFEST
    infos = [ManifestInfo.of(TagRecord("up", "repo", f"t{n}", f"sha256:{n:064x}", row_type,
                                       10, 0.0)) for n in range(2)]
    for info in infos:
        assert info.media_type is OCI_MANIFEST
        assert info.digest.algorithm is infos[0].digest.algorithm
    assert str(infos[1].digest) == f"sha256:{1:064x}"
    odd = "application/vnd.example+json"
    assert ManifestInfo.of(TagRecord("up", "r", "t", f"sha256:{0:064x}", odd, 1, 0.0)) \
        .media_type == odd


# -- accept_key -----------------------------------------------------------------------------


def test_accept_key_sorts_and_dedups() -> None:
    assert accept_key([f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"]) == tuple(
        sorted((OCI_MANIFEST, DOCKER_MANIFEST)))
    assert accept_key([f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"]) == accept_key(
        [f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"])
    assert accept_key([f"{OCI_MANIFEST}, {OCI_MANIFEST}"]) == (OCI_MANIFEST,)


def test_accept_key_drops_params_and_q_values() -> None:
    assert accept_key([f"{OCI_MANIFEST}; q=0.5, {DOCKER_MANIFEST};q=1.0;charset=utf-8"]) == (
        accept_key([f"{OCI_MANIFEST},{DOCKER_MANIFEST}"]))
    assert accept_key([f"{OCI_MANIFEST} ;q=0"]) == (OCI_MANIFEST,)


def test_accept_key_is_case_insensitive() -> None:
    assert accept_key([OCI_MANIFEST.upper()]) == (OCI_MANIFEST,)
    assert accept_key(["Application/Vnd.Oci.Image.Index.V1+JSON"]) == (OCI_INDEX,)


def test_accept_key_merges_several_headers() -> None:
    several = accept_key([OCI_MANIFEST, DOCKER_MANIFEST, f"{OCI_INDEX}, {DOCKER_LIST}"])
    one = accept_key([f"{DOCKER_LIST},{OCI_INDEX},{DOCKER_MANIFEST},{OCI_MANIFEST}"])
    assert several == one
    assert several == tuple(sorted((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST)))
    assert accept_key([OCI_MANIFEST, OCI_MANIFEST.upper(), f" {OCI_MANIFEST} "]) == (
        OCI_MANIFEST,)


@pytest.mark.parametrize("headers", [[], [""], [" "], [",", " , ,"], [";q=1"]])
def test_accept_key_empty(headers: list[str]) -> None:
    assert accept_key(headers) == ()


def test_accept_key_is_hashable_tuple() -> None:
    key = accept_key(["*/*", "application/json"])
    assert key == ("*/*", "application/json")
    cache: dict[tuple[str, ...], int] = {key: 1}
    assert cache[accept_key(["application/json, */*"])] == 1


# -- media_type_of --------------------------------------------------------------------------


def _doc(media_type: str | None = None) -> bytes:
    body: dict[str, object] = {"schemaVersion": 2}
    if media_type is not None:
        body["mediaType"] = media_type
    return json.dumps(body).encode()


def test_manifest_content_type_wins() -> None:
    assert media_type_of(_doc(OCI_INDEX), DOCKER_MANIFEST) == DOCKER_MANIFEST
    assert media_type_of(_doc(), f"{OCI_MANIFEST}; charset=utf-8") == OCI_MANIFEST
    assert media_type_of(_doc(), OCI_INDEX.upper()) == OCI_INDEX


def test_schema1_signed_content_type_is_a_manifest_type() -> None:
    assert media_type_of(_doc(), f"{SCHEMA1_SIGNED}") == SCHEMA1_SIGNED


def test_other_json_content_type_is_kept() -> None:
    custom = "application/vnd.example.thing.v1+json"
    assert media_type_of(_doc(OCI_MANIFEST), custom) == custom


@pytest.mark.parametrize(
    "content_type", [None, "", "application/json", "application/octet-stream", "text/plain"])
def test_document_media_type_when_content_type_is_not_a_manifest(
    content_type: str | None,
) -> None:
    assert media_type_of(_doc(DOCKER_LIST), content_type) == DOCKER_LIST


def test_default_without_any_hint() -> None:
    assert media_type_of(_doc(), None) == OCI_MANIFEST
    assert media_type_of(_doc(), "") == OCI_MANIFEST
    assert media_type_of(b"not json", None) == OCI_MANIFEST
    assert media_type_of(b"[1, 2]", None) == OCI_MANIFEST
    assert media_type_of(b"\xff\xfe\x00", None) == OCI_MANIFEST
    assert media_type_of(json.dumps({"mediaType": 5}).encode(), None) == OCI_MANIFEST
    assert media_type_of(json.dumps({"mediaType": ""}).encode(), None) == OCI_MANIFEST


def test_non_manifest_content_type_is_the_last_resort() -> None:
    assert media_type_of(_doc(), "application/json") == "application/json"


def test_accept_key_keeps_only_what_can_change_the_answer() -> None:
    """Arbitrary types would key a new tag record each: the index must stay bounded."""
    vendor = [f"application/vnd.example.thing{i}+json" for i in range(50)]
    assert accept_key([", ".join(vendor)]) == ()
    assert accept_key([f"{OCI_MANIFEST}, text/html, application/vnd.x+json"]) == (OCI_MANIFEST,)
