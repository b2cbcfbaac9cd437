"""Operations per second of the metadata stores: point reads (`granted`, `tag`) and a write
(`set_tag`), from one asyncio task and from 16, for SQLite and for a local redis-server.

    python tests/bench/metadata_ops.py [--seconds 2] [--runs 3] [--loop asyncio]

Runs on uvloop, as `mirror serve` does (`--loop asyncio`: the standard loop). Starts its own
redis-server on loopback (Debian package redis-server) and removes everything it made. Prints
one line per (store, operation, tasks): the median of the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.redisd import RedisServer  # noqa: E402

from mirror.metadata import Grant, Metadata, SqliteMetadata, TagRecord  # noqa: E402
from mirror.metadata.redis import RedisMetadata  # noqa: E402

ACCEPT = ("application/vnd.oci.image.index.v1+json",
          "application/vnd.oci.image.manifest.v1+json")
DIGEST = "sha256:" + "ab" * 32


def operations(store: Metadata) -> dict[str, Callable[[int], Awaitable[object]]]:
    def record(n: int) -> TagRecord:
        return TagRecord("docker.io", "library/alpine", f"t{n % 100}", DIGEST,
                         ACCEPT[1], 1234, time.time())

    return {
        "granted": lambda n: store.granted("docker.io", "library/alpine", "caller"),
        "tag": lambda n: store.tag("docker.io", "library/alpine", "t1", ACCEPT),
        "set_tag": lambda n: store.set_tag(record(n), ACCEPT),
    }


async def rate(op: Callable[[int], Awaitable[object]], tasks: int, seconds: float) -> float:
    """Calls per second that `tasks` tasks calling `op` in a loop complete in `seconds`."""
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        n = 0
        while time.monotonic() < deadline:
            await op(n)
            n += 1
        done += n

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return done / (time.monotonic() - started)


async def measure(name: str, store: Metadata, seconds: float, runs: int) -> None:
    await store.open()
    try:
        await store.grant(Grant("docker.io", "library/alpine", "caller", time.time(), False))
        for op_name, op in operations(store).items():
            await op(1)  # the records the reads look up exist
            for tasks in (1, 16):
                results = [await rate(op, tasks, seconds) for _ in range(runs)]
                print(f"{name:7} {op_name:8} {tasks:3} tasks  {statistics.median(results):9.0f}"
                      f" /s  (runs: {', '.join(f'{r:.0f}' for r in results)})", flush=True)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    with tempfile.TemporaryDirectory(prefix="metadata-bench-") as tmp:
        work = Path(tmp)
        asyncio.run(measure("sqlite", SqliteMetadata(work / "metadata.db"), args.seconds,
                            args.runs))
        with RedisServer(work / "redis") as server:
            asyncio.run(measure("redis", RedisMetadata(server.url), args.seconds, args.runs))


if __name__ == "__main__":
    main()
