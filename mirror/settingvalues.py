"""Value parsers of the settings: each takes the setting's name (for the message) and a
raw value (TOML, environment or flag) and returns it typed, or raises `SettingsError`."""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting."""


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


def positive(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise SettingsError(f"{name}: must be a finite number not below 0, got {value!r}")
    return number


def at_least_one(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: expected a whole number, got {value!r}") from None
    if number < 1:
        raise SettingsError(f"{name}: must be at least 1, got {value!r}")
    return number


def size(name: str, value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        return parse_size(value if isinstance(value, int) else str(value))
    except ValueError:
        raise SettingsError(f"{name}: expected bytes or a size like 10GB or 512MiB, "
                            f"got {value!r}") from None


def listen(name: str, value: Any) -> str:
    parse_listen(str(value))
    return str(value)


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if str(value).lower() not in choices:
        raise SettingsError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value).lower()


def above_zero(name: str, value: Any) -> float:
    number = positive(name, value)
    if number == 0:
        raise SettingsError(f"{name}: must be above 0, got {value!r}")
    return number


def level(name: str, value: Any) -> str:
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if str(value).lower() not in levels:
        raise SettingsError(f"{name}: expected one of {levels}, got {value!r}")
    return str(value).lower()


def boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}: expected true or false, got {value!r}")


STORAGE_KEYS = ("url", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_REGION")


def storage(name: str, value: Any) -> Any:
    """A URL (flag, environment, file), or the settings file's `[storage]` table."""
    if isinstance(value, dict):
        unknown = set(value) - set(STORAGE_KEYS)
        if unknown:
            raise SettingsError(f"{name}: unknown key(s) {sorted(unknown)} in [storage]; "
                                f"expected {', '.join(STORAGE_KEYS)}")
        table = {k: str(v) for k, v in value.items()}
        storage(name, table.get("url", ""))
        return table
    text = str(value or "")
    if text and not (text.startswith("s3://") and urlsplit(text).netloc):
        raise SettingsError(f"{name}: expected s3://BUCKET[/PREFIX], got {text!r}")
    return text


def redis_url(name: str, value: Any) -> str:
    text = str(value or "")
    if text and urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(f"{name}: expected redis://HOST:PORT[/DB], got {text!r}")
    return text
