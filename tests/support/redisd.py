"""redis-server as a plain process on loopback, for tests of state shared by many replicas.

    with RedisServer(tmp_path / "redis") as redis:
        ... redis.url (redis://127.0.0.1:PORT/0) ...
        redis.flushall()

No persistence (`--save "" --appendonly no`); the pid file and the log are under the given
directory. Start-up takes a few milliseconds. Needs the Debian package redis-server (tests/run
installs it). `ping()` and `flushall()` speak RESP over a plain socket, so this module needs
no client library.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from types import TracebackType

from .procs import Proc, clean_env, free_port


class RedisError(RuntimeError):
    pass


class RedisServer:
    """`redis-server --bind 127.0.0.1 --port PORT --dir DIR --save "" --appendonly no`.

    Context manager; `stop()` and `start()` again restart it on the same port (empty, as
    nothing is persisted).
    """

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = workdir.resolve()
        self.port = port or free_port()
        self.proc: Proc | None = None
        self.startup_seconds = 0.0

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def argv(self) -> list[str]:
        return [
            "redis-server", "--bind", self.host, "--port", str(self.port),
            "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
            "--pidfile", str(self.workdir / "redis.pid"), "--logfile", "",
            "--daemonize", "no",
        ]

    def start(self, timeout: float = 10) -> RedisServer:
        if self.proc is not None and self.proc.alive:
            return self
        if shutil.which("redis-server") is None:
            raise RedisError("redis-server not found (tests/run installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        # setpriv: SIGTERM if we die, so the server never outlives its test run
        self.proc = Proc(["setpriv", "--pdeathsig", "TERM", "--", *self.argv], self.workdir,
                         name="redis-server", env=clean_env(), log_name="redis-server.log")
        deadline = started + timeout
        while True:
            try:
                if self.ping():
                    break
            except OSError:
                pass
            if not self.proc.alive:
                raise RedisError(f"redis-server exited ({self.proc.returncode}); log:\n"
                                 f"{self.proc.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RedisError(f"redis-server did not answer PING within {timeout}s")
            time.sleep(0.02)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=10)
            self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def command(self, *args: str, timeout: float = 5) -> bytes:
        """Send one command; return its reply's first line (e.g. b"+OK"). Raises RedisError
        on an error reply."""
        request = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            request += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        line = reply.split(b"\r\n", 1)[0]
        if line.startswith(b"-"):
            raise RedisError(f"{' '.join(args)}: {line[1:].decode(errors='replace')}")
        return line

    def ping(self) -> bool:
        return self.command("PING") == b"+PONG"

    def flushall(self) -> None:
        """Remove every key in every database (synchronously)."""
        self.command("FLUSHALL", "SYNC")

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc is not None else ""

    def __repr__(self) -> str:
        return f"RedisServer({self.url})"
