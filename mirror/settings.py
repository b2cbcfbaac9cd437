"""Settings: defaults < TOML file < environment (`MIRROR_<SETTING>`) < command-line flags.

Everything the app needs is in one immutable `Settings`, built once at start and handed to
the app factory (serialised to JSON for uvicorn's worker processes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB = "docker.io"
ENV_PREFIX = "MIRROR_"
# How resolved settings reach uvicorn's worker processes.
RESOLVED_ENV = "_MIRROR_RESOLVED_SETTINGS"


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting."""


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
    link_cache_entries: int = 100_000
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


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"listen: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(value: str | int) -> int:
    """`10GB`, `512MiB`, `1048576` -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


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
            data[key] = _positive(f"upstream.{key}", data[key])
    return Upstream(**data)


def _positive(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise SettingsError(f"{name}: must be a finite number not below 0, got {value!r}")
    return number


def _at_least_one(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: expected a whole number, got {value!r}") from None
    if number < 1:
        raise SettingsError(f"{name}: must be at least 1, got {value!r}")
    return number


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


def _size(name: str, value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        return parse_size(value if isinstance(value, int) else str(value))
    except ValueError:
        raise SettingsError(f"{name}: expected bytes or a size like 10GB or 512MiB, "
                            f"got {value!r}") from None


def _listen(name: str, value: Any) -> str:
    parse_listen(str(value))
    return str(value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if str(value).lower() not in choices:
        raise SettingsError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value).lower()


def _above_zero(name: str, value: Any) -> float:
    number = _positive(name, value)
    if number == 0:
        raise SettingsError(f"{name}: must be above 0, got {value!r}")
    return number


def _level(name: str, value: Any) -> str:
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if str(value).lower() not in levels:
        raise SettingsError(f"{name}: expected one of {levels}, got {value!r}")
    return str(value).lower()


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}: expected true or false, got {value!r}")


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "listen": _listen,
    "upstreams": _upstreams,
    "cache_dir": lambda _n, v: Path(str(v)).expanduser(),
    "tag_ttl": _positive,
    "negative_ttl": _positive,
    "workers": _at_least_one,
    "connect_timeout": _positive,
    "read_timeout": _positive,
    "log_level": _level,
    "offline": _bool,
    "public_url": lambda _n, v: str(v),
    "max_cache_size": _size,
    "upload_timeout": _positive,
    "access_log": lambda n, v: _choice(n, v, ("on", "off", "plain", "json")),
    "log_format": lambda n, v: _choice(n, v, ("plain", "json")),
    "tls_cert": lambda _n, v: str(Path(str(v)).expanduser()) if v else "",
    "tls_key": lambda _n, v: str(Path(str(v)).expanduser()) if v else "",
    "header_timeout": _above_zero,
    "metrics_listen": lambda n, v: _listen(n, v) if v else "",
    "max_layer_size": _size,
    "access_ttl": _positive,
    "upstream_deadline": _positive,
    "scrub_rate": _size,
    "redis_url": lambda n, v: _redis_url(n, v),
    "storage": lambda n, v: _storage(n, v),
    "redirect": _bool,
    "hot_cache_size": _size,
    "fill_lease": _above_zero,
    "tag_cache_entries": _at_least_one,
    "negative_cache_entries": _at_least_one,
    "manifest_cache_bytes": _size,
    "token_cache_entries": _at_least_one,
    "link_cache_entries": _at_least_one,
    "ui": _bool,
}


STORAGE_KEYS = ("url", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_REGION")


def _storage(name: str, value: Any) -> Any:
    """A URL (flag, environment, file), or the settings file's `[storage]` table."""
    if isinstance(value, dict):
        unknown = set(value) - set(STORAGE_KEYS)
        if unknown:
            raise SettingsError(f"{name}: unknown key(s) {sorted(unknown)} in [storage]; "
                                f"expected {', '.join(STORAGE_KEYS)}")
        table = {k: str(v) for k, v in value.items()}
        _storage(name, table.get("url", ""))
        return table
    text = str(value or "")
    if text and not (text.startswith("s3://") and urlsplit(text).netloc):
        raise SettingsError(f"{name}: expected s3://BUCKET[/PREFIX], got {text!r}")
    return text


def _redis_url(name: str, value: Any) -> str:
    text = str(value or "")
    if text and urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(f"{name}: expected redis://HOST:PORT[/DB], got {text!r}")
    return text


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
            table = _storage("storage", data["storage"])
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
