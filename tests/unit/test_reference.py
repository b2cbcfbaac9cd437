"""Repository names, tags and digests (OCI distribution-spec grammar) and the error classes."""

from __future__ import annotations

import pytest

from mirror import errors
from mirror.reference import (
    MAX_NAME,
    Digest,
    check_name,
    check_reference,
    check_tag,
    is_digest,
    parse_digest,
)

HEX64 = "0123456789abcdef" * 4
HEX128 = HEX64 * 2

# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "library/nginx",
        "a/b-c/d__e",
        "a.b/c",
        "nginx",
        "a",
        "a0/b1/c2",
        "a--b/c_d",
        "x" * MAX_NAME,
        "/".join(["ab"] * 85),  # 254 characters, many components
    ],
)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "a//b",
        "/a",
        "a/",
        "-a",
        "a-",
        "a/-b",
        "_a",
        "a___b",
        "a..b",
        "a/../b",
        "a\x00b",
        "%2e%2e",
        "a%2fb",
        "a b",
        "a\n",
        "",
        "a:b",
        "a@b",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(errors.NameInvalid):
        check_name(name)


@pytest.mark.parametrize("name", ["Library/nginx", "library/NGINX", "A"])
def test_uppercase_name_message_says_lowercase(name: str) -> None:
    with pytest.raises(errors.NameInvalid) as info:
        check_name(name)
    assert "lowercase" in info.value.message


def test_name_length_limit() -> None:
    check_name("a" * MAX_NAME)
    with pytest.raises(errors.NameInvalid) as info:
        check_name("a" * (MAX_NAME + 1))
    assert str(MAX_NAME) in info.value.message
    with pytest.raises(errors.NameInvalid):
        check_name("ab/" * 100 + "c")


def test_invalid_name_message_is_bounded() -> None:
    with pytest.raises(errors.NameInvalid) as info:
        check_name("-" * 250)
    assert len(info.value.message) < 300


# -- tags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    ["latest", "1.25.3", "v1_2-3", "_underscore", "A", "UPPER.case", "a" * 128, "0" * 128],
)
def test_valid_tags(tag: str) -> None:
    assert check_tag(tag) == tag


@pytest.mark.parametrize(
    "tag",
    ["a" * 129, ".hidden", "-dash", "", "a/b", "a:b", "a b", "latest\n", "a\x00", "é"],
)
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(errors.TagInvalid):
        check_tag(tag)


# -- digests --------------------------------------------------------------------------------


def test_parse_sha256() -> None:
    digest = parse_digest(f"sha256:{HEX64}")
    assert digest == Digest("sha256", HEX64)
    assert str(digest) == f"sha256:{HEX64}"


def test_parse_sha512() -> None:
    assert parse_digest(f"sha512:{HEX128}") == Digest("sha512", HEX128)


@pytest.mark.parametrize(
    "value",
    [
        f"sha256:{HEX64.upper()}",
        f"sha256:{HEX64[:-1]}",
        f"sha256:{HEX64}0",
        f"sha256:{HEX64[:-1]}g",
        f"sha512:{HEX64}",
        f"md5:{'0' * 32}",
        f"sha1:{'0' * 40}",
        f"SHA256:{HEX64}",
        f"sha256{HEX64}",
        "",
        ":",
        f":{HEX64}",
        "sha256:",
        f"sha256::{HEX64}",
        f"sha256:{HEX64}\n",
        f" sha256:{HEX64}",
    ],
)
def test_invalid_digests(value: str) -> None:
    with pytest.raises(errors.DigestInvalid):
        parse_digest(value)


def test_unknown_algorithm_is_named() -> None:
    with pytest.raises(errors.DigestInvalid) as info:
        parse_digest(f"md5:{'0' * 32}")
    assert "md5" in info.value.message


def test_check_reference_dispatches_on_colon() -> None:
    assert is_digest(f"sha256:{HEX64}")
    assert not is_digest("latest")
    assert check_reference("latest") == "latest"
    assert check_reference(f"sha256:{HEX64}") == Digest("sha256", HEX64)
    with pytest.raises(errors.DigestInvalid):
        check_reference("sha256:short")
    with pytest.raises(errors.TagInvalid):
        check_reference(".bad")


# -- error classes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "code", "status"),
    [
        (errors.NameInvalid, "NAME_INVALID", 400),
        (errors.TagInvalid, "MANIFEST_INVALID", 400),
        (errors.DigestInvalid, "DIGEST_INVALID", 400),
        (errors.ManifestInvalid, "MANIFEST_INVALID", 400),
        (errors.SizeInvalid, "SIZE_INVALID", 400),
        (errors.RangeInvalid, "SIZE_INVALID", 416),
        (errors.BlobUnknown, "BLOB_UNKNOWN", 404),
        (errors.BlobUploadUnknown, "BLOB_UPLOAD_UNKNOWN", 404),
        (errors.ManifestUnknown, "MANIFEST_UNKNOWN", 404),
        (errors.NameUnknown, "NAME_UNKNOWN", 404),
        (errors.Unauthorized, "UNAUTHORIZED", 401),
        (errors.Denied, "DENIED", 403),
        (errors.Unsupported, "UNSUPPORTED", 405),
        (errors.TooManyRequests, "TOOMANYREQUESTS", 429),
        (errors.UpstreamError, "NAME_UNKNOWN", 502),
        (errors.UpstreamTimeout, "NAME_UNKNOWN", 504),
        (errors.Unavailable, "NAME_UNKNOWN", 503),
    ],
)
def test_error_codes_and_statuses(
    cls: type[errors.RegistryError], code: str, status: int
) -> None:
    assert cls.code == code
    assert cls.status == status
    error = cls("something went wrong")
    assert isinstance(error, errors.RegistryError)
    assert error.body() == {"errors": [{"code": code, "message": "something went wrong"}]}
    assert error.headers == {}
    assert str(error) == "something went wrong"


def test_every_code_is_the_specs() -> None:
    def subclasses(cls: type[errors.RegistryError]) -> list[type[errors.RegistryError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    for cls in subclasses(errors.RegistryError):
        assert cls.code in errors.SPEC_CODES, cls
    for kind, code in (("manifests", "MANIFEST_UNKNOWN"), ("blobs", "BLOB_UNKNOWN"),
                       ("tags", "NAME_UNKNOWN")):
        assert errors.UpstreamError("x").for_kind(kind).code == code
    passed = errors.ManifestInvalid("x").answered(400, "MANIFEST_INVALID")
    assert (passed.status, passed.code) == (400, "MANIFEST_INVALID")
    assert errors.Unsupported("x").answered(409, "NOT_A_SPEC_CODE").code == "UNSUPPORTED"


def test_error_body_with_detail_and_headers() -> None:
    error = errors.NameInvalid("bad", detail={"name": "X"}, headers={"X-A": "1"})
    assert error.body() == {
        "errors": [{"code": "NAME_INVALID", "message": "bad", "detail": {"name": "X"}}]
    }
    assert error.headers == {"X-A": "1"}


def test_upstream_timeout_is_an_upstream_error() -> None:
    assert issubclass(errors.UpstreamTimeout, errors.UpstreamError)


def test_by_code_maps_codes_to_classes() -> None:
    for code, cls in errors.BY_CODE.items():
        assert cls.code == code
    assert errors.BY_CODE["BLOB_UNKNOWN"] is errors.BlobUnknown
    assert "UPSTREAM_ERROR" not in errors.BY_CODE  # never taken from an upstream's word


def test_raised_errors_carry_codes() -> None:
    with pytest.raises(errors.RegistryError) as info:
        check_name("Bad")
    assert info.value.body()["errors"][0]["code"] == "NAME_INVALID"
    assert info.value.status == 400
