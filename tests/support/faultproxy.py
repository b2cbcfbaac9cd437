"""A fault-injecting HTTP/1.1 proxy for tests: put it between the mirror and an upstream and
break chosen exchanges on purpose, per request path, changing the rules at run time.

    proxy = FaultProxy(upstream.url).start()
    proxy.cut(r"/blobs/sha256:", after=1 << 20, times=1)   # close after 1 MiB of body
    proxy.stall(r"/manifests/")                              # never answer
    proxy.status(r"/manifests/", 503)                        # answer 503 (429: + Retry-After)
    proxy.drop(r".")                                          # close without a word
    proxy.refuse(); proxy.accept()                           # stop / resume listening
    proxy.clear()                                            # everything passes again

Rules are tried in order, first match wins; `times` limits how often one applies. Every
request is recorded in `seen` (method, target, headers, what was done). One exchange per
connection: the proxy sends `Connection: close` both ways, so the upstream marks the body's
end by closing (which is what makes cutting and stalling simple and exact).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from support.procs import free_port

T = TypeVar("T")
FOREVER = 3600.0


@dataclass
class Rule:
    pattern: str  # regex searched in the request target (path and query)
    action: str  # "cut", "stall", "status" or "drop"
    method: str | None = None
    after: int = 0  # cut/stall: body bytes passed on first
    seconds: float = FOREVER  # stall: how long
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None  # None: every time
    hits: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (self.method is None or self.method == method) and bool(
            re.search(self.pattern, target))


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    action: str  # "pass" or the rule's action


class FaultProxy:
    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self._mutex = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fault-proxy")
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    # -- control (from the test's thread) ----------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self.accept()
        return self

    def close(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def accept(self) -> None:
        """Listen (again, on the same port)."""
        self._call(self._listen())

    def refuse(self) -> None:
        """Stop listening: new connections are refused; open ones carry on."""
        self._call(self._unlisten())

    def add(self, rule: Rule) -> Rule:
        with self._mutex:
            self.rules.append(rule)
        return rule

    def cut(self, pattern: str, after: int = 0, *, method: str | None = None,
            times: int | None = None) -> Rule:
        return self.add(Rule(pattern, "cut", method, after=after, times=times))

    def stall(self, pattern: str, after: int = 0, seconds: float = FOREVER, *,
              method: str | None = None, times: int | None = None) -> Rule:
        return self.add(Rule(pattern, "stall", method, after=after, seconds=seconds,
                             times=times))

    def status(self, pattern: str, status: int = 503, headers: dict[str, str] | None = None,
               *, method: str | None = None, times: int | None = None) -> Rule:
        if status == 429 and headers is None:
            headers = {"Retry-After": "1"}
        return self.add(Rule(pattern, "status", method, status=status, headers=headers or {},
                             times=times))

    def drop(self, pattern: str, *, method: str | None = None,
             times: int | None = None) -> Rule:
        return self.add(Rule(pattern, "drop", method, times=times))

    def clear(self) -> None:
        with self._mutex:
            self.rules.clear()

    def count(self, pattern: str = "", method: str | None = None, action: str | None = None,
              since: int = 0) -> int:
        """Requests seen (from index `since` of `seen`) matching all the filters given."""
        with self._mutex:
            seen = self.seen[since:]
        return sum(1 for s in seen if re.search(pattern, s.target)
                   and (method is None or s.method == method)
                   and (action is None or s.action == action))

    # -- the proxy (in its own thread's loop) ------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._connection, "127.0.0.1", self.port, limit=1 << 20, reuse_address=True)

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _shutdown(self) -> None:
        await self._unlisten()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._exchange(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        body = await reader.readexactly(length) if length else b""
        rule = self._match(method, target)
        with self._mutex:
            self.seen.append(Seen(method, target, headers, rule.action if rule else "pass"))
        if rule is not None and rule.action == "drop":
            return
        if rule is not None and rule.action == "status":
            payload = json.dumps({"errors": [{
                "code": "TOOMANYREQUESTS" if rule.status == 429 else "UNAVAILABLE",
                "message": "injected by the fault proxy"}]}).encode()
            extra = "".join(f"{k}: {v}\r\n" for k, v in rule.headers.items())
            writer.write(
                f"HTTP/1.1 {rule.status} Injected\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n{extra}Connection: close\r\n\r\n".encode()
                + payload)
            await writer.drain()
            return
        if rule is not None and rule.action == "stall" and rule.after == 0:
            await asyncio.sleep(rule.seconds)
            return
        up_reader, up_writer = await asyncio.open_connection(
            self.upstream_host, self.upstream_port, limit=1 << 20)
        try:
            up_writer.write(_with_close(head) + body)
            await up_writer.drain()
            response_head = await up_reader.readuntil(b"\r\n\r\n")
            writer.write(_with_close(response_head))
            limit = rule.after if rule is not None else None
            sent = 0
            while limit is None or sent < limit:
                want = 65536 if limit is None else min(65536, limit - sent)
                data = await up_reader.read(want)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                sent += len(data)
            if rule is not None and rule.action == "stall":
                await asyncio.sleep(rule.seconds)
        finally:
            up_writer.close()

    def _match(self, method: str, target: str) -> Rule | None:
        with self._mutex:
            for rule in self.rules:
                if rule.matches(method, target):
                    rule.hits += 1
                    return rule
        return None


def _with_close(head: bytes) -> bytes:
    """The same request or response head, with `Connection: close` (one exchange each)."""
    lines = head.decode("latin-1").split("\r\n")
    kept = [line for line in lines[1:] if line and not line.lower().startswith(
        ("connection:", "keep-alive:"))]
    return "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1")
