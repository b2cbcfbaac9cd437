"""How fast the cache browser's pages answer with a large cache: 100,000 tags in one
repository (and 2,000 more repositories), filled through the metadata interface, served by a
real `mirror serve --offline` and asked over loopback.

    python tests/bench/ui.py [--tags 100000] [--repos 2000] [--requests 30] [--redis]
                             [--keep DIR | --reuse DIR]

Each page is asked `--requests` times (the repository page at as many random cursors, the
image pages for as many random tags, so most rows are not in the page's short-lived memo),
after one untimed request. Prints the median, 95th percentile and slowest answer per page;
the target is under 100 ms. `--redis` keeps the metadata in a redis-server of its own
(Debian package redis-server) instead of SQLite. Everything it made is removed at the end,
unless `--keep DIR` fills DIR (SQLite) for later runs with `--reuse DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.procs import MirrorProc  # noqa: E402
from support.redisd import RedisServer  # noqa: E402

from mirror.identity import ANONYMOUS_IDENTITY  # noqa: E402
from mirror.metadata import Grant, Metadata, SqliteMetadata, TagRecord, database_path  # noqa: E402
from mirror.metadata.redis import RedisMetadata  # noqa: E402
from mirror.reference import parse_digest  # noqa: E402
from mirror.store import Store  # noqa: E402

UPSTREAM = "docker.io"
BIG = "bench/big"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
IMAGES, INDEXES = 5_000, 1_000  # distinct manifests the tags name
TARGET = 0.100  # seconds


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def put(store: Store, data: bytes) -> str:
    digest = sha(data)
    await store.write(parse_digest(digest), data, UPSTREAM)
    return digest


async def images(store: Store) -> list[tuple[str, str]]:
    """(digest, media type) of IMAGES image manifests (config and a layer each) and
    INDEXES indexes of four of them."""
    metadata = store.metadata
    made: list[tuple[str, str]] = []
    for n in range(IMAGES):
        arch = ("amd64", "arm64", "s390x", "ppc64le")[n % 4]
        config = json.dumps({"os": "linux", "architecture": arch, "config": {"Labels": {
            "org.opencontainers.image.title": f"image {n}"}}}).encode()
        layer = f"layer {n}".encode() * 64
        cdigest, ldigest = await put(store, config), await put(store, layer)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cdigest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": ldigest, "size": len(layer)}]}).encode()
        digest = await put(store, manifest)
        await metadata.add_manifest(digest, OCI_MANIFEST, [cdigest, ldigest])
        made.append((digest, OCI_MANIFEST))
    for n in range(INDEXES):
        children = made[4 * n:4 * n + 4]
        entries = [{"mediaType": OCI_MANIFEST, "digest": d, "size": 500, "platform": {
            "os": "linux", "architecture": ("amd64", "arm64", "s390x", "ppc64le")[i]}}
            for i, (d, _) in enumerate(children)]
        data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": entries}).encode()
        digest = await put(store, data)
        await metadata.add_manifest(digest, OCI_INDEX, [d for d, _ in children])
        made.append((digest, OCI_INDEX))
    return made


async def fill(metadata: Metadata, cache: Path, tags: int, repos: int) -> None:
    """Records as pulls leave them, through the metadata interface."""
    await metadata.open()
    store = Store(cache, metadata)
    try:
        started = time.monotonic()
        made = await images(store)
        now = time.time()
        for n in range(tags):
            digest, media_type = made[n % len(made)]
            await metadata.set_tag(TagRecord(UPSTREAM, BIG, f"t{n:06}", digest, media_type,
                                             500, now), None)
        await metadata.link(UPSTREAM, BIG, [d for d, _ in made])
        await metadata.add_pulls({(UPSTREAM, BIG, f"t{n:06}"): 1 + n % 997
                                  for n in range(tags)})
        names = [BIG] + [f"bench/repo{n:05}" for n in range(repos)]
        for n, name in enumerate(names[1:]):
            digest, media_type = made[n % len(made)]
            await metadata.set_tag(TagRecord(UPSTREAM, name, "latest", digest, media_type,
                                             500, now), None)
            await metadata.link(UPSTREAM, name, [digest])
        for name in names:
            await metadata.grant(Grant(UPSTREAM, name, ANONYMOUS_IDENTITY, now, True))
        await store.close()
        print(f"filled {tags} tags in {BIG}, {repos} more repositories and "
              f"{len(made)} manifests in {time.monotonic() - started:.1f} s", flush=True)
    finally:
        await metadata.close()


def timed(client: httpx.Client, paths: list[str]) -> list[float]:
    client.get(paths[0])  # untimed: connections, first imports
    seconds = []
    for path in paths:
        started = time.perf_counter()
        response = client.get(path)
        seconds.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise SystemExit(f"{path}: {response.status_code}\n{response.text[:500]}")
    return seconds


def pages(requests: int, tags: int, repos: int, rng: random.Random,
          digest_of: Callable[[str], str]) -> dict[str, list[str]]:
    cursors = [f"t{rng.randrange(tags):06}" for _ in range(requests)]
    picks = [f"t{rng.randrange(tags):06}" for _ in range(requests)]
    after = [f"bench/repo{rng.randrange(repos):05}" for _ in range(requests)]
    return {
        "overview": ["/ui/"] * requests,
        "overview, search bench/repo01": ["/ui/?q=bench/repo01"] * requests,
        "upstream's repositories, page": [f"/ui/{UPSTREAM}/?after={a}" for a in after],
        "repository, first page": [f"/ui/{UPSTREAM}/{BIG}"] * requests,
        "repository, random page": [f"/ui/{UPSTREAM}/{BIG}?after={c}" for c in cursors],
        "image by tag": [f"/ui/{UPSTREAM}/{BIG}:{t}" for t in picks],
        "image by digest": [f"/ui/{UPSTREAM}/{BIG}@{digest_of(t)}" for t in picks],
        "downloads.json": ["/ui/-/downloads.json"] * requests,
    }


def report(results: dict[str, list[float]]) -> bool:
    print(f"\n| page | median ms | p95 ms | max ms | under {TARGET * 1000:.0f} ms |")
    print("| --- | ---: | ---: | ---: | --- |")
    ok = True
    for name, seconds in results.items():
        ordered = sorted(seconds)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        good = p95 < TARGET
        ok &= good
        print(f"| {name} | {statistics.median(ordered) * 1000:.1f} | {p95 * 1000:.1f} | "
              f"{ordered[-1] * 1000:.1f} | {'yes' if good else 'NO'} |")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tags", type=int, default=100_000)
    parser.add_argument("--repos", type=int, default=2_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--redis", action="store_true", help="metadata in a redis-server")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="fill DIR and keep it")
    parser.add_argument("--reuse", type=Path, metavar="DIR", help="a DIR --keep filled")
    args = parser.parse_args()
    if args.redis and (args.keep or args.reuse):
        parser.error("--keep and --reuse keep SQLite metadata only")
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ui-bench-")))
        cache = (args.reuse or args.keep or work) / "cache"
        extra: list[str] = ["--offline"]
        if args.redis:
            server = stack.enter_context(RedisServer(work / "redis"))
            metadata: Metadata = RedisMetadata(server.url)
            extra += ["--redis", server.url]
        else:
            metadata = SqliteMetadata(database_path(cache))
        if not args.reuse:
            asyncio.run(fill(metadata, cache, args.tags, args.repos))
        mirror = MirrorProc([(UPSTREAM, "http://127.0.0.1:9")], cache, work / "logs",
                            args=extra)
        stack.callback(mirror.stop)
        mirror.start()
        rng = random.Random(1)
        with httpx.Client(base_url=mirror.url, timeout=30, trust_env=False) as client:
            def digest_of(tag: str) -> str:
                page = client.get(f"/ui/{UPSTREAM}/{BIG}:{tag}").text
                start = page.index("<dt>Digest</dt><dd><code>") + 25
                return page[start:page.index("<", start)]

            plan = pages(args.requests, args.tags, args.repos, rng, digest_of)
            results = {name: timed(client, paths) for name, paths in plan.items()}
        kind = "redis" if args.redis else "sqlite"
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"\n{args.tags} tags, metadata in {kind}, {args.requests} requests per page; "
              f"{os.cpu_count()} CPUs, load average {load}")
        return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
