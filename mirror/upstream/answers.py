"""An upstream's error answer, as the error our client should see.

401 and 403 keep their meaning (a 401 with `insufficient_scope` becomes the caller's 403 in
`mirror.access`); 429 and 503 pass on with `Retry-After`; every other 4xx is the upstream's
answer and passes on with its status and, if it is one of the spec's, its code; a 5xx or
nonsense is an `UpstreamError` (502).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Protocol

from mirror import errors


class Answer(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


# A 4xx without a code the spec knows: the closest code for what was asked.
_REFUSED: dict[type[errors.RegistryError], type[errors.RegistryError]] = {
    errors.ManifestUnknown: errors.ManifestInvalid,
    errors.BlobUnknown: errors.BlobUnknown,
    errors.NameUnknown: errors.NameInvalid,
}


def upstream_error(
    response: Answer,
    upstream: str,
    not_found: type[errors.RegistryError],
    what: str,
    body: bytes | None = None,
) -> errors.RegistryError:
    """Turn an upstream's error answer into the error our client should see."""
    status = response.status_code
    code, message = _error_code(body)
    if status == 429:
        return errors.TooManyRequests(
            f"upstream {upstream} is rate limiting requests for {what}",
            headers=_retry_after(response))
    if status == 404:
        cls = errors.BY_CODE.get(code or "", not_found)
        if cls.status != 404:
            cls = not_found
        return cls(message or f"{what} not found on upstream {upstream}")
    if status == 401:
        # Valid credentials without the right to `what` (what the caller should see as 403).
        scope = "insufficient_scope" in response.headers.get("www-authenticate", "")
        return errors.Unauthorized(f"upstream {upstream} requires authentication for {what}",
                                   detail="insufficient_scope" if scope else None)
    if status == 403:
        return errors.Denied(f"upstream {upstream} denied access to {what}")
    if 400 <= status < 500:
        # The upstream's own answer: passed on with its status, and its code when it is one
        # of the spec's (else the closest the request's kind allows).
        cls = errors.BY_CODE.get(code or "", _REFUSED.get(not_found, errors.Unsupported))
        text = message or f"upstream {upstream} refused {what} ({status})"
        return cls(text).answered(status, code)
    if status == 503:
        return errors.Unavailable(f"upstream {upstream} is unavailable (503) for {what}",
                                  headers=_retry_after(response))
    return errors.UpstreamError(f"upstream {upstream} answered {status} for {what}")


def _retry_after(response: Answer) -> dict[str, str]:
    value = response.headers.get("retry-after")
    return {"Retry-After": value} if value and value.isascii() and value.isprintable() else {}


def _error_code(body: bytes | None) -> tuple[str | None, str | None]:
    if not body:
        return None, None
    try:
        first = json.loads(body)["errors"][0]
        return str(first.get("code")), str(first.get("message") or "") or None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, None
