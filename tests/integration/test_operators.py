"""Operators in control, against the real upstream (distribution 2.8 with token auth) and real
clients (skopeo, dockerd): the repository policy, the audit log (two workers, logrotate),
refresh seen by every worker, pins surviving eviction, rate-limit headers (from the fake
upstream: distribution sends none) and tags deleted upstream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from conftest import StartMirror
from support.daemons import DockerdFactory
from support.fake_upstream import FakeUpstream
from support.images import skopeo, skopeo_copy_to_dir
from support.procs import REPO_ROOT, MirrorProc, clean_env
from support.registry import Upstream

ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"))
ALICE = "alice:alicepw"
ADMIN_TOKEN = "admin-" + "x" * 20


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.1)


def get(url: str, **kw: Any) -> httpx.Response:
    """One request on a connection of its own (so the kernel may hand it to any worker)."""
    headers = {"Accept": ACCEPT, **kw.pop("headers", {})}
    return httpx.get(url, headers=headers, timeout=30, trust_env=False, **kw)


def mirror_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT, env=clean_env(env))


def settings_file(tmp_path: Path, upstream: Upstream, **keys: Any) -> Path:
    """A settings file with the session's upstream as docker.io, and `keys` in its table."""
    lines = ["[[upstream]]", 'name = "docker.io"', f'url = "{upstream.url}"',
             *(f"{k} = {json.dumps(v)}" for k, v in keys.items())]
    path = tmp_path / f"mirror-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_with(start_mirror: StartMirror, config: Path, args: tuple[str, ...] = (),
               **kw: Any) -> MirrorProc:
    """A mirror whose upstreams (with their rules) come from `config` alone."""
    return start_mirror(upstreams=[], args=("--config", str(config), *args), **kw)


def copy_upstream(upstream: Upstream, src: str, dest: str) -> None:
    """Copy an image within the upstream registry (as alice)."""
    skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false",
           "--dest-tls-verify=false", f"--src-creds={ALICE}", f"--dest-creds={ALICE}",
           f"docker://{upstream.host}/{src}", f"docker://{upstream.host}/{dest}")


def digest_of_tag(mirror: MirrorProc, repo: str, tag: str) -> str:
    response = get(f"{mirror.url}/v2/{repo}/manifests/{tag}")
    assert response.status_code == 200, response.text
    return str(response.headers["docker-content-digest"])


def blob_path(cache: Path, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return cache / "blobs" / "sha256" / hex_[:2] / hex_


# -- the repository policy ---------------------------------------------------------------------


def test_policy_refuses_pulls_by_tag_and_digest_pushes_and_cached_content(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path,
    dockerd_factory: DockerdFactory,
) -> None:
    image = upstream.images["test/docker-v2s2:1.0"]
    first = start_mirror()
    skopeo_copy_to_dir(f"{first.host}/{image.ref}", tmp_path / "warm")  # cached
    first.stop()
    config = settings_file(tmp_path, upstream, allow=["library/*", "test/**"],
                           deny=["test/docker-*"])
    mirror = start_with(start_mirror, config, cache_dir=first.cache_dir)
    mark = upstream.registry.mark()
    rule = "deny = 'test/docker-*'"

    copied = skopeo("copy", "--src-tls-verify=false", f"--src-creds={ALICE}",
                    f"docker://{mirror.host}/{image.ref}", f"dir:{tmp_path / 'by-tag'}",
                    check=False)
    assert copied.returncode != 0 and "denied" in copied.stderr.lower(), copied.stderr
    for path in (f"manifests/{image.tag}", f"manifests/{image.digest}",
                 f"blobs/{image.blobs[0][0]}", "tags/list"):
        response = get(f"{mirror.url}/v2/{image.repo}/{path}")
        assert response.status_code == 403, (path, response.text)
        assert response.json()["errors"][0]["code"] == "DENIED"
        assert rule in response.json()["errors"][0]["message"]
    not_allowed = get(f"{mirror.url}/v2/private/secret/manifests/1.0")
    assert not_allowed.status_code == 403 and "allow list" in not_allowed.text
    pushed = skopeo("copy", "--dest-tls-verify=false", f"--dest-creds={ALICE}",
                    f"dir:{tmp_path / 'warm'}", f"docker://{mirror.host}/test/docker-pushed:1",
                    check=False)
    # (skopeo first HEADs the blobs: a 403 without a body, so no message to show)
    assert pushed.returncode != 0 and "403 (forbidden)" in pushed.stderr.lower(), pushed.stderr
    upload = httpx.post(f"{mirror.url}/v2/test/docker-pushed/blobs/uploads/",
                        auth=("alice", "alicepw"), trust_env=False)
    assert upload.status_code == 403 and rule in upload.text
    assert not [r for r in upstream.registry.requests(since=mark) if "docker-" in r.path], \
        "no refused request reached the upstream"
    # Allowed content is served as ever.
    skopeo_copy_to_dir(f"{mirror.host}/library/small:latest", tmp_path / "small")

    # A real docker client shows the refusal.
    daemon = dockerd_factory(None, insecure_registries=[mirror.host])
    result = daemon.pull(f"{mirror.host}/{image.ref}")
    assert result.returncode != 0 and "denied" in result.stderr.lower(), result.stderr

    # seed and export refuse it too.
    store = ("--config", str(config), "--cache-dir", str(mirror.cache_dir))
    seeded = mirror_cli("seed", image.ref, *store)
    assert seeded.returncode == 1 and rule in seeded.stdout + seeded.stderr
    exported = mirror_cli("export", str(tmp_path / "out.tar"), f"docker.io/{image.ref}", *store)
    assert exported.returncode == 1 and rule in exported.stderr
    assert not (tmp_path / "out.tar").exists()


def test_a_bad_pattern_stops_start_up(upstream: Upstream, tmp_path: Path) -> None:
    config = settings_file(tmp_path, upstream, deny=["library/evil*", "Library/*"])
    result = mirror_cli("serve", "--config", str(config), "--cache-dir", str(tmp_path / "c"),
                        "--listen", "127.0.0.1:1")
    assert result.returncode == 2
    assert "mirror: bad setting: upstream docker.io: deny: bad pattern 'Library/*'" in \
        result.stderr


# -- the audit log -----------------------------------------------------------------------------


def entries(path: Path) -> list[dict[str, Any]]:
    """Every line of the file, each a whole JSON object (fails on a torn line)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_audit_log_with_two_workers_and_logrotate(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.log"
    config = settings_file(tmp_path, upstream, deny=["test/big"])
    mirror = start_with(start_mirror, config, ("--audit-log", str(audit)), workers=2)
    small = upstream.images["library/small:latest"]
    single = upstream.images["test/oci-single:1.0"]
    skopeo_copy_to_dir(f"{mirror.host}/{small.ref}", tmp_path / "anon")  # anonymous
    skopeo_copy_to_dir(f"{mirror.host}/{single.ref}", tmp_path / "alice", creds=ALICE)
    target = f"ops/audit-{uuid.uuid4().hex[:8]}"
    skopeo("copy", "--dest-tls-verify=false", f"--dest-creds={ALICE}",
           f"dir:{tmp_path / 'anon'}", f"docker://{mirror.host}/{target}:1")
    assert get(f"{mirror.url}/v2/test/big/manifests/1.0").status_code == 403  # the policy
    bob = get(f"{mirror.url}/v2/private/secret/manifests/1.0", auth=("bob", "bobpw"))
    assert bob.status_code == 403, bob.text  # the upstream
    # A burst over many connections, so both workers write at once.
    blob = small.blobs[0][0]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: get(f"{mirror.url}/v2/{small.repo}/blobs/{blob}")
                                 .status_code, range(200)))
    assert set(statuses) == {200}
    wait_until("the burst in the audit log",
               lambda: sum(e["reference"] == blob for e in entries(audit)) >= 200)

    found = entries(audit)
    text = audit.read_text()
    assert "alicepw" not in text and "bobpw" not in text and "Bearer" not in text

    def some(**want: Any) -> list[dict[str, Any]]:
        return [e for e in found if all(e[k] == v for k, v in want.items())]

    assert some(user="anonymous", action="pull-manifest", repository=small.repo,
                reference=small.tag, status=200, digest=small.digest)
    assert some(user="anonymous", action="pull-blob", status=200)
    assert some(user="alice", action="pull-manifest", repository=single.repo, status=200)
    assert some(user="alice", action="push-blob", repository=target)
    [manifest] = some(user="alice", action="push-manifest", repository=target, status=201)
    assert manifest["reference"] == "1" and manifest["digest"] == small.digest
    assert some(action="denied", repository="test/big", user="anonymous", status=403)
    assert some(action="denied", repository="private/secret", user="bob", status=403)
    assert {e["cache"] for e in some(reference=blob, status=200)} >= {"hit"}

    # logrotate: rename, then SIGHUP to `mirror serve` (which replaces its workers).
    audit.rename(tmp_path / "audit.log.1")
    assert mirror.proc is not None
    os.kill(mirror.proc.pid, signal.SIGHUP)

    def logged_anew() -> bool:
        get(f"{mirror.url}/v2/{small.repo}/manifests/{small.tag}")
        return bool(entries(audit))

    wait_until("audit lines in the reopened file", logged_anew, timeout=120)
    assert mirror.alive
    assert entries(tmp_path / "audit.log.1")  # the old file is whole
    assert all(e["action"] == "pull-manifest" for e in entries(audit))


def test_audit_log_of_one_worker_reopens_on_sighup(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.log"
    mirror = start_mirror(args=("--audit-log", str(audit)))
    small = upstream.images["library/small:latest"]
    url = f"{mirror.url}/v2/{small.repo}/manifests/{small.tag}"
    assert get(url).status_code == 200
    wait_until("the first line", lambda: len(entries(audit)) == 1)
    audit.rename(tmp_path / "audit.log.1")
    assert mirror.proc is not None
    os.kill(mirror.proc.pid, signal.SIGHUP)

    def logged_anew() -> bool:
        assert get(url).status_code == 200
        return bool(entries(audit))

    wait_until("a line in the reopened file", logged_anew, timeout=30)
    assert mirror.alive, "SIGHUP reopens the audit log; it does not stop the server"
    assert len(entries(tmp_path / "audit.log.1")) >= 1


# -- refresh, pin, unpin -----------------------------------------------------------------------


def test_refresh_is_seen_by_the_next_pull_on_every_worker(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path,
) -> None:
    repo = f"ops/refresh-{uuid.uuid4().hex[:8]}"
    images = [upstream.images[r] for r in ("test/oci-single:1.0", "test/docker-v2s2:1.0",
                                           "library/small:latest")]
    copy_upstream(upstream, images[0].ref, f"{repo}:t")
    mirror = start_mirror(workers=2, args=("--tag-ttl", "3600"),
                          env={"MIRROR_ADMIN_TOKEN": ADMIN_TOKEN})

    def pulls(n: int = 12) -> set[str]:
        return {digest_of_tag(mirror, repo, "t") for _ in range(n)}

    assert pulls() == {images[0].digest}  # both workers have it cached now
    copy_upstream(upstream, images[1].ref, f"{repo}:t")  # the tag moves upstream
    assert pulls() == {images[0].digest}, "tag_ttl 3600: the cache does not notice"
    refreshed = mirror_cli("cache", "refresh", f"docker.io/{repo}:t",
                           "--cache-dir", str(mirror.cache_dir))
    assert refreshed.returncode == 0, refreshed.stderr
    assert "refreshed" in refreshed.stdout
    assert pulls() == {images[1].digest}, "every worker sees the upstream's digest at once"

    copy_upstream(upstream, images[2].ref, f"{repo}:t")
    assert pulls() == {images[1].digest}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    answer = httpx.post(f"{mirror.url}/admin/refresh", json={"ref": f"{repo}:t"},
                        headers=admin, trust_env=False, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["dropped"] == [images[1].digest]
    assert pulls() == {images[2].digest}


def test_a_pinned_image_survives_an_eviction_pass(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path,
) -> None:
    small = upstream.images["library/small:latest"]
    single = upstream.images["test/oci-single:1.0"]
    big = upstream.images["test/big:1.0"]
    mirror = start_mirror(args=("--max-cache-size", "60MB"))
    cache = mirror.cache_dir
    skopeo_copy_to_dir(f"{mirror.host}/{small.ref}", tmp_path / "small")
    skopeo_copy_to_dir(f"{mirror.host}/{single.ref}", tmp_path / "single")
    pinned = mirror_cli("cache", "pin", small.ref, "--cache-dir", str(cache))
    assert pinned.returncode == 0 and "pinned docker.io/library/small:latest" in pinned.stdout
    kept = [small.digest, *(d for d, _ in small.blobs)]

    def evicted(image: Any) -> bool:
        return not any(blob_path(cache, d).exists() for d, _ in image.blobs)

    layer = max(big.blobs, key=lambda blob: blob[1])[0]
    skopeo_copy_to_dir(f"{mirror.host}/{big.ref}", tmp_path / "big")  # 100 MiB: over budget
    wait_until("an eviction pass",
               lambda: evicted(single) and not blob_path(cache, layer).exists())
    assert all(blob_path(cache, d).exists() for d in kept), "the pinned image stays"
    # The pass logs its summary after its removals: wait for the line, not only the files.
    wait_until("the eviction pass's log line", lambda: "evicted" in mirror.log_text())

    unpinned = mirror_cli("cache", "unpin", small.ref, "--cache-dir", str(cache))
    assert unpinned.returncode == 0, unpinned.stderr
    skopeo_copy_to_dir(f"{mirror.host}/{big.ref}", tmp_path / "big-again")
    wait_until("the unpinned image evicted", lambda: evicted(small))
    missing = mirror_cli("cache", "unpin", small.ref, "--cache-dir", str(cache))
    assert missing.returncode == 1 and "not pinned" in missing.stderr


# -- upstream rate limits ----------------------------------------------------------------------


def add_fake_image(fake: FakeUpstream, tag: str) -> str:
    config = json.dumps({"os": "linux", "architecture": "amd64", "tag": tag}).encode()
    layer = os.urandom(2000)
    blobs = [fake.add_blob(config), fake.add_blob(layer)]
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": blobs[0], "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": blobs[1], "size": len(layer)}],
    }).encode()
    import hashlib
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    fake.manifests[tag] = fake.manifests[digest] = ("application/vnd.oci.image.manifest.v1+json",
                                                    manifest)
    return digest


def gauges(mirror: MirrorProc) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{mirror.url}/metrics", trust_env=False, timeout=10).text
    return {f"{s.name}{{{s.labels.get('upstream', '')}}}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("mirror_upstream_ratelimit_")}


def test_rate_limit_headers_reach_the_gauges_and_the_reserve(
    start_mirror: StartMirror, tmp_path: Path,
) -> None:
    with FakeUpstream(ratelimit=(100, 50)) as fake:
        digest = add_fake_image(fake, "a")
        add_fake_image(fake, "b")
        mirror = start_mirror(upstreams=[("fake", fake.url)], args=("--tag-ttl", "0"),
                              env={"MIRROR_RATELIMIT_RESERVE": "10%"})
        assert gauges(mirror) == {"mirror_upstream_ratelimit_limit{fake}": 0,
                                  "mirror_upstream_ratelimit_remaining{fake}": 0}
        url = f"{mirror.url}/v2/owner/img/manifests/a"
        assert get(url).status_code == 200
        assert gauges(mirror) == {"mirror_upstream_ratelimit_limit{fake}": 100,
                                  "mirror_upstream_ratelimit_remaining{fake}": 49}
        fake.ratelimit = (100, 5)
        assert "warning" not in get(url).headers  # revalidated: the HEAD shows 5 left
        assert gauges(mirror)["mirror_upstream_ratelimit_remaining{fake}"] == 5
        heads = fake.count("HEAD", "/manifests/a")
        for _ in range(5):
            stale = get(url)
            assert stale.status_code == 200 and stale.headers["docker-content-digest"] == digest
            assert stale.headers["warning"].startswith('299 - "served from the cache: the '
                                                       "upstream's rate limit")
        assert fake.count("HEAD", "/manifests/a") == heads, "no budget spent on revalidation"
        assert get(f"{mirror.url}/v2/owner/img/manifests/b").status_code == 200  # lacked
        wait_until("the warning logged", lambda: "rate limit nearly used up" in
                   mirror.log_text(), timeout=10)


# -- tags deleted upstream ---------------------------------------------------------------------


def test_deleted_tags_are_served_only_when_enabled(
    upstream: Upstream, start_mirror: StartMirror, tmp_path: Path,
) -> None:
    image = upstream.images["test/oci-single:1.0"]
    repo = f"ops/deleted-{uuid.uuid4().hex[:8]}"
    copy_upstream(upstream, image.ref, f"{repo}:t")
    serving = start_with(start_mirror, settings_file(tmp_path, upstream, serve_deleted=True),
                         ("--tag-ttl", "0"))
    plain = start_mirror(args=("--tag-ttl", "0"))
    for mirror in (serving, plain):
        skopeo_copy_to_dir(f"{mirror.host}/{repo}:t", tmp_path / f"{mirror.port}")
    skopeo("delete", "--tls-verify=false", f"--creds={ALICE}",
           f"docker://{upstream.host}/{repo}:t")

    served = get(f"{serving.url}/v2/{repo}/manifests/t")
    assert served.status_code == 200 and served.headers["docker-content-digest"] == image.digest
    assert served.headers["warning"] == ('299 - "served from the cache: the upstream no longer '
                                         'has this tag"')
    skopeo_copy_to_dir(f"{serving.host}/{repo}:t", tmp_path / "after")  # a real client too
    text = httpx.get(f"{serving.url}/metrics", trust_env=False).text
    assert 'mirror_cache_lookups_total{kind="tag",result="deleted"} 2.0' in text

    gone = get(f"{plain.url}/v2/{repo}/manifests/t")
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    text = httpx.get(f"{plain.url}/metrics", trust_env=False).text
    assert 'mirror_cache_lookups_total{kind="tag",result="deleted"} 0.0' in text
