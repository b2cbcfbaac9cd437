"""The errors a client can see, one class per OCI distribution-spec error code.

Every failure that reaches a client is a `RegistryError`; `routes` turns it into the spec's
error body `{"errors": [{"code", "message", "detail"}]}` with the class's HTTP status. Every
code is one of the spec's (`SPEC_CODES`); what a code cannot say goes in the message.

    RegistryError                                          (UNSUPPORTED 500: a bug)
    ├── BlobUnknown, BlobUploadUnknown, ManifestUnknown, NameUnknown     404
    ├── NotFound (no such endpoint: UNSUPPORTED)                         404
    ├── DigestInvalid, NameInvalid, TagInvalid (MANIFEST_INVALID),
    │   ManifestInvalid, SizeInvalid, RangeInvalid (SIZE_INVALID, 416)  400/416
    ├── Unauthorized 401, Denied 403, Unsupported 405, TooManyRequests 429
    ├── Unavailable                                                      503
    └── UpstreamError                                                    502
        └── UpstreamTimeout                                              504
The last three say that content could not be had now; their code names what was asked
for (a manifest, a blob, a repository), set where the request is answered (`for_kind`).
An upstream's own 4xx answer is passed on with its status and code (`answered`).
"""

from __future__ import annotations

from typing import Any

SPEC_CODES = frozenset((
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
    "TOOMANYREQUESTS"))


class RegistryError(Exception):
    """An error answered to the client as an OCI error body."""

    code: str = "UNSUPPORTED"
    status: int = 500

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

    def answered(self, status: int, code: str | None) -> RegistryError:
        """This error as the upstream answered it: its status, and its code if a spec one."""
        self.status = status
        if code in SPEC_CODES:
            self.code = code
        return self

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

    code, status = "UNSUPPORTED", 404


class DigestInvalid(RegistryError):
    code, status = "DIGEST_INVALID", 400


class NameInvalid(RegistryError):
    code, status = "NAME_INVALID", 400


class TagInvalid(RegistryError):
    """A reference that is no valid tag (the spec has no code of its own for it)."""

    code, status = "MANIFEST_INVALID", 400


class ManifestInvalid(RegistryError):
    code, status = "MANIFEST_INVALID", 400


class SizeInvalid(RegistryError):
    code, status = "SIZE_INVALID", 400


class RangeInvalid(RegistryError):
    """An unsatisfiable Range header: 416 with `Content-Range: bytes */size`."""

    code, status = "SIZE_INVALID", 416


class Unauthorized(RegistryError):
    code, status = "UNAUTHORIZED", 401


class Denied(RegistryError):
    code, status = "DENIED", 403


class Unsupported(RegistryError):
    code, status = "UNSUPPORTED", 405


class TooManyRequests(RegistryError):
    code, status = "TOOMANYREQUESTS", 429


class Unobtainable(RegistryError):
    """Content that cannot be had now; its code names what was asked for (`for_kind`)."""

    code = "NAME_UNKNOWN"

    def for_kind(self, kind: str) -> Unobtainable:
        """`kind`: manifests, blobs or anything else (a repository)."""
        self.code = {"manifests": "MANIFEST_UNKNOWN", "blobs": "BLOB_UNKNOWN"}.get(
            kind, "NAME_UNKNOWN")
        return self


class UpstreamError(Unobtainable):
    """The upstream could not be reached or answered nonsense."""

    status = 502


class UpstreamTimeout(UpstreamError):
    status = 504


class Unavailable(Unobtainable):
    """We cannot answer now (e.g. offline and not cached, or the upstream answered 503)."""

    status = 503


# Codes an upstream may send that we pass on with their own class.
BY_CODE: dict[str, type[RegistryError]] = {
    cls.code: cls
    for cls in (
        BlobUnknown, BlobUploadUnknown, ManifestUnknown, NameUnknown, DigestInvalid,
        NameInvalid, ManifestInvalid, SizeInvalid, Unauthorized, Denied,
        Unsupported, TooManyRequests,
    )
}


class StreamAborted(Exception):
    """Raised inside a response body to cut the client's connection mid-stream.

    Used when bytes already promised by Content-Length turn out wrong or cannot be
    completed: a truncated connection is the only honest signal left at that point.
    """
