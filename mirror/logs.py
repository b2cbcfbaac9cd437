"""One format for every line on stderr: the mirror's log, uvicorn's own and the access log.

`log_format` is `plain` (`TIME LEVEL LOGGER: MESSAGE`) or `json` (one object per line). The
configuration goes to uvicorn as its `log_config`, which uvicorn applies in the server process
and again in every worker it spawns. Whatever a client controls (paths, headers, names in
messages) may hold control characters: plain lines escape them, so `%0a` cannot forge a line
and `%1b` cannot reach a terminal; JSON escapes them by itself.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # local time, as in the access log

# Anything but printable ASCII, and the backslash that starts our escapes.
_UNSAFE = re.compile(r"[^\x20-\x7e]|\\")
# In a field of a space-separated line: also the space and the quote around the request.
_UNSAFE_FIELD = re.compile(r'[^\x21-\x7e]|[\\"]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` with control and non-ASCII characters escaped (`\\n` -> `\\x0a`)."""
    return _UNSAFE.sub(_escape, text)


def field(text: str) -> str:
    """Like `printable`, and with no space or double quote left: one field of a plain line."""
    return _UNSAFE_FIELD.sub(_escape, text)


def timestamp(seconds: float | None = None) -> str:
    return time.strftime(TIME_FORMAT, time.localtime(seconds))


class PlainFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE`, the message escaped (a traceback keeps its lines)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{timestamp(record.created)} {record.levelname} {record.name}: "
                f"{printable(record.getMessage())}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `time`, `level`, `logger`, `message` (and `exception`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": timestamp(record.created),
                                 "level": record.levelname.lower(), "logger": record.name,
                                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class AbortedStreams(logging.Filter):
    """uvicorn's line for a response cut mid-body: `mirror.observe` already logged why."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing response."


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn's `log_config`: everything to stderr in
    `log_format`, at `level` (uvicorn's `trace` is below `debug`)."""
    formatter = JsonFormatter if log_format == "json" else PlainFormatter
    level = "DEBUG" if level == "trace" else level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "mirror",
               "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"mirror": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "filters": {"aborted": {"()": f"{AbortedStreams.__module__}.AbortedStreams"}},
        "handlers": {"stderr": {**handler, "filters": ["aborted"]}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # uvicorn's loggers carry handlers of their own by default: use the root's.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": True},
            "httpx": {"level": "WARNING"},  # a line per upstream request otherwise
        },
    }
