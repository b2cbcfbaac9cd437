"""Settings: defaults < TOML file < environment (`MIRROR_<SETTING>`) < command-line flags.

Everything the app needs is in one immutable `Settings`, built once at start and handed to
the app factory (serialised to JSON for uvicorn's worker processes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror import policy, ratelimit
from mirror.settingvalues import (
    SettingsError,
    above_zero,
    at_least_one,
    boolean,
    choice,
    level,
    listen,
    parse_listen,
    parse_size,
    positive,
    redis_url,
    size,
    storage,
)

__all__ = ["Settings", "SettingsError", "Upstream", "load", "parse_listen", "parse_size",
           "parse_upstream"]

DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB = "docker.io"
ENV_PREFIX = "MIRROR_"
# How resolved settings reach uvicorn's worker processes.
RESOLVED_ENV = "_MIRROR_RESOLVED_SETTINGS"


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str
    username: str | None = None
    password: str | None = None
    tag_ttl: float | None = None
    # Docker Hub's convention: a one-component name `nginx` means `library/nginx`.
    library_prefix: bool = False
    # With credentials configured: let anonymous clients read what those credentials can.
    expose_private: bool = False
    # Send clients the upstream's own challenge (they fetch tokens from the upstream).
    auth_passthrough: bool = False
    # Timeouts for this upstream only (seconds); None: the global ones.
    connect_timeout: float | None = None
    read_timeout: float | None = None
    # Whether clients' own credentials are exchanged at this upstream's realm. None: only
    # for the default (first) upstream, so a user's password never reaches an upstream the
    # operator did not choose to trust with it.
    client_credentials: bool | None = None
    # TLS towards this upstream: CAs to trust besides the system's (PEM), and a client
    # certificate chain and key to present to it (mTLS).
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    # Repository policy (`mirror.policy`): patterns served (None: all) and refused.
    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()
    # A tag the upstream answers 404 for is served from the cache (with a warning).
    serve_deleted: bool = False
    # Rate-limit budget kept back (`mirror.ratelimit`); None: the global setting.
    ratelimit_reserve: str | None = None

    def __post_init__(self) -> None:
        # Lists (from TOML or the workers' JSON) become tuples: the dataclass stays frozen.
        for key in ("allow", "deny"):
            value = getattr(self, key)
            if isinstance(value, list):
                object.__setattr__(self, key, tuple(value))

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def repository(self, name: str) -> str:
        """The upstream's name for a repository a client named, with or without our
        `<upstream>/` prefix (and Docker Hub's `nginx` meaning `library/nginx`)."""
        if name.startswith(self.name + "/"):
            name = name[len(self.name) + 1:]
        return "library/" + name if self.library_prefix and "/" not in name else name


@dataclass(frozen=True)
class Settings:
    listen: str = "0.0.0.0:5000"
    upstreams: tuple[Upstream, ...] = (Upstream(DOCKER_HUB, DOCKER_HUB_URL, library_prefix=True),)
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    tag_ttl: float = 60.0
    # How long an upstream "no such tag" is remembered.
    negative_ttl: float = 10.0
    workers: int = 1
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    log_level: str = "info"
    offline: bool = False
    # How clients reach us, for the token realm we advertise (default: from each request).
    public_url: str = ""
    # Bytes of content the cache may hold; None: 80 % of the room it has at start.
    max_cache_size: int | None = None
    # Seconds an upload session may take from its POST; larger layers are refused (bytes).
    upload_timeout: float = 600.0
    max_layer_size: int = 10 * 10**9
    # One line per request: on or off (the older plain and json also mean on; see load()).
    access_log: str = "on"
    # Format of every line on stderr, the access log's and uvicorn's included: plain or json.
    log_format: str = "plain"
    # Serve HTTPS with this certificate chain and key (PEM files); both or neither.
    tls_cert: str = ""
    tls_key: str = ""
    # Seconds a connection may take to send complete request headers (from its start, or from
    # the end of the previous response on a kept-alive one).
    header_timeout: float = 30.0
    # Serve /metrics on this HOST:PORT instead of the main address ("": the main address).
    metrics_listen: str = ""
    # How long a caller's proven access to a repository is trusted (seconds).
    access_ttl: float = 60.0
    # How long a worker acts on what it read about access without reading it again (seconds).
    access_recheck: float = 1.0
    # Seconds a whole upstream request may take, body included (a blob download too).
    upstream_deadline: float = 3600.0
    # Bytes per second the background scrub re-hashes cached content at (0: off).
    scrub_rate: int = 10 * 2**20
    # Metadata shared by replicas ("": SQLite in the cache directory).
    redis_url: str = ""
    # Where content lives: "" (the cache directory) or s3://BUCKET[/PREFIX], with the
    # standard AWS_* settings from the `[storage]` table (the environment wins).
    storage: str = ""
    storage_options: dict[str, str] = field(default_factory=dict)
    # Answer cached blob GETs with a 307 to a presigned URL of the object store.
    redirect: bool = False
    # Bytes of local copies of the object store's content a replica keeps (0: none).
    hot_cache_size: int = 0
    # Seconds a replica's claim on a download lasts unless renewed (its heartbeat renews it).
    fill_lease: float = 10.0
    # Bounds of the per-process memory caches.
    tag_cache_entries: int = 100_000
    negative_cache_entries: int = 10_000
    manifest_cache_bytes: int = 64 * 2**20
    token_cache_entries: int = 10_000
    link_cache_entries: int = 20_000
    # One JSON line per content request: a file ("-": stderr; "": off).
    audit_log: str = ""
    # Bearer token of the HTTP admin API ("": no admin API).
    admin_token: str = ""
    # Rate-limit budget kept back, for upstreams that set none: pulls, or a share like "10%".
    ratelimit_reserve: str = ratelimit.DEFAULT_RESERVE
    # The cache browser: web pages under /ui/ (off: they answer 404).
    ui: bool = True

    @property
    def default_upstream(self) -> Upstream:
        return self.upstreams[0]

    @property
    def access_format(self) -> str:
        """The access log's format: "off", or the format of every log line."""
        return "off" if self.access_log == "off" else self.log_format

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["cache_dir"] = str(self.cache_dir)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        data = json.loads(text)
        data["upstreams"] = tuple(Upstream(**u) for u in data["upstreams"])
        data["cache_dir"] = Path(data["cache_dir"])
        return cls(**data)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mirror"


def parse_upstream(spec: str | Mapping[str, Any]) -> Upstream:
    """`[NAME=]URL` or a TOML table; a bare URL is named after its host."""
    if isinstance(spec, str):
        name, sep, url = spec.partition("=")
        if not sep:
            name, url = "", spec
        spec = {"name": name, "url": url}
    data = dict(spec)
    url = str(data.get("url", "")).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SettingsError(f"upstream: expected an http(s) URL, got {url!r}")
    data["url"] = url
    if not data.get("name"):
        data["name"] = DOCKER_HUB if url == DOCKER_HUB_URL else parts.netloc
    data.setdefault("library_prefix", data["name"] == DOCKER_HUB)
    known = {f.name for f in dataclasses.fields(Upstream)}
    unknown = set(data) - known
    if unknown:
        raise SettingsError(f"upstream {data['name']}: unknown setting(s) {sorted(unknown)}")
    for key in ("tag_ttl", "connect_timeout", "read_timeout"):
        if data.get(key) is not None:
            data[key] = positive(f"upstream.{key}", data[key])
    where = f"upstream {data['name']}"
    for key in ("ca_file", "client_cert", "client_key"):
        if data.get(key):
            data[key] = _readable(f"{where}: {key}", data[key])
    if data.get("client_key") and not data.get("client_cert"):
        raise SettingsError(f"{where}: client_key needs client_cert")
    for key in ("allow", "deny"):
        if data.get(key) is not None:
            try:
                data[key] = policy.check_patterns(data[key])
            except policy.PolicyError as exc:
                raise SettingsError(f"{where}: {key}: {exc}") from None
    if "serve_deleted" in data:
        data["serve_deleted"] = boolean(f"{where}: serve_deleted", data["serve_deleted"])
    if data.get("ratelimit_reserve") is not None:
        data["ratelimit_reserve"] = _reserve(f"{where}: ratelimit_reserve",
                                             data["ratelimit_reserve"])
    return Upstream(**data)


def _readable(name: str, value: Any) -> str:
    path = Path(str(value)).expanduser()
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror}") from None
    return str(path)


def _reserve(name: str, value: Any) -> str:
    try:
        ratelimit.parse_reserve(value)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    return str(value).strip()


def _upstreams(name: str, value: Any) -> tuple[Upstream, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not value:
        raise SettingsError(f"{name}: expected a non-empty list of upstreams")
    upstreams = tuple(v if isinstance(v, Upstream) else parse_upstream(v) for v in value)
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise SettingsError(f"{name}: upstream names must be unique, got {names}")
    return upstreams


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "listen": listen,
    "upstreams": _upstreams,
    "cache_dir": lambda _n, v: Path(str(v)).expanduser(),
    "tag_ttl": positive,
    "negative_ttl": positive,
    "workers": at_least_one,
    "connect_timeout": positive,
    "read_timeout": positive,
    "log_level": level,
    "offline": boolean,
    "public_url": lambda _n, v: str(v),
    "max_cache_size": size,
    "upload_timeout": positive,
    "access_log": lambda n, v: choice(n, v, ("on", "off", "plain", "json")),
    "log_format": lambda n, v: choice(n, v, ("plain", "json")),
    "tls_cert": lambda _n, v: str(Path(str(v)).expanduser()) if v else "",
    "tls_key": lambda _n, v: str(Path(str(v)).expanduser()) if v else "",
    "header_timeout": above_zero,
    "metrics_listen": lambda n, v: listen(n, v) if v else "",
    "max_layer_size": size,
    "access_ttl": positive,
    "access_recheck": positive,
    "upstream_deadline": positive,
    "scrub_rate": size,
    "redis_url": lambda n, v: redis_url(n, v),
    "storage": lambda n, v: storage(n, v),
    "redirect": boolean,
    "hot_cache_size": size,
    "fill_lease": above_zero,
    "tag_cache_entries": at_least_one,
    "negative_cache_entries": at_least_one,
    "manifest_cache_bytes": size,
    "token_cache_entries": at_least_one,
    "link_cache_entries": at_least_one,
    "audit_log": lambda _n, v: "-" if str(v) == "-" else str(Path(str(v)).expanduser()) if v
    else "",
    "admin_token": lambda _n, v: str(v),
    "ratelimit_reserve": _reserve,
    "ui": boolean,
}


def load(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Resolve settings; `flags` holds only the flags given (None values are ignored)."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    config = flags.pop("config", None) or env.get(ENV_PREFIX + "CONFIG")
    merged: dict[str, Any] = {}
    options: dict[str, str] = {}
    if config:
        data = _read_toml(Path(config))
        if isinstance(data.get("storage"), dict):  # [storage]: url and the AWS_* keys
            table = storage("storage", data["storage"])
            assert isinstance(table, dict)
            options = {k: v for k, v in table.items() if k != "url"}
            data["storage"] = table.get("url", "")
        merged.update(data)
    for key in _PARSERS:
        if ENV_PREFIX + key.upper() in env:
            merged[key] = env[ENV_PREFIX + key.upper()]
    merged.update(flags)
    values = {}
    for key, value in merged.items():
        if key not in _PARSERS:
            raise SettingsError(f"unknown setting {key!r}")
        values[key] = _PARSERS[key](key, value)
    # access_log once chose the format too: "json" still makes every line JSON.
    if values.get("access_log") in ("plain", "json"):
        if values["access_log"] == "json":
            values["log_format"] = "json"
        values["access_log"] = "on"
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        raise SettingsError("tls_cert, tls_key: give both (certificate chain and key) or neither")
    if options:
        values["storage_options"] = options
    if values.get("storage") and not values.get("redis_url"):
        raise SettingsError("storage: s3:// storage needs redis_url (--redis): replicas share "
                            "their metadata there")
    if values.get("redirect") and not values.get("storage"):
        raise SettingsError("redirect: needs s3:// storage to redirect to")
    return Settings(**values)


def check_tls(settings: Settings) -> None:
    """Before serving: the certificate and key can be read and belong together."""
    if not settings.tls_cert:
        return
    for name in ("tls_cert", "tls_key"):
        path = getattr(settings, name)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise SettingsError(f"{name}: cannot read {path}: {exc.strerror}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, ValueError) as exc:
        raise SettingsError(f"tls_cert, tls_key: not a PEM certificate chain and its key "
                            f"({settings.tls_cert}, {settings.tls_key}): {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config: {path} is not valid TOML: {exc}") from None
    if "upstream" in data and "upstreams" not in data:
        data["upstreams"] = data.pop("upstream")
    return data
