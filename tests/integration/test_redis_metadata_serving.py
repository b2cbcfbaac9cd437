"""A mirror whose metadata lives in Redis serves pulls as with the embedded store, and the
cache commands read the same metadata."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import redis
from conftest import StartMirror
from support.images import skopeo_copy_to_dir
from support.procs import REPO_ROOT, clean_env
from support.registry import Upstream

IMAGES = ["library/small:latest", "test/oci-index:1.0", "test/docker-v2s2:1.0"]


def pull(host: str, ref: str, parent: Path, digest: str) -> None:
    parent.mkdir(parents=True, exist_ok=True)
    dest = parent / ref.replace("/", "_").replace(":", "_")
    skopeo_copy_to_dir(f"docker://{host}/{ref}", dest, all=True)
    manifest = (dest / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == digest


def test_pulls_and_cache_commands_with_metadata_in_redis(
        upstream: Upstream, start_mirror: StartMirror, redis_url: str, tmp_path: Path) -> None:
    mirror = start_mirror(env={"MIRROR_REDIS_URL": redis_url}, workers=2)
    for ref in IMAGES:
        pull(mirror.host, ref, tmp_path / "first", upstream.images[ref].digest)

    mark = upstream.registry.mark()
    for ref in IMAGES:
        pull(mirror.host, ref, tmp_path / "again", upstream.images[ref].digest)
    again = upstream.registry.requests(since=mark)
    assert [r for r in again if r.is_blob_get or "/manifests/sha256:" in r.path] == []
    assert not (mirror.cache_dir / "metadata.db").exists()  # nothing beside the cache

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        held = int(client.hget("mirror:totals", "bytes") or 0)
    finally:
        client.close()
    assert held > 0

    def cache(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "mirror", "cache", *args, "--cache-dir",
             str(mirror.cache_dir), "--redis", redis_url],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=clean_env())
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"({held} bytes)" in cache("du")
    listed = cache("ls")
    for ref in IMAGES:
        assert f"docker.io/{ref}" in listed
