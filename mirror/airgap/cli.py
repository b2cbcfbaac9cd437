"""`mirror seed`, `mirror export` and `mirror import`: the air-gapped site's commands.

Seed fills a cache from the upstreams; export writes cached images out as an OCI layout in a
tar; import loads such a bundle (or anyone's OCI layout) into the cache of the offline site,
where `mirror serve --offline` serves it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from mirror import imageref, objectstore, services
from mirror import metadata as metadata_module
from mirror.airgap import exporter, importer, seed
from mirror.airgap.progress import Progress
from mirror.oci import Platform
from mirror.settings import Settings, SettingsError, load
from mirror.store import Store

T = TypeVar("T")
COMMANDS = ("seed", "export", "import")
SETTING_FLAGS = ("config", "cache_dir", "upstreams", "redis_url", "storage")


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(parser: argparse.ArgumentParser, upstreams: bool = True) -> None:
        parser.add_argument("--config", metavar="FILE", help="TOML settings file")
        parser.add_argument("--cache-dir", metavar="DIR", help="where the cache lives")
        parser.add_argument("--redis", dest="redis_url", metavar="URL",
                            help="metadata shared by several mirrors (as for serve)")
        parser.add_argument("--storage", metavar="URL",
                            help="where content lives: s3://BUCKET[/PREFIX] (as for serve)")
        parser.add_argument(
            "--upstream", dest="upstreams", action="append", metavar="[NAME=]URL",
            help="upstream registry (repeatable; the first is the default)" if upstreams else
            "upstream registry: which names are upstreams, and the default (first)")

    cmd = commands.add_parser("seed", help="pull images into the cache ahead of time")
    common(cmd)
    cmd.add_argument("images", nargs="*", metavar="IMAGE",
                     help="[REGISTRY/]REPO[:TAG][@DIGEST], e.g. nginx:1.27 or "
                     "ghcr.io/owner/img@sha256:...")
    cmd.add_argument("--file", metavar="LIST", help="read images from LIST, one a line "
                     "(# starts a comment)")
    cmd.add_argument("--platform", dest="platforms", action="append", metavar="OS/ARCH",
                     default=[], help="keep only this platform of a multi-platform image "
                     "(repeatable; default all)")
    cmd.add_argument("--no-pin", action="store_true", help="let seeded content be evicted")

    cmd = commands.add_parser("export", help="write cached images to an OCI layout tar")
    common(cmd, upstreams=False)
    cmd.add_argument("output", metavar="OUTPUT.tar", help="the bundle to write (- for stdout)")
    cmd.add_argument("images", nargs="*", metavar="IMAGE",
                     help="images to export (default: every cached one)")
    cmd.add_argument("--since", metavar="OLD.tar", help="leave out blobs OLD.tar holds (import "
                     "the result on top of OLD.tar)")

    cmd = commands.add_parser("import", help="load an OCI layout (tar or directory) into the "
                              "cache")
    common(cmd, upstreams=False)
    cmd.add_argument("bundle", metavar="BUNDLE", help="an OCI layout tar or directory")
    cmd.add_argument("--name", metavar="REPOSITORY", help="repository for images the bundle "
                     "names by tag alone, e.g. docker.io/library/nginx")
    cmd.add_argument("--no-pin", action="store_true", help="let imported content be evicted")


def run(args: argparse.Namespace) -> int:
    flags: dict[str, Any] = {k: getattr(args, k) for k in SETTING_FLAGS}
    try:
        settings = load(flags)
    except SettingsError as exc:
        print(f"mirror: bad setting: {exc}", file=sys.stderr)
        return 2
    try:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"mirror: cannot create {settings.cache_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.command == "seed":
        return run_seed(settings, args)
    if args.command == "export":
        return run_export(settings, args)
    return run_import(settings, args)


def image_list(args: argparse.Namespace) -> list[str]:
    names = list(args.images)
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line)
    return names


def run_seed(settings: Settings, args: argparse.Namespace) -> int:
    try:
        names = image_list(args)
        platforms = [Platform.parse(p) for p in args.platforms]
        refs = [imageref.parse(n, settings.upstreams) for n in names]
    except (OSError, ValueError) as exc:
        print(f"mirror seed: {exc}", file=sys.stderr)
        return 2
    if not refs:
        print("mirror seed: no image given", file=sys.stderr)
        return 2

    async def main() -> list[seed.Outcome]:
        parts = services.build(settings)
        progress = Progress()
        try:
            return await seed.Seeder(parts, progress, platforms, not args.no_pin).seed_all(refs)
        finally:
            progress.close()
            await parts.aclose()

    started = time.monotonic()
    outcomes = asyncio.run(main())
    print(seed.summary(outcomes, time.monotonic() - started))
    return 0 if all(o.error is None for o in outcomes) else 1


async def with_store(settings: Settings,
                     work: Callable[[Store], Awaitable[T]]) -> T:
    """Run `work` on the cache's store, opened and closed around it."""
    metadata = metadata_module.create(settings.cache_dir, settings.redis_url)
    await metadata.open()
    remote = objectstore.from_settings(settings.storage, settings.storage_options)
    store = Store(settings.cache_dir, metadata, remote, keep_local=remote is None)
    try:
        return await work(store)
    finally:
        await store.close()
        await metadata.close()


def run_export(settings: Settings, args: argparse.Namespace) -> int:
    progress = Progress()

    async def main(store: Store) -> exporter.Report:
        return await exporter.export(store, settings.upstreams, args.output, args.images,
                                     Path(args.since) if args.since else None, progress)

    try:
        report = asyncio.run(with_store(settings, main))
    except (exporter.ExportError, imageref.RefError, OSError) as exc:
        progress.close()
        print(f"mirror export: {exc}", file=sys.stderr)
        return 1
    progress.close()
    print(exporter.summary(report, args.output), file=sys.stderr if args.output == "-"
          else sys.stdout)
    return 0


def run_import(settings: Settings, args: argparse.Namespace) -> int:
    progress = Progress()

    async def main(store: Store) -> importer.Report:
        return await importer.import_bundle(store, settings.upstreams, Path(args.bundle),
                                            progress, args.name, not args.no_pin)

    try:
        report = asyncio.run(with_store(settings, main))
    except (importer.BundleError, imageref.RefError, OSError, EOFError) as exc:
        progress.close()
        print(f"mirror import: refused {args.bundle}, nothing imported:\n{exc}",
              file=sys.stderr)
        return 1
    except Exception as exc:  # e.g. tarfile.ReadError: not an archive
        progress.close()
        print(f"mirror import: cannot read {args.bundle}: {exc}", file=sys.stderr)
        return 1
    progress.close()
    print(importer.summary(report, Path(args.bundle)))
    return 0
