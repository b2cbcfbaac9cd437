"""The cache browser in this process (offline: no upstream is asked): what each page shows,
to whom, and how it escapes; pull counting; the per-day counts; downloads in progress."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import re
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.inproc import Mirror, basic, running

from mirror.fills import Fills
from mirror.identity import ANONYMOUS_IDENTITY
from mirror.metadata import Grant, Metadata, SqliteMetadata, TagRecord, database_path
from mirror.metrics import Metrics
from mirror.readers import Fill
from mirror.reference import parse_digest
from mirror.settings import Settings, Upstream
from mirror.store import Store
from mirror.ui import glance
from mirror.ui.images import FIELDS, clean, merge_fields, safe_url
from mirror.ui.pulls import PullBatch
from mirror.ui.visitors import prefix_start

pytestmark = pytest.mark.anyio
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def settings(tmp_path: Path, **values: Any) -> Settings:
    hub = Upstream("docker.io", "http://127.0.0.1:9", library_prefix=True)
    return Settings(upstreams=(hub,), cache_dir=tmp_path / "cache", offline=True, **values)


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[Mirror]:
    async with running(settings(tmp_path)) as m:
        yield m


class Seeder:
    """Content and records as pulls would leave them."""

    def __init__(self, m: Mirror) -> None:
        self.store: Store = m.app.state.services.store
        self.metadata: Metadata = self.store.metadata

    async def blob(self, data: bytes) -> dict[str, Any]:
        await self.store.write(parse_digest(sha(data)), data, "docker.io")
        return {"digest": sha(data), "size": len(data)}

    async def image(self, annotations: dict[str, str] | None = None,
                    labels: dict[str, str] | None = None, arch: str = "amd64") -> str:
        config = await self.blob(json.dumps({
            "os": "linux", "architecture": arch, "created": "2024-01-01T00:00:00Z",
            "config": {"Labels": labels or {}}}).encode())
        layer = await self.blob(b"layer " + arch.encode() * 100)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
            "annotations": annotations or {}}).encode()
        digest = (await self.blob(manifest))["digest"]
        await self.metadata.add_manifest(digest, OCI_MANIFEST,
                                         [config["digest"], layer["digest"]])
        return digest

    async def index(self, *children: tuple[str, str]) -> str:
        entries = [{"mediaType": OCI_MANIFEST, "digest": d, "size": 1,
                    "platform": {"os": "linux", "architecture": arch}}
                   for d, arch in children]
        entries.append({"mediaType": OCI_MANIFEST, "digest": children[0][0], "size": 1,
                        "platform": {"os": "unknown", "architecture": "unknown"}})
        data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": entries}).encode()
        digest = (await self.blob(data))["digest"]
        await self.metadata.add_manifest(digest, OCI_INDEX, [d for d, _ in children])
        return digest

    async def tag(self, repo: str, tag: str, digest: str, media_type: str = OCI_MANIFEST,
                  public: bool = True, identity: str = "") -> None:
        await self.metadata.set_tag(TagRecord("docker.io", repo, tag, digest, media_type, 1,
                                              time.time()), None)
        await self.metadata.link("docker.io", repo, [digest])
        for who in ([ANONYMOUS_IDENTITY] if public else []) + ([identity] if identity else []):
            await self.metadata.grant(Grant("docker.io", repo, who, time.time(), True))


# -- pure parts ---------------------------------------------------------------------------


def test_prefix_start_sorts_just_below_the_prefix() -> None:
    names = ["librarz", "library", "library/a", "library/alpine", "library/b", "librar"]
    for prefix in ("library/a", "library/", "l", "library/alpine"):
        start = prefix_start(prefix)
        after = sorted(n for n in names if n > start)
        assert [n for n in after if n.startswith(prefix)] == sorted(
            n for n in names if n.startswith(prefix))
        assert all(n >= prefix for n in after)
    assert prefix_start("") == ""


def test_fields_are_cut_and_cleaned() -> None:
    limits = {name: limit for name, _, limit in FIELDS}
    assert limits["description"] == 512 and limits["licenses"] == 256
    long = "x" * 600
    cut = clean(long, 512)
    assert cut is not None and len(cut) == 512 and cut.endswith("…")
    assert clean("a\x1b[31mb\x00", 20) == "a [31mb"
    assert clean(7, 20) is None and clean("   ", 20) is None
    merged = merge_fields({"org.opencontainers.image.title": "from the manifest"},
                          {"org.opencontainers.image.title": "from the index",
                           "org.opencontainers.image.vendor": "v"}, None)
    assert merged["title"] == "from the manifest" and merged["vendor"] == "v"
    assert merged["url"] == ""


def test_only_web_urls_become_links() -> None:
    assert safe_url("https://example.com/x") == "https://example.com/x"
    for bad in ("javascript:alert(1)", "data:text/html,x", "//example.com", "https://",
                "https://a b", "https://a\nb", "ftp://example.com"):
        assert safe_url(bad) is None


# -- pages ---------------------------------------------------------------------------------


async def test_pages_of_a_public_image(mirror: Mirror) -> None:
    seed = Seeder(mirror)
    digest = await seed.image({"org.opencontainers.image.title": "<script>alert(1)</script>",
                               "org.opencontainers.image.url": "javascript:alert(1)",
                               "org.opencontainers.image.description": "d" * 700},
                              {"org.opencontainers.image.vendor": "ACME & Co"})
    await seed.tag("library/hello", "1.0", digest)
    overview = await mirror.http.get("/ui/")
    assert overview.status_code == 200 and "library/hello" in overview.text
    assert "default-src 'none'" in overview.headers["content-security-policy"]
    assert overview.headers["cache-control"] == "no-store"

    page = await mirror.http.get("/ui/docker.io/hello:1.0")  # library/ as clients omit it
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert 'href="javascript:' not in page.text and "javascript:alert(1)</dd>" in page.text
    assert "ACME &amp; Co" in page.text
    assert "d" * 511 + "…" in page.text and "d" * 512 not in page.text
    assert "docker pull mirror.test/library/hello:1.0" in page.text
    assert "podman pull --tls-verify=false mirror.test/docker.io/library/hello:1.0" in page.text

    by_digest = await mirror.http.get(f"/ui/docker.io/library/hello@{digest}")
    assert by_digest.status_code == 200 and digest in by_digest.text


async def test_an_index_lists_its_platforms_and_its_size(mirror: Mirror) -> None:
    seed = Seeder(mirror)
    amd, arm = await seed.image(arch="amd64"), await seed.image(arch="arm64")
    index = await seed.index((amd, "amd64"), (arm, "arm64"))
    await seed.tag("team/multi", "2", index, OCI_INDEX)
    page = await mirror.http.get("/ui/docker.io/team/multi")
    row = re.search(r"<tr>\s*<th scope=\"row\">.*?</tr>", page.text, re.S)
    assert row is not None
    assert "linux/amd64, linux/arm64" in row.group(0) and "OCI index" in row.group(0)
    assert "unknown" not in row.group(0)
    image = await mirror.http.get("/ui/docker.io/team/multi:2")
    assert image.text.count("platforms-heading") == 2 and f"@{amd}" in image.text


async def test_private_repositories_and_unlinked_digests_are_not_shown(mirror: Mirror) -> None:
    seed = Seeder(mirror)
    public, secret = await seed.image(), await seed.image(arch="s390x")
    await seed.tag("library/open", "1", public)
    await seed.tag("private/secret", "1", secret, public=False, identity="b:someone")
    overview = await mirror.http.get("/ui/")
    assert "library/open" in overview.text and "private/secret" not in overview.text
    for path in ("/ui/docker.io/private/secret", "/ui/docker.io/private/secret:1",
                 f"/ui/docker.io/private/secret@{secret}",
                 # a public repository does not unlock a digest it is not linked to
                 f"/ui/docker.io/library/open@{secret}",
                 "/ui/docker.io/library/nothing", "/ui/nowhere/x", "/ui/docker.io/UPPER",
                 "/ui/docker.io/library/open:bad!tag", "/ui/docker.io/library/open@sha256:1"):
        response = await mirror.http.get(path)
        assert response.status_code == 404, path
        assert "Nothing is cached here that you may see." in response.text
    # The same answer whether it exists or not: nothing to tell them apart.
    a = await mirror.http.get("/ui/docker.io/private/secret:1")
    b = await mirror.http.get("/ui/docker.io/private/nothing:1")
    assert a.text.replace("secret", "nothing") == b.text


async def test_an_identity_sees_its_own_grants(tmp_path: Path) -> None:
    async with running(settings(tmp_path)) as m:
        seed = Seeder(m)
        identities = await m.app.state.services.identities.ready()
        alice = identities.of_basic("docker.io", httpx.BasicAuth("alice", "alicepw"))
        await seed.tag("private/secret", "1", await seed.image(), public=False,
                       identity=alice)
        auth = {"Authorization": basic("alice", "alicepw")}
        signed = await m.http.get("/ui/", headers=auth)
        assert "Signed in as" in signed.text and "private/secret" in signed.text
        page = await m.http.get("/ui/docker.io/private/secret:1", headers=auth)
        assert page.status_code == 200
        other = await m.http.get("/ui/", headers={"Authorization": basic("bob", "bobpw")})
        assert "private/secret" not in other.text


async def test_listings_page_and_search(mirror: Mirror) -> None:
    seed = Seeder(mirror)
    digest = await seed.image()
    for name in ("a/one", "a/two", "b/three", "ab/four"):
        await seed.tag(name, "1", digest)
    await seed.tag("a/hidden", "1", digest, public=False)
    found = await mirror.http.get("/ui/", params={"q": "a/"})
    names = re.findall(r'<a href="/ui/docker.io/([^"]+)">', found.text)
    assert names == ["a/one", "a/two"]
    first = await mirror.http.get("/ui/docker.io/", params={"n": "2"})
    assert re.findall(r'<a href="/ui/docker.io/([^"?]+)">', first.text) == ["a/one", "a/two"]
    link = re.search(r'rel="next" href="([^"]+)"', first.text)
    assert link is not None
    second = await mirror.http.get(link.group(1).replace("&amp;", "&"))
    assert re.findall(r'<a href="/ui/docker.io/([^"?]+)">', second.text) == [
        "ab/four", "b/three"]
    assert 'rel="next"' not in second.text

    for n in range(5):
        await seed.tag("a/one", f"t{n}", digest)
    tags = await mirror.http.get("/ui/docker.io/a/one", params={"n": "4"})
    assert re.findall(r'<th scope="row"><a href="[^"]+">([^<]+)</a>', tags.text) == [
        "1", "t0", "t1", "t2"]
    assert 'href="/ui/docker.io/a/one?after=t2&amp;n=4"' in tags.text


async def test_pulls_by_tag_are_counted(mirror: Mirror) -> None:
    seed = Seeder(mirror)
    digest = await seed.image()
    await seed.tag("library/hello", "1.0", digest)
    accept = {"Accept": OCI_MANIFEST}
    for path in ("/v2/hello/manifests/1.0", "/v2/library/hello/manifests/1.0",
                 f"/v2/library/hello/manifests/{digest}", "/v2/library/hello/manifests/2"):
        await mirror.http.get(path, headers=accept)
    head = await mirror.http.head("/v2/library/hello/manifests/1.0", headers=accept)
    assert head.status_code == 200
    metadata: Metadata = mirror.app.state.services.metadata
    pulls = next(m for m in mirror.app.user_middleware if m.cls.__name__ == "PullCounter")
    batch: PullBatch = pulls.kwargs["pulls"]  # written every few seconds; here at once
    assert batch.pending == {("docker.io", "library/hello", "1.0"): 3}
    await batch.flush()
    assert await metadata.pulls("docker.io", "library/hello", ["1.0"]) == {"1.0": 3}
    page = await mirror.http.get("/ui/")
    assert re.search(r"docker.io/library/hello:1.0</a></td>\s*<td class=\"num\">3<", page.text)


async def test_downloads_json_and_login_challenge(mirror: Mirror) -> None:
    fills: Fills = mirror.app.state.fills
    fill = Fill(parse_digest("sha256:" + "a" * 64))
    fill.upstream, fill.written, fill.size = "docker.io", 250, 1000
    fills.active[fill.digest] = fill
    try:
        data = (await mirror.http.get("/ui/-/downloads.json")).json()
    finally:
        del fills.active[fill.digest]
    assert data == {"downloads": [{"upstream": "docker.io", "written": 250, "size": 1000,
                                   "share": 0.25, "written_text": "250 B",
                                   "size_text": "1.0 kB"}]}
    login = await mirror.http.get("/ui/login")
    assert login.status_code == 401 and login.headers["www-authenticate"] == 'Basic realm="mirror"'
    offline = await mirror.http.get("/ui/login", headers={"Authorization": basic("a", "b")})
    assert offline.status_code == 303 and offline.headers["location"] == "/ui/"


async def test_the_pages_can_be_switched_off(tmp_path: Path) -> None:
    async with running(settings(tmp_path, ui=False)) as m:
        assert (await m.http.get("/ui/")).status_code == 404
        assert (await m.http.get("/ui/login")).status_code == 404
        assert not any(mw.cls.__name__ == "PullCounter" for mw in m.app.user_middleware)


# -- at a glance ------------------------------------------------------------------------------


def test_counts_from_the_metrics() -> None:
    metrics = Metrics()
    metrics.lookups.labels("blob", "hit").inc(3)
    metrics.lookups.labels("blob", "miss").inc(1)
    metrics.lookups.labels("tag", "stale").inc(1)
    metrics.lookups.labels("manifest", "miss").inc(1)
    metrics.served_bytes.labels("cache").inc(100)
    metrics.upstream_bytes.labels("docker.io").inc(40)
    metrics.upstream_bytes.labels("ghcr.io").inc(2)
    counts = glance.read_counts(metrics)
    assert counts.blob_ratio == 0.75 and counts.meta_ratio == 0.5
    assert counts.served_cache == 100 and counts.fetched == 42


def test_today_is_a_snapshot_shared_by_workers(tmp_path: Path) -> None:
    now = {"value": glance.Counts(fetched=10.0)}
    day = {"value": "2025-01-01"}
    first = glance.Today(lambda: now["value"], str(tmp_path), day=lambda: day["value"])
    second = glance.Today(lambda: glance.Counts(fetched=99.0), str(tmp_path),
                          day=lambda: day["value"])
    assert first.counts().fetched == 0.0
    assert second.base().fetched == 10.0  # the first worker's snapshot counts
    now["value"] = glance.Counts(fetched=25.0)
    assert first.counts().fetched == 15.0
    day["value"] = "2025-01-02"
    assert first.counts().fetched == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ui-day-2025-01-02.json"]
    in_memory = glance.Today(lambda: now["value"], None, day=lambda: day["value"])
    assert in_memory.counts().fetched == 0.0


def test_seconds_to_midnight() -> None:
    at = datetime.datetime(2025, 1, 1, 23, 59, 0)
    assert glance.seconds_to_midnight(at) == 60.0


def test_other_workers_downloads_from_their_partials(tmp_path: Path) -> None:
    metadata = SqliteMetadata(database_path(tmp_path))
    metadata.open_sync()
    try:
        store = Store(tmp_path, metadata)
        fills = Fills(store)
        (store.tmp / f"sha256-{'b' * 64}.part").write_bytes(b"x" * 300)
        (store.tmp / f"sha256-{'b' * 64}.size").write_text("600\nghcr.io")
        (store.tmp / f"sha256-{'c' * 64}.size").write_text("9\nghcr.io")  # finished: no part
        (store.tmp / "upload-123.part").write_bytes(b"pushed")
        assert glance.downloads(fills, store, other_workers=False) == []
        found = glance.downloads(fills, store, other_workers=True)
        assert found == [glance.Download("ghcr.io", 300, 600)]
        assert found[0].share == 0.5
    finally:
        metadata.close_sync()


async def test_the_background_task_writes_counts_when_stopped(tmp_path: Path) -> None:
    metadata = SqliteMetadata(database_path(tmp_path))
    metadata.open_sync()
    try:
        await metadata.set_tag(TagRecord("docker.io", "r", "t", "sha256:" + "d" * 64, "x", 1,
                                         1.0), None)
        batch = PullBatch(metadata)
        task = asyncio.create_task(batch.run(every=3600))
        batch.count("docker.io", "r", "t")
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await metadata.pulls("docker.io", "r", ["t"]) == {"t": 1}
    finally:
        metadata.close_sync()


def test_templates_and_static_files_are_packaged() -> None:
    """Every template and static file is in the package data a wheel carries."""
    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["mirror.ui"]
    ui = root / "mirror" / "ui"
    files = [p.relative_to(ui) for d in ("templates", "static") for p in (ui / d).iterdir()]
    assert files and all(any(f.match(g) for g in globs) for f in files), files
