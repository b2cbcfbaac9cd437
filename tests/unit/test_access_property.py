"""The access model as a property: whatever sequence of pulls, fishing requests, pushes, 404s,
restarts, outages and offline switches several callers go through, no caller ever receives
bytes of a digest it has not proven it may read.

The upstream's rules are the truth: a caller may read digest D under repository R when the
upstream lets it pull R and R holds D. Offline, and during an outage, a caller also needs to
have proven R before (a 200 from the mirror while the upstream answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.authfake import AuthUpstream, Image
from support.inproc import Mirror, running

from mirror.settings import Settings, Upstream

CALLERS = (None, "alice", "bob")
REPOS = ("private/secret", "public/app", "team/shared", "redteam/pl")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[AuthUpstream, dict[str, Image]]]:
    with AuthUpstream() as fake:
        images = {
            "private/secret": fake.add_image("private/secret", "1", [b"alice only " * 50],
                                             private=True, readers={"alice"}),
            "public/app": fake.add_image("public/app", "1", [b"anyone " * 50]),
            # alice's and bob's repository shares a layer with the public one
            "team/shared": fake.add_image("team/shared", "1", [b"anyone " * 50,
                                                               b"team only " * 50],
                                          private=True, readers={"alice", "bob"}),
        }
        fake.repo("redteam/pl")
        yield fake, images


@dataclass
class Model:
    fake: AuthUpstream
    images: dict[str, Image]
    proven: set[tuple[str | None, str]] = field(default_factory=set)
    offline: bool = False
    down: bool = False

    def may(self, caller: str | None, repo: str, digest: str) -> bool:
        record = self.fake.repos.get(repo)
        if record is None or digest not in record.content:
            return False
        return not record.private or caller in record.readers

    def check(self, caller: str | None, repo: str, body: bytes, online: bool) -> None:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        assert self.may(caller, repo, digest), (caller, repo, digest)
        if online:
            self.proven.add((caller, repo))
        else:
            assert (caller, repo) in self.proven, ("offline, never proven", caller, repo)


action = st.one_of(
    st.tuples(st.just("pull"), st.sampled_from(CALLERS), st.sampled_from(REPOS[:3])),
    st.tuples(st.just("fish"), st.sampled_from(CALLERS), st.sampled_from(REPOS),
              st.sampled_from(REPOS[:3]), st.integers(0, 2)),
    st.tuples(st.just("missing"), st.sampled_from(CALLERS), st.sampled_from(REPOS[:3])),
    st.tuples(st.just("push"), st.sampled_from(REPOS[:3]), st.integers(0, 2)),
    st.tuples(st.just("restart"), st.booleans()),
    st.tuples(st.just("outage"), st.booleans()),
)


async def play(model: Model, steps: list[tuple[object, ...]], cache: Path) -> None:
    fake = model.fake
    upstream = Upstream("fake", fake.url)

    def config() -> Settings:
        return Settings(cache_dir=cache, upstreams=(upstream,), scrub_rate=0,
                        offline=model.offline, negative_ttl=30)

    stack = contextlib.AsyncExitStack()
    mirror: Mirror = await stack.enter_async_context(running(config()))
    try:
        for step in steps:
            online = not model.offline and not model.down
            kind = step[0]
            if kind == "restart":
                await stack.aclose()
                model.offline = bool(step[1])
                stack = contextlib.AsyncExitStack()
                mirror = await stack.enter_async_context(running(config()))
            elif kind == "outage":
                model.down = fake.down = bool(step[1])
            elif kind == "pull":
                _, caller, repo = step
                await _pull(mirror, model, caller, repo, online)  # type: ignore[arg-type]
            elif kind == "missing":
                _, caller, repo = step
                response = await mirror.caller(caller).get(f"/v2/{repo}/manifests/nope")
                assert response.status_code != 200
            elif kind == "fish":
                _, caller, name, source, index = step
                image = model.images[str(source)]
                digest = [image.digest, *image.blobs][int(index) % (1 + len(image.blobs))]
                kind_ = "manifests" if digest == image.digest else "blobs"
                response = await mirror.caller(caller).get(f"/v2/{name}/{kind_}/{digest}")
                if response.status_code == 200:
                    model.check(caller, str(name), response.content, online)  # type: ignore
            elif kind == "push" and online:
                _, source, index = step
                image = model.images[str(source)]
                digest = [image.digest, *image.blobs][int(index) % (1 + len(image.blobs))]
                attack = json.dumps({"schemaVersion": 2, "mediaType":
                                     "application/vnd.oci.image.manifest.v1+json",
                                     "config": {"mediaType": "x", "size": 1, "digest":
                                                "sha256:" + "0" * 64},
                                     "layers": [], "blobs": [{"digest": digest}],
                                     "manifests": [{"digest": digest}]}).encode()
                bob = mirror.caller("bob")
                await bob.request("PUT", "/v2/redteam/pl/manifests/x", content=attack,
                                  headers={"Content-Type":
                                           "application/vnd.oci.image.manifest.v1+json"})
    finally:
        await stack.aclose()


async def _pull(mirror: Mirror, model: Model, caller: str | None, repo: str,
                online: bool) -> None:
    client = mirror.caller(caller)
    manifest = await client.get(f"/v2/{repo}/manifests/1")
    if manifest.status_code != 200:
        return
    model.check(caller, repo, manifest.content, online)
    doc = json.loads(manifest.content)
    for desc in [doc["config"], *doc["layers"]]:
        blob = await client.get(f"/v2/{repo}/blobs/{desc['digest']}")
        if blob.status_code == 200:
            model.check(caller, repo, blob.content, online)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(steps=st.lists(action, min_size=4, max_size=14))
def test_no_caller_ever_gets_bytes_it_has_not_proven(
    world: tuple[AuthUpstream, dict[str, Image]], steps: list[tuple[object, ...]]
) -> None:
    fake, images = world
    fake.down = False
    # Everyone starts by pulling something, so later steps have cached content to fish for.
    steps = [("pull", "alice", "private/secret"), ("pull", "bob", "team/shared"), *steps]
    with tempfile.TemporaryDirectory() as cache:
        model = Model(fake, images)
        try:
            asyncio.run(play(model, steps, Path(cache)))
        finally:
            fake.down = False
