"""The `mirror` command line."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from mirror import __version__, admin, clientconfig
from mirror.airgap import cli as airgap
from mirror.metrics import prepare_multiprocess, serve_metrics
from mirror.settings import (
    RESOLVED_ENV,
    Settings,
    SettingsError,
    check_tls,
    load,
    parse_listen,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror", description="A pull-through caching mirror for container registries.")
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the mirror")
    add_common(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on "
                       "(default 0.0.0.0:5000)")
    serve.add_argument("--tag-ttl", metavar="SECONDS", help="how long a tag's digest is "
                       "trusted before asking upstream again (default 60)")
    serve.add_argument("--negative-ttl", metavar="SECONDS", help="how long an upstream's "
                       "'no such tag' is remembered (default 10)")
    serve.add_argument("--workers", metavar="N", help="worker processes (default 1)")
    serve.add_argument("--log-level", metavar="LEVEL", help="critical..debug (default info)")
    serve.add_argument("--max-cache-size", metavar="SIZE", help="bytes of content to keep, "
                       "e.g. 10GB or 512MiB (default 80%% of the room the cache has at start)")
    serve.add_argument("--upload-timeout", metavar="SECONDS",
                       help="time an upload may take from its start (default 600)")
    serve.add_argument("--max-layer-size", metavar="BYTES",
                       help="largest layer a push may upload, e.g. 10GB (default 10GB)")
    serve.add_argument("--access-log", metavar="on|off",
                       help="one line per request (default on; json also sets --log-format)")
    serve.add_argument("--audit-log", metavar="FILE",
                       help="one JSON line per content request to FILE (- for stderr; default "
                       "off); reopened on SIGHUP")
    serve.add_argument("--log-format", metavar="FORMAT",
                       help="plain or json, for every line on stderr (default plain)")
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="serve HTTPS with this PEM certificate chain (needs --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    serve.add_argument("--header-timeout", metavar="SECONDS",
                       help="time a connection may take to send request headers (default 30)")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="serve /metrics on this address instead of the main one")
    serve.add_argument("--redirect", action="store_true", default=None,
                       help="answer cached blob GETs with a 307 to the object store")
    serve.add_argument("--offline", action="store_true", default=None,
                       help="serve only from the cache; never contact an upstream")
    serve.add_argument("--no-ui", dest="ui", action="store_false", default=None,
                       help="turn off the cache browser (the web pages under /ui/)")
    config = commands.add_parser(
        "client-config", help="print what a client needs to pull through the mirror",
        description="Print on standard output the configuration CLIENT needs to pull through "
        "the mirror at --mirror URL, for every upstream of the mirror's settings (--config, "
        "--upstream, MIRROR_UPSTREAMS). containerd gets one hosts.toml per registry, each "
        "after a line '# file: REGISTRY/hosts.toml'.")
    config.add_argument("client", choices=clientconfig.CLIENTS)
    config.add_argument("--mirror", required=True, metavar="URL",
                        help="the mirror's address as clients reach it, e.g. http://mirror:5000")
    config.add_argument("--config", metavar="FILE", help="TOML settings file")
    config.add_argument("--upstream", dest="upstreams", action="append", metavar="[NAME=]URL",
                        help="upstream registry (repeatable; the first is the default)")
    admin.add_parser(commands)
    airgap.add_parsers(commands)
    return parser


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file")
    parser.add_argument("--cache-dir", metavar="DIR", help="where the cache lives")
    parser.add_argument("--upstream", dest="upstreams", action="append", metavar="[NAME=]URL",
                        help="upstream registry (repeatable; the first is the default)")
    parser.add_argument("--redis", dest="redis_url", metavar="URL",
                        help="metadata shared by several mirrors (redis://HOST:PORT/DB)")
    parser.add_argument("--storage", metavar="URL",
                        help="where content lives: s3://BUCKET[/PREFIX] (default: the cache "
                        "directory)")


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command"}
    return {k: v for k, v in vars(args).items() if k not in skip and v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "cache":
        return admin.run(args)
    if args.command in airgap.COMMANDS:
        return airgap.run(args)
    if args.command == "client-config":
        return client_config(args)
    try:
        settings = load(flags_of(args))
    except SettingsError as exc:
        print(f"mirror: bad setting: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    return 2


def client_config(args: argparse.Namespace) -> int:
    try:
        settings = load({"config": args.config, "upstreams": args.upstreams})
        text = clientconfig.render(args.client, settings, args.mirror)
    except (SettingsError, clientconfig.ClientConfigError) as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def serve(settings: Settings) -> int:
    import uvicorn

    from mirror.httpserver import protocol
    from mirror.logs import logging_config

    host, port = settings.host_port
    try:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"mirror: bad setting: cache_dir: cannot create {settings.cache_dir}: "
              f"{exc.strerror}", file=sys.stderr)
        return 2
    try:
        check_tls(settings)
    except SettingsError as exc:
        print(f"mirror: bad setting: {exc}", file=sys.stderr)
        return 2
    os.environ[RESOLVED_ENV] = settings.to_json()
    # Every worker writes its samples here; /metrics sums them (set before they start).
    with tempfile.TemporaryDirectory(prefix="mirror-metrics-") as samples:
        prepare_multiprocess(samples)
        if settings.metrics_listen:
            serve_metrics(*parse_listen(settings.metrics_listen))
        uvicorn.run(
            "mirror.app:app_from_env", factory=True, host=host, port=port,
            workers=settings.workers if settings.workers > 1 else None,
            loop="uvloop", http=protocol(settings.header_timeout), access_log=False,
            log_level=settings.log_level,
            log_config=logging_config(settings.log_format, settings.log_level),
            ssl_certfile=settings.tls_cert or None, ssl_keyfile=settings.tls_key or None,
            timeout_graceful_shutdown=5)
    return 0
