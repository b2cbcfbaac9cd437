"""Who asks: the caller behind a request's Authorization header, and the tokens we mint.

A caller has an *identity* (what access facts are keyed by, never a secret) and, unless
anonymous, a *credential* to reach its upstream with. Identities are MACs under this
installation's secret, and include the upstream, so a credential proven at one upstream is
another identity at every other upstream.

Our token endpoint mints tokens that bind everything to one upstream:

    m1.<payload>.<mac>    payload: base64url JSON {u: upstream, i: identity, n: user name,
                          e: expiry (epoch s), t: the upstream's own token, or b: the
                          client's Basic credentials for an upstream that takes Basic,
                          o: 1 when minted offline}

The MAC (HMAC-SHA256 under the installation secret) covers the payload, so the identity
and the upstream cannot be changed; the upstream token inside is the client's own and is
forwarded to that upstream only. A token minted offline carries no upstream token: its
identity (from the Basic credentials it was minted for) is what offline access checks.

Bearer tokens we did not mint are forwarded only to upstreams in `auth_passthrough` mode
(where clients fetch tokens from the upstream's realm themselves); elsewhere they are
refused with a challenge to log in through our realm.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from mirror import errors
from mirror.upstream import Credential

ANONYMOUS_TOKEN = "anonymous"  # what our token endpoint hands to callers without credentials
ANONYMOUS_IDENTITY = "anonymous"
TOKEN_PREFIX = "m1."
MAX_HEADER = 16 * 1024  # an Authorization header longer than this is refused


@dataclass(frozen=True, slots=True)
class Caller:
    identity: str  # what grants are keyed by: "anonymous", or a MAC (never the secret)
    credential: Credential | None  # how to reach the upstream on its behalf; None: anonymous
    durable: bool = False  # its grants count offline (an identity that outlives one token)
    user: str = ""  # the account name, when the caller logged in through us
    upstream: str | None = None  # the upstream a token of ours is bound to
    offline_only: bool = False  # minted offline: no upstream token to go upstream with

    @property
    def anonymous(self) -> bool:
        return self.credential is None


ANONYMOUS_CALLER = Caller(ANONYMOUS_IDENTITY, None, durable=True)


class Identities:
    """Reads callers from headers and mints tokens, under the installation's secret
    (fetched once from the metadata store, where every worker and replica finds it)."""

    def __init__(self, secret: Callable[[], Awaitable[bytes]],
                 clock: Callable[[], float] = time.time) -> None:
        self._load = secret
        self._secret = b""
        self._time = clock

    async def ready(self) -> Identities:
        if not self._secret:
            self._secret = await self._load()
        return self

    # -- identities ------------------------------------------------------------------------

    def of_basic(self, upstream: str, auth: httpx.BasicAuth) -> str:
        header = auth._auth_header.encode()
        mac = hmac.new(self._secret, upstream.encode() + b"\0" + header, hashlib.sha256)
        return "b:" + mac.hexdigest()[:40]

    def of_token(self, token: str) -> str:
        return "t:" + hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()[:40]

    # -- callers ---------------------------------------------------------------------------

    def caller(self, authorization: str | None, upstream: str) -> Caller:
        """The caller behind an Authorization header, for a request to `upstream`."""
        if not authorization:
            return ANONYMOUS_CALLER
        if len(authorization) > MAX_HEADER:
            raise errors.Unauthorized("authorization header too long")
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            if not value or value == ANONYMOUS_TOKEN:
                return ANONYMOUS_CALLER
            if not (value.isascii() and value.isprintable()):  # it may go upstream in a header
                raise errors.Unauthorized("malformed bearer token")
            if value.startswith(TOKEN_PREFIX):
                return self._minted(value)
            return Caller(self.of_token(value), Credential(bearer=value))
        if scheme.lower() == "basic":
            auth = basic_auth(value)
            return Caller(self.of_basic(upstream, auth), Credential(basic=auth), durable=True,
                          user=auth_user(auth), upstream=None)
        raise errors.Unauthorized(f"unsupported authorization scheme {scheme[:20]!r}")

    def _minted(self, token: str) -> Caller:
        payload_b64, _, mac = token[len(TOKEN_PREFIX):].rpartition(".")
        expected = self._mac(payload_b64)
        if not payload_b64 or not hmac.compare_digest(mac, expected):
            raise errors.Unauthorized("invalid token: log in again")
        try:
            payload = json.loads(_unb64(payload_b64))
            upstream, identity = str(payload["u"]), str(payload["i"])
            user, expiry = str(payload.get("n", "")), float(payload["e"])
            inner, basic, offline = str(payload.get("t", "")), str(payload.get("b", "")), \
                bool(payload.get("o"))
        except (ValueError, KeyError, TypeError):
            raise errors.Unauthorized("invalid token: log in again") from None
        if expiry < self._time():
            raise errors.Unauthorized("token expired: log in again")
        credential = Credential(bearer=inner or None,
                                basic=basic_auth(basic.partition(" ")[2]) if basic else None)
        return Caller(identity, credential, durable=True, user=user, upstream=upstream,
                      offline_only=offline)

    def mint(self, upstream: str, identity: str, user: str, upstream_token: str,
             lifetime: float, *, basic: str = "", offline: bool = False) -> str:
        fields: dict[str, object] = {"u": upstream, "i": identity, "n": user,
                                     "e": int(self._time() + lifetime)}
        if upstream_token:
            fields["t"] = upstream_token
        if basic:
            fields["b"] = basic
        if offline:
            fields["o"] = 1
        payload = json.dumps(fields, separators=(",", ":"))
        payload_b64 = _b64(payload.encode())
        return f"{TOKEN_PREFIX}{payload_b64}.{self._mac(payload_b64)}"

    def _mac(self, payload_b64: str) -> str:
        mac = hmac.new(self._secret, (TOKEN_PREFIX + payload_b64).encode(), hashlib.sha256)
        return _b64(mac.digest())


def basic_auth(encoded: str) -> httpx.BasicAuth:
    """Basic credentials from a header value; any undecodable input is a 401, never a 500."""
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        user, sep, password = "", "", ""
    if not sep or not user:
        raise errors.Unauthorized("malformed Basic credentials")
    if not (user.isprintable() and password.isprintable()):
        raise errors.Unauthorized("malformed Basic credentials")
    return httpx.BasicAuth(user, password)


def auth_user(auth: httpx.BasicAuth) -> str:
    """The user name inside httpx's BasicAuth (it keeps only the encoded header)."""
    encoded = auth._auth_header.partition(" ")[2]
    return base64.b64decode(encoded).decode(errors="replace").partition(":")[0]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
