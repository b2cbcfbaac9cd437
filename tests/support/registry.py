"""A real upstream registry (distribution 2.8 `docker-registry`) and a Docker token issuer."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .procs import Proc, clean_env, free_port, wait_http

if TYPE_CHECKING:
    from .images import ImageInfo

USERS = {"alice": "alicepw", "bob": "bobpw"}
ALL_ACTIONS = ("pull", "push", "delete")
ANY = object()


def granted_actions(account: str | None, repo: str) -> set[str]:
    """The test policy: alice may do anything; bob anything in `bob/`, pull+push elsewhere
    outside `private/`; anonymous pull outside `private/`."""
    private = repo.startswith("private/")
    if account == "alice":
        return set(ALL_ACTIONS)
    if account == "bob":
        if repo.startswith("bob/"):
            return set(ALL_ACTIONS)
        return set() if private else {"pull", "push"}
    return set() if private else {"pull"}


class TokenRequest(NamedTuple):
    method: str
    account: str | None  # None for anonymous
    scopes: list[str]
    service: str | None = None


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """`repository:name:pull,push` -> (type, name, actions); also `repository(plugin):...`."""
    try:
        rtype, rest = scope.split(":", 1)
        name, actions = rest.rsplit(":", 1)
    except ValueError:
        return None
    return rtype.split("(", 1)[0], name, [a for a in actions.split(",") if a]


class TokenIssuer:
    """Docker registry token server (GET /token and OAuth2 POST /token) in a daemon thread."""

    def __init__(
        self,
        cert_dir: Path,
        *,
        issuer: str = "mirror-test-issuer",
        users: dict[str, str] | None = None,
        ttl: int = 300,
    ) -> None:
        self.issuer = issuer
        self.users = dict(USERS if users is None else users)
        self.ttl = ttl
        self.requests: list[TokenRequest] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.realm = f"{self.url}/token"
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._cert = _self_signed_cert(self._key, issuer)
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        cert_dir.mkdir(parents=True, exist_ok=True)
        self.cert_path = cert_dir / "token-issuer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def start(self) -> TokenIssuer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="token-issuer")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authenticate(self, username: str | None, password: str | None) -> bool:
        return username is None or self.users.get(username) == password

    def issue(self, account: str | None, service: str, scopes: list[str]) -> dict[str, Any]:
        """Sign a token for `account` (None = anonymous) granting what the policy allows."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, wanted = parsed
            if rtype == "repository":
                actions = [a for a in wanted if a in granted_actions(account, name)]
            elif rtype == "registry" and account == "alice":
                actions = wanted
            else:
                actions = []
            if actions:
                access.append({"type": rtype, "name": name, "actions": actions})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": service,
            "exp": now + self.ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": [self._x5c]})
        issued_at = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"token": token, "access_token": token, "expires_in": self.ttl,
                "issued_at": issued_at}

    def count(self, account: object = ANY, scope_contains: str = "") -> int:
        """Number of token requests (optionally only for `account` (None = anonymous) and with a
        scope containing `scope_contains`)."""
        return sum(
            1 for r in self.requests
            if (account is ANY or r.account == account)
            and (not scope_contains or any(scope_contains in s for s in r.scopes))
        )


def _self_signed_cert(key: rsa.RSAPrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _make_handler(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None,
                   ) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _basic(self) -> tuple[str | None, str | None]:
            auth = self.headers.get("Authorization", "")
            if not auth.lower().startswith("basic "):
                return None, None
            try:
                user, _, pw = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return "", None
            return user, pw

        def _handle(self, method: str, user: str | None, pw: str | None, service: str,
                    scopes: list[str]) -> None:
            issuer.requests.append(TokenRequest(method, user, scopes, service))
            if not issuer.authenticate(user, pw):
                self._reply(401, {"details": "incorrect username or password"},
                            {"WWW-Authenticate": 'Basic realm="token"'})
                return
            self._reply(200, issuer.issue(user, service, scopes))

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/token":
                self._reply(404, {"details": "not found"})
                return
            q = parse_qs(url.query)
            user, pw = self._basic()
            scopes = [s for v in q.get("scope", []) for s in v.split(" ") if s]
            self._handle("GET", user, pw, q.get("service", [""])[0], scopes)

        def do_POST(self) -> None:
            if urlsplit(self.path).path != "/token":
                self._reply(404, {"details": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            first = {k: v[0] for k, v in form.items()}
            if first.get("grant_type") != "password":
                self._reply(400, {"error": "unsupported_grant_type"})
                return
            scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
            self._handle("POST", first.get("username"), first.get("password", ""),
                         first.get("service", ""), scopes)

    return Handler


_ACCESS_RE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) '
    r"(?P<bytes>\d+|-)"
)


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str  # request URI, including any query string
    status: int
    bytes: int | None  # response body bytes written

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and "/blobs/sha256:" in self.path


class Registry:
    """`docker-registry serve` (distribution 2.8) on 127.0.0.1 with filesystem storage.

    auth: a TokenIssuer for token auth, or None for no auth. proxy_remote: run as distribution's
    own pull-through cache of that URL. Restartable on the same port and storage.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        auth: TokenIssuer | None = None,
        service: str = "upstream-registry",
        proxy_remote: str | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
        name: str = "registry",
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.auth = auth
        self.service = service
        self.port = port or free_port()
        self.root = workdir / f"{name}-storage"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}-config.json"
        self.config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": uuid.uuid4().hex},
        }
        if auth is not None:
            self.config["auth"] = {"token": {
                "realm": auth.realm,
                "service": service,
                "issuer": auth.issuer,
                "rootcertbundle": str(auth.cert_path),
            }}
        if proxy_remote is not None:
            proxy: dict[str, str] = {"remoteurl": proxy_remote}
            if proxy_username is not None:
                proxy |= {"username": proxy_username, "password": proxy_password or ""}
            self.config["proxy"] = proxy
        self.config_path.write_text(json.dumps(self.config, indent=2))  # JSON is valid YAML
        self.proc: Proc | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, timeout: float = 20) -> Registry:
        if self.proc is not None and self.proc.alive:
            return self
        self.proc = Proc(["docker-registry", "serve", self.config_path], self.workdir,
                         name=self.name, env=clean_env(), log_name=f"{self.name}.log")
        wait_http(f"{self.url}/v2/", timeout, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def restart(self) -> Registry:
        self.stop()
        return self.start()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def mark(self) -> int:
        """A position in the log; pass it to `requests(since=...)` to see only later requests."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def requests(self, since: int = 0, settle: float = 0.2) -> list[LoggedRequest]:
        """Requests served (from the access log), oldest first.

        The registry writes its access-log line just after the response, so by default wait
        `settle` seconds first for lines of requests that just finished.
        """
        if settle:
            time.sleep(settle)
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            m = _ACCESS_RE.match(line)
            if m:
                b = m["bytes"]
                out.append(LoggedRequest(m["method"], m["path"], int(m["status"]),
                                         None if b == "-" else int(b)))
        return out

    def log_entries(self, since: int = 0) -> list[dict[str, Any]]:
        """The registry's JSON log entries (e.g. msg "response completed"), oldest first."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@dataclass
class Upstream:
    """The session's seeded upstream: a token-auth registry and its issuer."""

    registry: Registry
    issuer: TokenIssuer
    images: dict[str, ImageInfo] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def host(self) -> str:
        return self.registry.host
