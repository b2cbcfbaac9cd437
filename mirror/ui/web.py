"""How the cache browser answers: HTML from Jinja2 templates (every value escaped), its one
stylesheet and one script, and the headers every answer carries (a strict
Content-Security-Policy: the pages load nothing but these two files, run no inline script or
style, and may not be framed)."""

from __future__ import annotations

import datetime
import hashlib
import importlib.resources
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # What a page shows depends on who asks: never kept by a cache, ours or a proxy's.
    "Cache-Control": "no-store",
    "Vary": "Authorization",
}
ASSETS = {"mirror.css": "text/css; charset=utf-8", "mirror.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
MEDIA_TYPES = {
    "application/vnd.oci.image.index.v1+json": "OCI index",
    "application/vnd.oci.image.manifest.v1+json": "OCI manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "Docker manifest list",
    "application/vnd.docker.distribution.manifest.v2+json": "Docker manifest",
    "application/vnd.docker.distribution.manifest.v1+prettyjws": "Docker schema 1",
    "application/vnd.docker.distribution.manifest.v1+json": "Docker schema 1",
    "application/vnd.oci.image.config.v1+json": "OCI config",
    "application/vnd.docker.container.image.v1+json": "Docker config",
    "application/vnd.oci.image.layer.v1.tar+gzip": "tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "tar+zstd",
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "tar+gzip",
}


def human_bytes(value: float | None) -> str:
    if value is None or value < 0:
        return "—"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"  # unreachable: TB is the last unit


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def iso(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat(timespec="seconds")


def when(value: float | None) -> str:
    if value is None:
        return "—"
    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def time_tag(value: float | None) -> Markup:
    """A time as `<time>`, machine-readable too; "—" when there is none."""
    if value is None:
        return Markup("—")
    return Markup('<time datetime="{}">{}</time>').format(iso(value), when(value))


def short_digest(digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}:{hex_part[:12]}" if hex_part else digest


def type_name(media_type: str) -> str:
    return MEDIA_TYPES.get(media_type, media_type or "—")


def path_to(upstream: str, repo: str = "", reference: str = "") -> str:
    """A page's path; `reference` is `:tag` or `@digest`."""
    path = "/ui/" + quote(upstream, safe="") + "/"
    return path + quote(repo, safe="/") + quote(reference, safe=":@") if repo else path


def with_query(path: str, **params: str | int | None) -> str:
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return path + ("?" + urlencode(kept) if kept else "")


class Web:
    def __init__(self) -> None:
        root = importlib.resources.files("mirror.ui")
        self.assets: dict[str, tuple[bytes, str]] = {}
        for name in ASSETS:
            data = (root / "static" / name).read_bytes()
            self.assets[name] = (data, hashlib.sha256(data).hexdigest()[:12])
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("mirror.ui", "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        env.globals.update(asset=self.asset_url, path_to=path_to, with_query=with_query)
        env.filters.update(bytes=human_bytes, percent=percent, time=time_tag,
                           short=short_digest, type_name=type_name)
        self.templates = Jinja2Templates(env=env)

    def asset_url(self, name: str) -> str:
        """Versioned by content, so a browser may keep it for long."""
        return f"/ui/-/static/{name}?v={self.assets[name][1]}"

    def page(self, request: Request, name: str, context: dict[str, Any], status: int = 200,
             headers: Mapping[str, str] | None = None) -> Response:
        return self.templates.TemplateResponse(request, name, context, status_code=status,
                                               headers={**HEADERS, **(headers or {})})

    def json(self, data: object) -> Response:
        return Response(json.dumps(data, separators=(",", ":")), headers=HEADERS,
                        media_type="application/json")

    def asset(self, name: str) -> Response | None:
        found = self.assets.get(name)
        if found is None:
            return None
        data, _ = found
        headers = {**HEADERS, "Cache-Control": "public, max-age=86400"}
        return Response(data, media_type=ASSETS[name], headers=headers)
