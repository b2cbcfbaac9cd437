"""Log formats: control characters escaped in plain lines, JSON objects in json mode, and the
access log's fields."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from mirror.logs import JsonFormatter, PlainFormatter, field, logging_config, printable
from mirror.observe import AccessLog, Observe


def test_printable_escapes_control_and_non_ascii_characters() -> None:
    assert printable("plain text") == "plain text"
    assert printable("a\nb\rc\x1b[31md\x00\x7f") == "a\\x0ab\\x0dc\\x1b[31md\\x00\\x7f"
    assert printable("back\\slash") == "back\\\\slash"
    assert printable("caf\u00e9 \u2028 \U0001f600") == "caf\\xe9 \\u2028 \\U0001f600"


def test_field_also_escapes_spaces_and_quotes() -> None:
    assert field('/v2/a b"c/x') == "/v2/a\\x20b\\x22c/x"


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("mirror.test", logging.WARNING, __file__, 1, message, args,
                             exc_info)


def test_plain_formatter_escapes_the_message() -> None:
    line = PlainFormatter().format(record("name %s", "evil\nFORGED line\x1b[2J"))
    assert "\n" not in line and "\x1b" not in line
    assert line.endswith(" WARNING mirror.test: name evil\\x0aFORGED line\\x1b[2J")


def test_plain_formatter_keeps_a_traceback() -> None:
    text = PlainFormatter().format(record("failed", exc=True))
    assert "Traceback" in text and "ValueError: boom" in text


def test_json_formatter_writes_one_object_per_record() -> None:
    line = JsonFormatter().format(record("name %s", "evil\nline\x1b", exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "name evil\nline\x1b"
    assert entry["level"] == "warning" and entry["logger"] == "mirror.test"
    assert "ValueError: boom" in entry["exception"]
    assert set(entry) == {"time", "level", "logger", "message", "exception"}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_logging_config_sends_uvicorn_and_mirror_lines_to_stderr_in_one_format(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)  # what "ext://sys.stderr" finds
    logging.config.dictConfig(logging_config(fmt, "info"))
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 1)
    logging.getLogger("mirror.fills").warning("fill failed")
    logging.getLogger("httpx").info("a request")  # quiet below warning
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2, lines
    if fmt == "json":
        assert [json.loads(line)["logger"] for line in lines] == ["uvicorn.error", "mirror.fills"]
    else:
        assert lines[0].endswith(" INFO uvicorn.error: Started server process [1]")


def access_line(fmt: str, path: str, raw_path: bytes | None, query: bytes = b"") -> str:
    """The access log line Observe writes for one request."""
    access = AccessLog()
    written: list[str] = []
    access.write = written.append  # type: ignore[method-assign]

    class Metrics:
        class _Any:
            def labels(self, *a: Any) -> Any:
                return self

            def inc(self, *a: Any) -> None:
                pass

            def observe(self, *a: Any) -> None:
                pass

        requests = request_seconds = _Any()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": path, "query_string": query,
             "client": ("127.0.0.1", 1234), "headers": []}
    if raw_path is not None:
        scope["raw_path"] = raw_path
    observe = Observe(app, Metrics(), access, fmt)  # type: ignore[arg-type]
    asyncio.run(observe(scope, None, send))  # type: ignore[arg-type]
    [line] = written
    return line


def test_the_plain_access_log_cannot_be_forged() -> None:
    # uvicorn decodes %0a and %1b in `path`; the line shows the path as sent.
    line = access_line("plain", "/v2/a\nFORGED\x1b[31m/x", b"/v2/a%0aFORGED%1b[31m/x",
                       b"q=%0a")
    assert '"GET /v2/a%0aFORGED%1b[31m/x?q=%0a" 404 2 ' in line
    # and whatever reaches a field undecoded is escaped (no raw_path: the decoded path)
    line = access_line("plain", '/v2/a\nFORGED "x"\x1b[2J\u0085', None)
    assert "\n" not in line and "\x1b" not in line and "\x85" not in line
    assert '"GET /v2/a\\x0aFORGED\\x20\\x22x\\x22\\x1b[2J\\xc2\\x85" 404' in line


def test_the_json_access_log_escapes_by_itself() -> None:
    line = access_line("json", "/v2/a\n\x1b/x", None)
    assert "\n" not in line and "\x1b" not in line
    assert json.loads(line)["path"] == "/v2/a\n\x1b/x"
