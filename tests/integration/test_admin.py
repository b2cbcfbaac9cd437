"""`mirror cache ls|du|rm|gc|verify`, run against the cache of a mirror that keeps serving."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import StartMirror
from support import meta
from support.fake_upstream import FakeUpstream
from support.procs import REPO_ROOT, MirrorProc, clean_env
from support.registry import Upstream

from mirror.airgap.progress import human_bytes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(cache: Path, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return cache / "blobs" / "sha256" / hex_[:2] / hex_


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", "cache", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT, env=clean_env(env))


def add_image(fake: FakeUpstream, tag: str, layers: list[bytes]) -> tuple[str, list[str]]:
    """An OCI image under `tag` on the fake upstream: (manifest digest, blob digests)."""
    config = json.dumps({"os": "linux", "architecture": "amd64", "tag": tag}).encode()
    blobs = [fake.add_blob(config), *(fake.add_blob(layer) for layer in layers)]
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blobs[0], "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(layer)}
                   for d, layer in zip(blobs[1:], layers, strict=True)],
    }).encode()
    digest = sha256(manifest)
    fake.manifests[tag] = fake.manifests[digest] = (OCI_MANIFEST, manifest)
    return digest, blobs


def pull(mirror: MirrorProc, tag: str, blobs: list[str]) -> None:
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        manifest = client.get(f"/v2/owner/img/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
        assert manifest.status_code == 200, manifest.text
        for digest in blobs:
            response = client.get(f"/v2/owner/img/blobs/{digest}")
            assert response.status_code == 200 and sha256(response.content) == digest


def test_ls_du_and_rm_while_the_mirror_serves(start_mirror: StartMirror) -> None:
    with FakeUpstream() as fake:
        shared = os.urandom(300_000)
        a, a_blobs = add_image(fake, "a", [shared, os.urandom(200_000)])
        b, b_blobs = add_image(fake, "b", [shared, os.urandom(100_000)])
        mirror = start_mirror(upstreams=[("fake", fake.url)])
        cache = str(mirror.cache_dir)
        pull(mirror, "a", a_blobs)
        pull(mirror, "b", b_blobs)

        ls = cli("ls", "--cache-dir", cache)
        assert ls.returncode == 0, ls.stderr
        lines = {line.split()[0]: line.split() for line in ls.stdout.splitlines()[1:]}
        assert set(lines) == {"fake/owner/img:a", "fake/owner/img:b"}
        assert lines["fake/owner/img:a"][1] == a
        assert lines["fake/owner/img:b"][1] == b
        a_bytes = sum(blob_path(mirror.cache_dir, d).stat().st_size for d in (a, *a_blobs))
        assert " ".join(lines["fake/owner/img:a"][2:4]) == human_bytes(a_bytes)

        du = cli("du", "--cache-dir", cache, env={"MIRROR_MAX_CACHE_SIZE": "1GB"})
        assert du.returncode == 0, du.stderr
        held = sum(p.stat().st_size for p in (mirror.cache_dir / "blobs").rglob("*")
                   if p.is_file())
        assert f"({held} bytes) in 7 entries" in du.stdout  # 2 manifests, 2 configs, 3 layers
        assert "1000000000 bytes; max_cache_size" in du.stdout

        removed = cli("rm", "--cache-dir", cache, "fake/owner/img:a")
        assert removed.returncode == 0, removed.stderr
        assert "3 entries" in removed.stdout  # a's manifest, config and own layer
        assert not blob_path(mirror.cache_dir, a).exists()
        assert not any(blob_path(mirror.cache_dir, d).exists() for d in a_blobs[::2])
        for digest in (b, *b_blobs):  # b's, including the layer a shared with it
            assert blob_path(mirror.cache_dir, digest).exists()
        ls = cli("ls", "--cache-dir", cache)
        assert "img:a" not in ls.stdout and "img:b" in ls.stdout

        missing = cli("rm", "--cache-dir", cache, "fake/owner/img:nope")
        assert missing.returncode == 1 and "not in the cache" in missing.stderr

        # The server, which kept running, fetches a again.
        pull(mirror, "a", a_blobs)
        assert blob_path(mirror.cache_dir, a_blobs[2]).exists()

    mirror.stop()  # flushes the last uses
    ls = cli("ls", "--cache-dir", cache)
    today = time.strftime("%Y-%m-%d")
    assert all(today in line for line in ls.stdout.splitlines()[1:]), ls.stdout


def test_gc_removes_what_nothing_uses_and_leftovers_but_nothing_in_use(
    start_mirror: StartMirror,
) -> None:
    with FakeUpstream() as fake:
        a, a_blobs = add_image(fake, "a", [os.urandom(50_000)])
        orphan = fake.add_blob(os.urandom(40_000))
        pinned = fake.add_blob(os.urandom(30_000))
        mirror = start_mirror(upstreams=[("fake", fake.url)])
        cache = mirror.cache_dir
        pull(mirror, "a", a_blobs)
        pull(mirror, "a", [orphan, pinned])  # by digest only: no tag names them
        meta.run(lambda m: m.pin("test", [pinned]), cache)
        # Leftovers of a killed fill, an idle lock, and a push's upload in progress.
        dead = "sha256-" + "ab" * 32
        (cache / "tmp" / f"{dead}.part").write_bytes(b"half")
        (cache / "locks" / f"{dead}.lock").write_bytes(b"")
        upload = cache / "tmp" / "upload-abc123.part"
        upload.write_bytes(b"being pushed")

        young = cli("gc", "--cache-dir", str(cache))  # default --min-age: all of it is young
        assert young.returncode == 0, young.stderr
        assert blob_path(cache, orphan).exists()

        gc = cli("gc", "--cache-dir", str(cache), "--min-age", "0")
        assert gc.returncode == 0, gc.stderr
        assert "removed 1 entries" in gc.stdout, gc.stdout
        assert not blob_path(cache, orphan).exists()
        for digest in (a, *a_blobs, pinned):
            assert blob_path(cache, digest).exists(), digest
        assert not (cache / "tmp" / f"{dead}.part").exists()
        assert not (cache / "locks" / f"{dead}.lock").exists()
        assert upload.exists()  # not a fill's: only age removes it

        with httpx.Client(base_url=mirror.url) as client:  # still serving
            assert sha256(client.get(f"/v2/owner/img/blobs/{orphan}").content) == orphan


def test_verify_finds_and_removes_a_corrupt_entry(
    upstream: Upstream, start_mirror: StartMirror
) -> None:
    mirror = start_mirror()
    image = upstream.images["test/oci-single:1.0"]
    with httpx.Client(base_url=mirror.url) as client:
        for digest, _ in image.blobs:
            assert client.get(f"/v2/{image.repo}/blobs/{digest}").status_code == 200
        digest = image.blobs[0][0]
        path = blob_path(mirror.cache_dir, digest)
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
        stray = mirror.cache_dir / "blobs" / "sha256" / "zz"
        stray.mkdir()
        (stray / "junk").write_bytes(b"junk")

        verify = cli("verify", "--cache-dir", str(mirror.cache_dir))
        assert verify.returncode == 1, verify.stdout + verify.stderr
        assert digest.removeprefix("sha256:") in verify.stdout and "junk" in verify.stdout
        assert "2 bad" in verify.stdout
        assert not path.exists()
        again = cli("verify", "--cache-dir", str(mirror.cache_dir))
        assert again.returncode == 0 and " 0 bad" in again.stdout, again.stdout
        # The server, running all along, fetches the removed blob again.
        assert sha256(client.get(f"/v2/{image.repo}/blobs/{digest}").content) == digest


def test_cache_commands_refuse_a_directory_without_a_cache(tmp_path: Path) -> None:
    for command in ("ls", "du", "gc", "verify"):
        result = cli(command, "--cache-dir", str(tmp_path / "nothing"))
        assert result.returncode == 2 and "no cache in" in result.stderr
    assert not (tmp_path / "nothing").exists()
