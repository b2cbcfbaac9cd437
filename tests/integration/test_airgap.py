"""Air-gapped sites: seed a cache from the real upstream, export it as an OCI layout tar,
import it into a fresh cache and serve it with `--offline` (the upstream out of reach), to
skopeo and a real dockerd, by tag and by digest, with the upstream's digests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import StartMirror
from support.daemons import DockerdFactory, require
from support.images import HOST_ARCH, ImageInfo, inspect_raw, skopeo, skopeo_copy_to_dir
from support.procs import REPO_ROOT, clean_env, free_port
from support.registry import Upstream

SEEDED = ["library/small:latest", "test/oci-index:1.0", "test/docker-v2s2:1.0"]
BY_DIGEST = "test/oci-single:1.0"  # seeded by digest


def mirror_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "mirror", *map(str, args)], capture_output=True, text=True,
        timeout=timeout, cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": pythonpath}))


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return "sha256:" + h.hexdigest()


def cache_path(cache: Path, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return cache / "blobs" / "sha256" / hex_[:2] / hex_


def dead_upstream() -> list[tuple[str, str]]:
    return [("docker.io", f"http://127.0.0.1:{free_port()}")]


def pull_with_skopeo(mirror_host: str, ref: str, image: ImageInfo, dest: Path) -> None:
    """Copy `ref` (tag or digest) from the mirror, every platform; check every digest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    skopeo_copy_to_dir(f"docker://{mirror_host}/{ref}", dest, all=True)
    manifest = (dest / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == image.digest
    files = {p.name.removesuffix(".manifest.json") for p in dest.iterdir()}
    for digest, _ in [*image.blobs, *image.manifests]:
        assert digest.removeprefix("sha256:") in files, f"{ref}: {digest} not copied"


@dataclass
class Seeded:
    cache: Path
    bundle: Path
    seed_output: str


@pytest.fixture(scope="module")
def seeded(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """A cache seeded from the upstream (three images by tag, one by digest), exported."""
    work = tmp_path_factory.mktemp("airgap")
    cache = work / "seed-cache"
    single = upstream.images[BY_DIGEST]
    proc = ok(mirror_cli(
        "seed", "--cache-dir", cache, "--upstream", f"docker.io={upstream.url}",
        "small", "test/oci-index:1.0", "docker.io/test/docker-v2s2:1.0",
        f"docker.io/{single.repo}@{single.digest}"))
    bundle = work / "bundle.tar"
    ok(mirror_cli("export", "--cache-dir", cache, bundle))
    yield Seeded(cache, bundle, proc.stdout + proc.stderr)


def test_seed_fills_the_cache_and_pins_and_skips_what_is_cached(
    upstream: Upstream, seeded: Seeded
) -> None:
    assert "seeded 4 of 4 image(s)" in seeded.seed_output
    for ref in [*SEEDED, BY_DIGEST]:
        image = upstream.images[ref]
        for digest, _ in [(image.digest, 0), *image.blobs, *image.manifests]:
            path = cache_path(seeded.cache, digest)
            assert sha256_file(path) == digest, f"{ref}: {digest}"
    # Seeding again fetches no blob and no manifest by digest.
    mark = upstream.registry.mark()
    proc = ok(mirror_cli("seed", "--cache-dir", seeded.cache,
                         "--upstream", f"docker.io={upstream.url}", *SEEDED))
    assert "0 B fetched" in proc.stdout
    again = upstream.registry.requests(since=mark)
    assert [r for r in again if r.is_blob_get or "/manifests/sha256:" in r.path] == []


def test_a_failing_image_does_not_stop_the_others(upstream: Upstream, tmp_path: Path) -> None:
    proc = mirror_cli("seed", "--cache-dir", tmp_path / "c", "--upstream",
                      f"docker.io={upstream.url}", "test/nope:1.0", "small")
    assert proc.returncode == 1
    assert "seeded 1 of 2" in proc.stdout
    assert "failed: docker.io/test/nope:1.0" in proc.stdout
    small = upstream.images["library/small:latest"]
    for digest, _ in small.blobs:
        assert cache_path(tmp_path / "c", digest).exists()


def test_export_is_a_deterministic_oci_layout(seeded: Seeded, tmp_path: Path) -> None:
    again = tmp_path / "again.tar"
    ok(mirror_cli("export", "--cache-dir", seeded.cache, again))
    assert sha256_file(again) == sha256_file(seeded.bundle)
    with tarfile.open(seeded.bundle) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[:2] == ["oci-layout", "index.json"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        for member in members:
            if member.isfile() and member.name.startswith("blobs/sha256/"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == member.name.rsplit("/", 1)[1]
    refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert refs == sorted(refs)
    assert set(refs) >= {"docker.io/library/small:latest", "docker.io/test/oci-index:1.0",
                         "docker.io/test/docker-v2s2:1.0"}


def test_skopeo_reads_every_image_of_the_export(
    upstream: Upstream, seeded: Seeded, tmp_path: Path
) -> None:
    names = {ref: f"docker.io/{ref}" for ref in SEEDED}
    single = upstream.images[BY_DIGEST]
    names[BY_DIGEST] = f"docker.io/{single.repo}@{single.digest}"
    for ref, name in names.items():
        image = upstream.images[ref]
        dest = tmp_path / ref.replace("/", "_")
        multi = bool(image.manifests)
        args = ["--all"] if multi else []
        skopeo("copy", "--preserve-digests", *args, f"oci-archive:{seeded.bundle}:{name}",
               f"dir:{dest}")
        assert sha256_file(dest / "manifest.json") == image.digest, ref
        files = {p.name.removesuffix(".manifest.json") for p in dest.iterdir()}
        assert {d.removeprefix("sha256:") for d, _ in image.blobs} <= files


def test_import_and_serve_offline_to_skopeo_and_dockerd(
    upstream: Upstream, seeded: Seeded, start_mirror: StartMirror,
    dockerd_factory: DockerdFactory, tmp_path: Path,
) -> None:
    require("dockerd", "docker")
    cache = tmp_path / "site-cache"
    proc = ok(mirror_cli("import", "--cache-dir", cache, seeded.bundle))
    assert "imported 4 image(s)" in proc.stdout
    mirror = start_mirror(upstreams=dead_upstream(), args=["--offline"], cache_dir=cache)
    refs = {ref: ref for ref in SEEDED}
    for ref in [*SEEDED, BY_DIGEST]:
        image = upstream.images[ref]
        refs[f"{image.repo}@{image.digest}"] = ref
    for pull, ref in refs.items():
        pull_with_skopeo(mirror.host, pull, upstream.images[ref],
                         tmp_path / "skopeo" / pull.replace("/", "_").replace(":", "_"))
        assert inspect_raw(f"{mirror.host}/{pull}") == inspect_raw(f"{upstream.host}/{pull}")

    daemon = dockerd_factory(mirror.url, insecure_registries=[mirror.host])
    for pull, ref in refs.items():
        image = upstream.images[ref]
        name = pull.removeprefix("library/")
        result = daemon.pull(name)
        assert result.returncode == 0, f"{name}: {result.stderr}\n{daemon.log()[-3000:]}"
        assert daemon.image_digest(name) == image.digest, name


def test_a_corrupt_bundle_is_refused_naming_the_blob(
    upstream: Upstream, seeded: Seeded, tmp_path: Path
) -> None:
    image = upstream.images["test/oci-index:1.0"]
    victim = image.blobs[0][0]  # a layer
    bad = tmp_path / "bad.tar"
    bad.write_bytes(seeded.bundle.read_bytes())
    with tarfile.open(bad) as tar:
        member = tar.getmember(f"blobs/sha256/{victim.removeprefix('sha256:')}")
        offset = member.offset_data + member.size // 2
    with open(bad, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    cache = tmp_path / "site-cache"
    proc = mirror_cli("import", "--cache-dir", cache, bad)
    assert proc.returncode == 1
    assert victim in proc.stderr
    assert "corrupt" in proc.stderr
    # Nothing at all was imported: no content, no tag.
    assert [p for p in (cache / "blobs").rglob("*") if p.is_file()] == []
    assert [p for p in (cache / "tmp").iterdir()] == []
    ok(mirror_cli("import", "--cache-dir", cache, seeded.bundle))  # the good one still goes


def test_incremental_export_goes_on_top_of_the_earlier_bundle(
    upstream: Upstream, seeded: Seeded, tmp_path: Path
) -> None:
    first = tmp_path / "first.tar"
    ok(mirror_cli("export", "--cache-dir", seeded.cache, first, "small", "test/oci-index:1.0"))
    later = tmp_path / "later.tar"
    ok(mirror_cli("export", "--cache-dir", seeded.cache, later, "--since", first))
    with tarfile.open(first) as tar:
        old = {m.name for m in tar if m.name.startswith("blobs/sha256/")}
    with tarfile.open(later) as tar:
        new = {m.name for m in tar if m.name.startswith("blobs/sha256/")}
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    # Only what `first` lacks, but for the small indexes naming Docker-typed images.
    wrappers = {m["digest"] for m in index["manifests"]
                if m["mediaType"] == "application/vnd.oci.image.index.v1+json"}
    assert {n.rsplit("/", 1)[1] for n in old & new} <= {w[7:] for w in wrappers}
    assert len(index["manifests"]) == 4  # still names every image

    fresh = tmp_path / "fresh"
    proc = mirror_cli("import", "--cache-dir", fresh, later)
    assert proc.returncode == 1
    assert "incremental bundle" in proc.stderr

    site = tmp_path / "site"
    ok(mirror_cli("import", "--cache-dir", site, first))
    ok(mirror_cli("import", "--cache-dir", site, later))
    for ref in [*SEEDED, BY_DIGEST]:
        for digest, _ in upstream.images[ref].blobs:
            assert cache_path(site, digest).exists()


def test_seed_with_a_platform_filter_keeps_the_index_byte_exact(
    upstream: Upstream, tmp_path: Path
) -> None:
    image = upstream.images["test/oci-index:1.0"]
    other = "arm64" if HOST_ARCH == "amd64" else "amd64"
    cache = tmp_path / "cache"
    ok(mirror_cli("seed", "--cache-dir", cache, "--upstream", f"docker.io={upstream.url}",
                  "--platform", f"linux/{other}", "test/oci-index:1.0"))
    assert sha256_file(cache_path(cache, image.digest)) == image.digest
    kept, dropped = image.platforms[f"linux/{other}"], image.platforms[f"linux/{HOST_ARCH}"]
    assert cache_path(cache, kept).exists()
    assert not cache_path(cache, dropped).exists()
    for manifest, present in ((kept, True), (dropped, False)):
        doc = json.loads(image.read_blob(manifest))
        for blob in [doc["config"], *doc["layers"]]:
            assert cache_path(cache, blob["digest"]).exists() == present

    bundle = tmp_path / "one-platform.tar"
    proc = ok(mirror_cli("export", "--cache-dir", cache, bundle))
    assert "1 of 2 platforms" in proc.stdout
    dest = tmp_path / "dest"
    skopeo("--override-arch", other, "copy", f"oci-archive:{bundle}:docker.io/{image.ref}",
           f"dir:{dest}")
    assert sha256_file(dest / "manifest.json") == kept
    ok(mirror_cli("import", "--cache-dir", tmp_path / "site", bundle))


def test_oci_archives_made_by_skopeo_import_and_serve(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    index, single = upstream.images["test/oci-index:1.0"], upstream.images["test/oci-single:1.0"]
    src = ["--src-no-creds", "--src-tls-verify=false", "--preserve-digests"]
    archive = tmp_path / "skopeo.tar"
    skopeo("copy", "--all", *src, f"docker://{upstream.host}/{index.ref}",
           f"oci-archive:{archive}:docker.io/{index.ref}")
    directory = tmp_path / "layout"
    skopeo("copy", *src, f"docker://{upstream.host}/{single.ref}", f"oci:{directory}:1.0")

    cache = tmp_path / "site"
    ok(mirror_cli("import", "--cache-dir", cache, archive))
    bare = mirror_cli("import", "--cache-dir", tmp_path / "other", directory)
    assert bare.returncode == 0 and "give --name" in bare.stdout  # imported, untagged
    ok(mirror_cli("import", "--cache-dir", cache, directory, "--name", "docker.io/test/oci-single"))

    mirror = start_mirror(upstreams=dead_upstream(), args=["--offline"], cache_dir=cache)
    for image in (index, single):
        pull_with_skopeo(mirror.host, image.ref, image, tmp_path / image.repo.replace("/", "_"))


def test_seed_beside_a_running_server_shares_its_downloads(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path
) -> None:
    """The server and `mirror seed` fill one cache at once: each blob comes down once."""
    image = upstream.images["test/big:1.0"]
    cache = tmp_path / "shared"
    mirror = start_mirror(cache_dir=cache)
    mark = upstream.registry.mark()
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            pull_with_skopeo(mirror.host, image.ref, image, tmp_path / "pulled")
        except BaseException as exc:
            errors.append(exc)

    puller = threading.Thread(target=pull)
    puller.start()
    ok(mirror_cli("seed", "--cache-dir", cache, "--upstream", f"docker.io={upstream.url}",
                  image.ref))
    puller.join()
    assert errors == []
    gets = [r.path for r in upstream.registry.requests(since=mark)
            if r.is_blob_get and r.status == 200]
    assert sorted(gets) == sorted(set(gets))  # no blob fetched twice
    for digest, _ in image.blobs:
        assert sha256_file(cache_path(cache, digest)) == digest
