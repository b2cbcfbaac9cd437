"""The errors a client can see, one class per OCI distribution-spec error code.

Every failure that reaches a client is a `RegistryError`; `routes` turns it into the spec's
error body `{"errors": [{"code", "message", "detail"}]}` with the class's HTTP status.

    RegistryError
    ├── BlobUnknown, BlobUploadUnknown, ManifestUnknown, NameUnknown     404
    ├── DigestInvalid, NameInvalid, TagInvalid, ManifestInvalid,
    │   SizeInvalid, RangeInvalid                                        400/416
    ├── Unauthorized 401, Denied 403, Unsupported 405, TooManyRequests 429
    └── UpstreamError                                                     502
        └── UpstreamTimeout                                               504
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegistryError(Exception):
    """An error answered to the client as an OCI error body."""

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}


class BlobUnknown(RegistryError):
    code, status = "BLOB_UNKNOWN", 404


class BlobUploadUnknown(RegistryError):
    code, status = "BLOB_UPLOAD_UNKNOWN", 404


class ManifestUnknown(RegistryError):
    code, status = "MANIFEST_UNKNOWN", 404


class NameUnknown(RegistryError):
    code, status = "NAME_UNKNOWN", 404


class NotFound(RegistryError):
    """A path that is no part of the API."""

    code, status = "NOT_FOUND", 404


class DigestInvalid(RegistryError):
    code, status = "DIGEST_INVALID", 400


class NameInvalid(RegistryError):
    code, status = "NAME_INVALID", 400


class TagInvalid(RegistryError):
    code, status = "TAG_INVALID", 400


class ManifestInvalid(RegistryError):
    code, status = "MANIFEST_INVALID", 400


class SizeInvalid(RegistryError):
    code, status = "SIZE_INVALID", 400


class RangeInvalid(RegistryError):
    """An unsatisfiable Range header: 416 with `Content-Range: bytes */size`."""

    code, status = "RANGE_INVALID", 416


class Unauthorized(RegistryError):
    code, status = "UNAUTHORIZED", 401


class Denied(RegistryError):
    code, status = "DENIED", 403


class Unsupported(RegistryError):
    code, status = "UNSUPPORTED", 405


class TooManyRequests(RegistryError):
    code, status = "TOOMANYREQUESTS", 429


class UpstreamError(RegistryError):
    """The upstream could not be reached or answered nonsense."""

    code, status = "UPSTREAM_ERROR", 502


class UpstreamTimeout(UpstreamError):
    code, status = "UPSTREAM_TIMEOUT", 504


class Unavailable(RegistryError):
    """We cannot answer now (e.g. offline and not cached)."""

    code, status = "UNAVAILABLE", 503


# Codes an upstream may send that we pass on with their own class.
BY_CODE: dict[str, type[RegistryError]] = {
    cls.code: cls
    for cls in (
        BlobUnknown, BlobUploadUnknown, ManifestUnknown, NameUnknown, DigestInvalid,
        NameInvalid, TagInvalid, ManifestInvalid, SizeInvalid, Unauthorized, Denied,
        Unsupported, TooManyRequests,
    )
}


class StreamAborted(Exception):
    """Raised inside a response body to cut the client's connection mid-stream.

    Used when bytes already promised by Content-Length turn out wrong or cannot be
    completed: a truncated connection is the only honest signal left at that point.
    """
