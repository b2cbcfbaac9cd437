"""The metadata interface's contract (`mirror.metadata.base`), run against both
implementations: SQLite in a temporary directory and Redis on a redis-server of its own."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from support.cluster_fixtures import require_binaries
from support.redisd import RedisServer

from mirror import metadata as metadata_module
from mirror.metadata import redis as redis_module
from mirror.metadata import redis_client, sqlite_db
from mirror.metadata import sqlite as sqlite_module
from mirror.metadata.base import (
    ContentRecord,
    Grant,
    Metadata,
    MetadataError,
    MetadataUnavailable,
    PullCount,
    RefRecord,
    TagRecord,
)
from mirror.metadata.redis import RedisMetadata
from mirror.metadata.sqlite import SqliteMetadata

pytestmark = pytest.mark.anyio
T = TypeVar("T")
New = Callable[[], Metadata]

OCI = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def digest(n: int | str) -> str:
    return f"sha256:{str(n).rjust(64, '0')}"


D1, D2, D3, D4 = (digest(n) for n in (1, 2, 3, 4))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "redis"])
def new(request: pytest.FixtureRequest, tmp_path: Path) -> New:
    """Makes (unopened) stores over one shared backend, emptied for the test."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return lambda: RedisMetadata(url)
    return lambda: SqliteMetadata(tmp_path / "metadata.db")


@pytest.fixture
async def meta(new: New) -> AsyncIterator[Metadata]:
    store = new()
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> int:
    """Listings read pages of 3 rows, so a few rows cross several pages."""
    for module in (sqlite_module, sqlite_db, redis_module, redis_client):
        monkeypatch.setattr(module, "PAGE", 3)
    return 3


async def collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


def record(tag: str, d: str, *, upstream: str = "docker.io", repo: str = "library/alpine",
           at: float = 1000.0, media_type: str = OCI, size: int = 100) -> TagRecord:
    return TagRecord(upstream, repo, tag, d, media_type, size, at)


# -- lifecycle ------------------------------------------------------------------------------


async def test_ping(meta: Metadata) -> None:
    assert await meta.ping()


async def test_secret_is_created_once_and_shared(meta: Metadata, new: New) -> None:
    first = await meta.secret()
    assert len(first) == 32
    other = new()
    await other.open()
    try:
        assert await other.secret() == first
    finally:
        await other.close()
    assert await meta.secret() == first


# -- tags -----------------------------------------------------------------------------------


async def test_tag_records_per_accept_set_and_the_latest(meta: Metadata) -> None:
    oci, docker = (OCI,), (DOCKER, OCI)
    assert await meta.tag("docker.io", "library/alpine", "3", oci) is None
    first = record("3", D1, at=1000.0)
    await meta.set_tag(first, oci)
    assert await meta.tag("docker.io", "library/alpine", "3", oci) == first
    assert await meta.tag("docker.io", "library/alpine", "3", None) == first
    assert await meta.tag("docker.io", "library/alpine", "3", docker) is None

    second = record("3", D2, at=1001.5, media_type=DOCKER, size=7)
    await meta.set_tag(second, docker)
    assert await meta.tag("docker.io", "library/alpine", "3", oci) == first
    assert await meta.tag("docker.io", "library/alpine", "3", docker) == second
    assert await meta.tag("docker.io", "library/alpine", "3", None) == second

    latest_only = record("3", D3, at=1002.0)
    await meta.set_tag(latest_only, None)  # the latest, for no particular Accept set
    assert await meta.tag("docker.io", "library/alpine", "3", None) == latest_only
    assert await meta.tag("docker.io", "library/alpine", "3", oci) == first
    assert await meta.tag_digests("docker.io", "library/alpine", "3") == [D1, D2, D3]
    # other tags, repositories and upstreams are other records
    assert await meta.tag("docker.io", "library/alpine", "31", None) is None
    assert await meta.tag("docker.io", "library/alpine/x", "3", None) is None
    assert await meta.tag("ghcr.io", "library/alpine", "3", None) is None


async def test_times_are_kept_exactly(meta: Metadata) -> None:
    at = time.time()
    await meta.set_tag(record("t", D1, at=at), None)
    got = await meta.tag("docker.io", "library/alpine", "t", None)
    assert got is not None and got.at == at


async def test_drop_tag_returns_the_digests_of_every_record(meta: Metadata) -> None:
    await meta.set_tag(record("3", D2), (OCI,))
    await meta.set_tag(record("3", D1), (DOCKER,))
    await meta.set_tag(record("3", D1), (INDEX,))
    await meta.set_tag(record("4", D3), None)
    assert await meta.tag_digests("docker.io", "library/alpine", "3") == [D1, D2]
    assert await meta.drop_tag("docker.io", "library/alpine", "3") == [D1, D2]
    for accept in ((OCI,), (DOCKER,), None):
        assert await meta.tag("docker.io", "library/alpine", "3", accept) is None
    assert await meta.tag_digests("docker.io", "library/alpine", "3") == []
    assert await meta.drop_tag("docker.io", "library/alpine", "3") == []
    assert [r.tag for r in await meta.repo_tags("docker.io", "library/alpine")] == ["4"]
    assert await meta.named(D3) and not await meta.named(D1)


async def test_repo_tags_in_tag_order_by_page(meta: Metadata) -> None:
    tags = [f"v{n}" for n in range(12)] + ["latest", "1.0", "1.0-rc"]
    shuffled = random.Random(7).sample(tags, len(tags))
    for n, tag in enumerate(shuffled):
        await meta.set_tag(record(tag, digest(n), at=2000.0 + n), (OCI,))
    # neighbours whose names share a prefix stay out
    await meta.set_tag(record("zz", D1, repo="library/alpine/sub"), None)
    await meta.set_tag(record("zz", D1, repo="library/alpinex"), None)
    await meta.set_tag(record("zz", D1, upstream="docker.io2"), None)

    pages: list[list[str]] = []
    after = ""
    for _ in range(len(tags)):
        page = await meta.repo_tags("docker.io", "library/alpine", after=after, limit=4)
        if not page:
            break
        pages.append([r.tag for r in page])
        after = page[-1].tag
    assert [t for page in pages for t in page] == sorted(tags)
    assert all(len(page) == 4 for page in pages[:-1])
    full = await meta.repo_tags("docker.io", "library/alpine")
    assert [r.tag for r in full] == sorted(tags)
    by_tag = {r.tag: r for r in full}
    assert by_tag[shuffled[5]] == record(shuffled[5], digest(5), at=2005.0)
    assert await meta.repo_tags("docker.io", "library/alpine", after="v9") == []
    assert await meta.repo_tags("docker.io", "nothing/here") == []


async def test_repo_tags_gives_the_latest_records(meta: Metadata) -> None:
    await meta.set_tag(record("a", D1, at=1.0), (OCI,))
    await meta.set_tag(record("a", D2, at=2.0), (DOCKER,))
    assert await meta.repo_tags("docker.io", "library/alpine") == [record("a", D2, at=2.0)]


async def test_iter_tags_in_order_across_pages(meta: Metadata, small_pages: int) -> None:
    names = [("docker.io", "library/alpine"), ("docker.io", "library/alpine/sub"),
             ("docker.io", "library/alpine-x"), ("docker.io", "a"), ("ghcr.io", "o/img"),
             ("docker.io2", "b"), ("a.b", "c")]
    expected: list[TagRecord] = []
    for i, (upstream, repo) in enumerate(names):
        for j in range(small_pages * 2 + 1):  # more tags than a page, per repository
            r = record(f"t{j}", digest(i * 100 + j), upstream=upstream, repo=repo, at=i + j)
            await meta.set_tag(r, (OCI,))
            await meta.set_tag(r, None)
            expected.append(r)
    await meta.add_ref(RefRecord("docker.io", "refs/only", D1, OCI, 1))  # a repo, no tags
    expected.sort(key=lambda r: (r.upstream, r.repo, r.tag))
    assert await collect(meta.iter_tags()) == expected


async def test_pull_counts_of_recorded_tags(meta: Metadata) -> None:
    for tag in ("a", "b", "c"):
        await meta.set_tag(record(tag, D1), None)
    await meta.set_tag(record("x", D2, upstream="ghcr.io", repo="o/img"), None)
    await meta.add_pulls({("docker.io", "library/alpine", "a"): 2,
                          ("docker.io", "library/alpine", "b"): 5,
                          ("ghcr.io", "o/img", "x"): 1,
                          ("docker.io", "library/alpine", "nope"): 9,  # no record: uncounted
                          ("docker.io", "library/alpine", "c"): 0})
    await meta.add_pulls({("docker.io", "library/alpine", "a"): 1})
    assert await meta.pulls("docker.io", "library/alpine", ["a", "b", "c", "nope"]) == {
        "a": 3, "b": 5}
    assert await meta.pulls("ghcr.io", "o/img", ["x"]) == {"x": 1}
    assert await meta.pulls("ghcr.io", "library/alpine", ["a"]) == {}
    assert await meta.pulls("docker.io", "library/alpine", []) == {}
    assert await meta.most_pulled(10) == [
        PullCount("docker.io", "library/alpine", "b", 5),
        PullCount("docker.io", "library/alpine", "a", 3),
        PullCount("ghcr.io", "o/img", "x", 1)]
    assert await meta.most_pulled(1, offset=1) == [
        PullCount("docker.io", "library/alpine", "a", 3)]
    assert await meta.most_pulled(0) == []
    assert await meta.most_pulled(5, offset=3) == []
    # Forgetting a tag forgets its count; recorded again, it counts from zero.
    await meta.drop_tag("docker.io", "library/alpine", "b")
    assert await meta.pulls("docker.io", "library/alpine", ["b"]) == {}
    assert [p.tag for p in await meta.most_pulled(10)] == ["a", "x"]
    await meta.set_tag(record("b", D2), None)
    await meta.add_pulls({("docker.io", "library/alpine", "b"): 1})
    assert await meta.pulls("docker.io", "library/alpine", ["b"]) == {"b": 1}


async def test_many_pull_counts_in_one_batch(meta: Metadata) -> None:
    tags = [f"t{n:04}" for n in range(600)]  # more than one script call's batch
    for tag in tags:
        await meta.set_tag(record(tag, D1), None)
    await meta.add_pulls({("docker.io", "library/alpine", t): n + 1
                          for n, t in enumerate(tags)})
    top = await meta.most_pulled(3)
    assert [(p.tag, p.count) for p in top] == [("t0599", 600), ("t0598", 599), ("t0597", 598)]
    counts = await meta.pulls("docker.io", "library/alpine", tags[:500])
    assert counts == {t: n + 1 for n, t in enumerate(tags[:500])}


async def test_named_and_tagged(meta: Metadata) -> None:
    assert not await meta.named(D1)
    await meta.set_tag(record("3", D1), (OCI,))
    await meta.set_tag(record("3", D2), (DOCKER,))  # latest D2; the OCI record still D1
    assert await meta.named(D1) and await meta.named(D2)
    assert await meta.tagged("docker.io", "library/alpine", D1)
    assert await meta.tagged("docker.io", "library/alpine", D2)
    assert not await meta.tagged("docker.io", "library/alpin", D1)
    assert not await meta.tagged("docker.io", "library/alpine/x", D1)
    assert not await meta.tagged("ghcr.io", "library/alpine", D1)
    await meta.set_tag(record("other", D1), None)
    assert await meta.tags_naming("docker.io", "library/alpine", D1) == ["3", "other"]
    assert await meta.tags_naming("docker.io", "library/alpin", D1) == []
    await meta.drop_tag("docker.io", "library/alpine", "other")

    await meta.set_tag(record("3", D2), (OCI,))  # no record names D1 any more
    assert not await meta.named(D1)
    assert not await meta.tagged("docker.io", "library/alpine", D1)
    assert await meta.tagged("docker.io", "library/alpine", D2)

    # two tags name D2: dropping one keeps it named and tagged
    await meta.set_tag(record("latest", D2), None)
    await meta.drop_tag("docker.io", "library/alpine", "3")
    assert await meta.named(D2) and await meta.tagged("docker.io", "library/alpine", D2)
    await meta.drop_tag("docker.io", "library/alpine", "latest")
    assert not await meta.named(D2) and not await meta.tagged("docker.io", "library/alpine", D2)

    await meta.add_ref(RefRecord("docker.io", "library/alpine", D3, OCI, 10))
    assert await meta.named(D3)
    assert not await meta.tagged("docker.io", "library/alpine", D3)  # a ref is not a tag
    await meta.drop_ref("docker.io", "library/alpine", D3)
    assert not await meta.named(D3)
    await meta.pin("owner", [D4])
    assert await meta.named(D4)
    await meta.unpin("owner")
    assert not await meta.named(D4)


# -- manifests ------------------------------------------------------------------------------


async def test_manifests_children_and_parents(meta: Metadata) -> None:
    assert await meta.media_type(D1) is None
    assert await meta.children(D1) is None
    assert await meta.parents(D3) == []
    await meta.add_manifest(D1, INDEX, [D3, D2, D3])
    await meta.add_manifest(D4, OCI, [])
    assert await meta.media_type(D1) == INDEX
    assert await meta.children(D1) == [D2, D3]
    assert await meta.children(D4) == []  # a recorded manifest that names nothing
    await meta.add_manifest(D2, OCI, [D3])
    assert await meta.parents(D3) == [D1, D2]
    assert await meta.parents(D2) == [D1]
    assert await meta.parents(D1) == []
    await meta.add_manifest(D1, OCI, [D4])  # again: the type replaced, children added
    assert await meta.media_type(D1) == OCI
    assert await meta.children(D1) == [D2, D3, D4]


# -- content --------------------------------------------------------------------------------


async def test_content_add_drop_and_totals(meta: Metadata) -> None:
    assert await meta.totals() == (0, 0)
    assert await meta.content(D1) is None
    assert await meta.add_content(D1, 100, "docker.io", 10.0)
    assert await meta.add_content(D2, 50, None, 11.0)
    assert not await meta.add_content(D1, 100, "ghcr.io", 12.0)  # known: not new
    assert await meta.totals() == (150, 2)
    assert await meta.content(D1) == ContentRecord(D1, 100, 12.0)  # the commit is a use
    assert not await meta.add_content(D1, 100, None, 5.0)
    assert await meta.content(D1) == ContentRecord(D1, 100, 12.0)  # never set back
    assert await meta.holds("docker.io", D1) and await meta.holds("ghcr.io", D1)
    assert not await meta.holds("docker.io", D2)

    assert await meta.drop_content([D1, D3]) == 100
    assert await meta.totals() == (50, 1)
    assert await meta.content(D1) is None
    assert not await meta.holds("docker.io", D1)  # the holders go with the content
    assert await meta.drop_content([D1]) == 0
    assert await meta.drop_content([]) == 0
    assert await meta.totals() == (50, 1)
    assert await meta.add_content(D1, 100, None, 20.0)  # new again
    assert await meta.totals() == (150, 2)


async def test_contents_reads_several_records_at_once(meta: Metadata) -> None:
    await meta.add_content(D1, 10, "docker.io", 100.0)
    await meta.add_content(D2, 20, None, 200.0)
    assert await meta.contents([D1, D3, D2, D1]) == {
        D1: ContentRecord(D1, 10, 100.0), D2: ContentRecord(D2, 20, 200.0)}
    assert await meta.contents([]) == {}
    await meta.drop_content([D1])
    assert await meta.contents([D1, D2]) == {D2: ContentRecord(D2, 20, 200.0)}


async def test_large_sizes_are_exact(meta: Metadata) -> None:
    big = 3 * 10**15 + 7  # past what a double's short text form keeps
    assert await meta.add_content(D1, big, None, 1.0)
    assert await meta.add_content(D2, big, None, 1.0)
    assert await meta.totals() == (2 * big, 2)
    assert await meta.drop_content([D1]) == big
    assert await meta.totals() == (big, 1)


async def test_concurrent_adds_keep_totals_exact(meta: Metadata, new: New) -> None:
    other = new()  # a second process's store: the races cross connections
    await other.open()
    try:
        stores = [meta, other]
        sizes = {digest(n): 1000 + n for n in range(20)}
        jobs = [stores[i % 2].add_content(d, size, f"u{i % 3}", 100.0 + i)
                for i in range(10) for d, size in sizes.items()]
        random.Random(3).shuffle(jobs)
        results = await asyncio.gather(*jobs)
        assert sum(results) == len(sizes)  # each digest was new exactly once
        assert await meta.totals() == (sum(sizes.values()), len(sizes))

        dropped = list(sizes)[:10]
        freed = await asyncio.gather(*(stores[i % 2].drop_content([d])
                                       for i in range(4) for d in dropped))
        assert sum(freed) == sum(sizes[d] for d in dropped)
        assert await meta.totals() == (sum(sizes[d] for d in list(sizes)[10:]), 10)
    finally:
        await other.close()


async def test_oldest_in_lru_order_without_pins(meta: Metadata, small_pages: int) -> None:
    uses = {digest(n): float(n % 5) for n in range(16)}  # ties: equal uses, digest order
    for d, at in uses.items():
        await meta.add_content(d, 10, None, at)
    await meta.pin("img", [digest(0), digest(7)])
    expected = sorted(((at, d) for d, at in uses.items() if d not in (digest(0), digest(7))))
    got = await collect(meta.oldest(before=100.0))
    assert [(r.used, r.digest) for r in got] == expected
    assert all(r.size == 10 for r in got)
    assert [r.digest for r in await collect(meta.oldest(before=2.0))] == [
        d for at, d in expected if at < 2.0]
    assert await collect(meta.oldest(before=0.0)) == []


async def test_oldest_while_the_reader_removes_what_it_read(meta: Metadata,
                                                            small_pages: int) -> None:
    for n in range(20):
        await meta.add_content(digest(n), 1, None, float(n // 7))
    seen = []
    async for r in meta.oldest(before=10.0):
        seen.append(r.digest)
        await meta.drop_content([r.digest])  # what an eviction pass does
        if len(seen) == 3:  # a use elsewhere moves one already ahead out of the way
            await meta.touch({digest(19): 50.0})
    assert seen == [digest(n) for n in range(19)]
    assert await meta.totals() == (1, 1)


async def test_touch_never_sets_a_use_back(meta: Metadata) -> None:
    await meta.add_content(D1, 1, None, 10.0)
    await meta.add_content(D2, 1, None, 10.0)
    await meta.touch({D1: 20.0, D2: 5.0, D3: 30.0})
    assert await meta.content(D1) == ContentRecord(D1, 1, 20.0)
    assert await meta.content(D2) == ContentRecord(D2, 1, 10.0)
    assert await meta.content(D3) is None  # not recorded content: not created
    await meta.touch({D1: 15.0})
    assert await meta.content(D1) == ContentRecord(D1, 1, 20.0)
    await meta.touch({})
    assert [r.digest for r in await collect(meta.oldest(before=100.0))] == [D2, D1]


async def test_iter_content_in_digest_order(meta: Metadata, small_pages: int) -> None:
    numbers = random.Random(5).sample(range(100), 10)
    for n in numbers:
        await meta.add_content(digest(n), n, None, float(n))
    everything = await collect(meta.iter_content())
    assert everything == [ContentRecord(digest(n), n, float(n)) for n in sorted(numbers)]
    middle = sorted(numbers)[4]
    assert await collect(meta.iter_content(after=digest(middle))) == everything[5:]


async def test_holders(meta: Metadata) -> None:
    assert not await meta.holds("docker.io", D1)
    await meta.add_holder(D1, "docker.io")
    await meta.add_holder(D1, "docker.io")
    assert await meta.holds("docker.io", D1)
    assert not await meta.holds("ghcr.io", D1)
    assert not await meta.holds("docker.io", D2)


# -- access facts ---------------------------------------------------------------------------


async def test_links(meta: Metadata) -> None:
    await meta.link("docker.io", "library/alpine", [D1, D2])
    await meta.link("docker.io", "library/alpine", [])
    assert await meta.linked("docker.io", "library/alpine", D1)
    assert not await meta.linked("docker.io", "library/alpine/x", D1)
    assert not await meta.linked("ghcr.io", "library/alpine", D1)
    await meta.unlink("docker.io", "library/alpine", D1)
    await meta.unlink("docker.io", "library/alpine", D3)
    assert not await meta.linked("docker.io", "library/alpine", D1)
    assert await meta.linked("docker.io", "library/alpine", D2)


async def test_grants(meta: Metadata) -> None:
    assert await meta.granted("docker.io", "r", "alice") is None
    await meta.grant(Grant("docker.io", "r", "alice", 100.0, False))
    assert await meta.granted("docker.io", "r", "alice") == Grant("docker.io", "r", "alice",
                                                                  100.0, False)
    await meta.grant(Grant("docker.io", "r", "alice", 90.0, False))  # older: the newer stays
    assert (await meta.granted("docker.io", "r", "alice") or Grant("", "", "", 0, True)).at \
        == 100.0
    await meta.grant(Grant("docker.io", "r", "alice", 95.0, True))  # durable, older
    assert await meta.granted("docker.io", "r", "alice") == Grant("docker.io", "r", "alice",
                                                                  100.0, True)
    await meta.grant(Grant("docker.io", "r", "alice", 120.5, False))  # durable stays
    assert await meta.granted("docker.io", "r", "alice") == Grant("docker.io", "r", "alice",
                                                                  120.5, True)
    assert await meta.granted("docker.io", "r", "bob") is None
    assert await meta.granted("docker.io", "r2", "alice") is None
    assert await meta.granted("ghcr.io", "r", "alice") is None
    await meta.revoke("docker.io", "r", "alice")
    assert await meta.granted("docker.io", "r", "alice") is None
    await meta.revoke("docker.io", "r", "alice")


async def test_readable_is_granted_linked_and_held_in_one(meta: Metadata) -> None:
    """The three facts a cached read needs, each exactly as its own operation answers it."""
    alice = Grant("docker.io", "r", "alice", 100.0, False)

    async def facts(upstream: str, repo: str, identity: str,
                    digest_: str) -> tuple[Grant | None, bool, bool]:
        return await meta.readable(upstream, repo, identity, digest_)

    assert await facts("docker.io", "r", "alice", D1) == (None, False, False)
    await meta.link("docker.io", "r", [D1])
    await meta.add_holder(D1, "docker.io")
    assert await facts("docker.io", "r", "alice", D1) == (None, False, False)  # no grant
    await meta.grant(alice)
    assert await facts("docker.io", "r", "alice", D1) == (alice, True, True)
    assert await facts("docker.io", "r", "bob", D1) == (None, False, False)
    assert await facts("docker.io", "r", "alice", D2) == (alice, False, False)  # not linked
    await meta.link("docker.io", "r", [D2])
    assert await facts("docker.io", "r", "alice", D2) == (alice, True, False)  # not held
    await meta.add_holder(D2, "ghcr.io")  # another upstream's delivery
    assert await facts("docker.io", "r", "alice", D2) == (alice, True, False)
    await meta.grant(Grant("ghcr.io", "r", "alice", 100.0, False))
    assert await facts("ghcr.io", "r", "alice", D1) == (
        Grant("ghcr.io", "r", "alice", 100.0, False), False, False)
    await meta.revoke("docker.io", "r", "alice")
    assert await facts("docker.io", "r", "alice", D1) == (None, False, False)


async def test_prune_grants_drops_only_old_transient_ones(meta: Metadata,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_module, "BATCH", 4)  # several prune steps
    for n in range(10):
        await meta.grant(Grant("docker.io", f"r{n % 3}", f"old{n}", 100.0 + n, False))
    await meta.grant(Grant("docker.io", "r0", "kept", 50.0, True))
    await meta.grant(Grant("docker.io", "r1", "new", 500.0, False))
    await meta.grant(Grant("docker.io", "r2", "renewed", 10.0, False))
    await meta.grant(Grant("docker.io", "r2", "renewed", 400.0, False))
    await meta.grant(Grant("docker.io", "r0", "became-durable", 10.0, False))
    await meta.grant(Grant("docker.io", "r0", "became-durable", 11.0, True))
    assert await meta.prune_grants(before=300.0) == 10
    for n in range(10):
        assert await meta.granted("docker.io", f"r{n % 3}", f"old{n}") is None
    for repo, identity in (("r0", "kept"), ("r1", "new"), ("r2", "renewed"),
                           ("r0", "became-durable")):
        assert await meta.granted("docker.io", repo, identity) is not None
    assert await meta.prune_grants(before=300.0) == 0
    assert await meta.prune_grants(before=1000.0) == 2  # new and renewed
    assert await meta.granted("docker.io", "r0", "kept") is not None
    await meta.revoke("docker.io", "r0", "kept")
    assert await meta.prune_grants(before=1000.0) == 0


async def test_upstream_names_and_iter_repos(meta: Metadata, small_pages: int) -> None:
    assert await meta.upstream_names() == []
    repos = ["library/alpine", "library/alpine/sub", "library/alpine-x", "a", "b/c", "z"]
    for repo in repos:
        await meta.set_tag(record("t", D1, repo=repo), None)
    await meta.add_ref(RefRecord("docker.io2", "only/ref", D2, OCI, 1))
    await meta.set_tag(record("t", D1, upstream="a.b", repo="x"), None)
    assert await meta.upstream_names() == ["a.b", "docker.io", "docker.io2"]
    assert await collect(meta.iter_repos("docker.io")) == sorted(repos)
    assert await collect(meta.iter_repos("docker.io", after="library/alpine")) == [
        "library/alpine-x", "library/alpine/sub", "z"]
    assert await collect(meta.iter_repos("docker.io2")) == ["only/ref"]
    assert await collect(meta.iter_repos("docker")) == []

    await meta.drop_ref("docker.io2", "only/ref", D2)
    await meta.drop_tag("docker.io", "z", "t")
    assert await meta.upstream_names() == ["a.b", "docker.io"]
    assert "z" not in await collect(meta.iter_repos("docker.io"))


async def test_a_repo_stays_listed_while_a_tag_or_a_ref_names_it(meta: Metadata) -> None:
    await meta.set_tag(record("t", D1, repo="r"), None)
    await meta.add_ref(RefRecord("docker.io", "r", D2, OCI, 1))
    await meta.add_ref(RefRecord("docker.io", "r/x", D2, OCI, 1))  # a neighbour's ref
    await meta.drop_tag("docker.io", "r", "t")
    assert await collect(meta.iter_repos("docker.io")) == ["r", "r/x"]
    await meta.drop_ref("docker.io", "r", D2)
    assert await collect(meta.iter_repos("docker.io")) == ["r/x"]


# -- pins -----------------------------------------------------------------------------------


async def test_pins_shared_by_two_owners(meta: Metadata) -> None:
    await meta.pin("docker.io/a:1", [D1, D2])
    await meta.pin("docker.io/b:1", [D2, D3])
    await meta.pin("docker.io/c:1", [])
    assert all([await meta.pinned(d) for d in (D1, D2, D3)])
    assert not await meta.pinned(D4)
    assert await collect(meta.iter_pins()) == [
        ("docker.io/a:1", D1), ("docker.io/a:1", D2), ("docker.io/b:1", D2),
        ("docker.io/b:1", D3)]
    assert await meta.unpin("docker.io/a:1") == [D1, D2]
    assert not await meta.pinned(D1)
    assert await meta.pinned(D2)  # still pinned by the other owner
    assert await meta.unpin("docker.io/a:1") == []
    assert await meta.unpin("docker.io/a") == []  # a prefix of an owner is another owner
    assert await meta.unpin("docker.io/b:1") == [D2, D3]
    assert not await meta.pinned(D2)
    assert await collect(meta.iter_pins()) == []


async def test_iter_pins_across_pages(meta: Metadata, small_pages: int) -> None:
    expected = sorted((f"owner{n % 3}", digest(n)) for n in range(11))
    for owner, d in expected:
        await meta.pin(owner, [d])
    assert await collect(meta.iter_pins()) == expected


# -- refs -----------------------------------------------------------------------------------


async def test_refs(meta: Metadata, small_pages: int) -> None:
    assert await meta.ref("docker.io", "r", D1) is None
    refs = [RefRecord(u, r, digest(n), OCI if n % 2 else INDEX, n)
            for n, (u, r) in enumerate([("docker.io", "r"), ("docker.io", "r"),
                                        ("docker.io", "r/s"), ("docker.io", "r-s"),
                                        ("a.b", "x"), ("ghcr.io", "o/p"), ("ghcr.io", "o/p")])]
    for ref in reversed(refs):
        await meta.add_ref(ref)
    assert await meta.ref("docker.io", "r", digest(1)) == refs[1]
    assert await meta.ref("docker.io", "r/s", digest(1)) is None
    assert await collect(meta.iter_refs()) == sorted(
        refs, key=lambda r: (r.upstream, r.repo, r.digest))
    replaced = RefRecord("docker.io", "r", digest(1), DOCKER, 99)
    await meta.add_ref(replaced)
    assert await meta.ref("docker.io", "r", digest(1)) == replaced
    assert await meta.drop_ref("docker.io", "r", digest(1))
    assert not await meta.drop_ref("docker.io", "r", digest(1))
    assert await meta.ref("docker.io", "r", digest(1)) is None
    assert len(await collect(meta.iter_refs())) == len(refs) - 1


# -- pushes ---------------------------------------------------------------------------------


async def test_pushed(meta: Metadata) -> None:
    assert await meta.pushed("docker.io", "r", "t") == 0.0
    at = time.time()
    await meta.set_pushed("docker.io", "r", "t", at)
    assert await meta.pushed("docker.io", "r", "t") == at
    await meta.set_pushed("docker.io", "r", "t", 5.0)  # a delete after a push, say
    assert await meta.pushed("docker.io", "r", "t") == 5.0
    assert await meta.pushed("docker.io", "r", "u") == 0.0


async def test_generation(meta: Metadata, new: New) -> None:
    assert await meta.generation() == 0
    assert await meta.bump_generation() == 1
    other = new()
    await other.open()
    try:
        assert await other.generation() == 1
        assert await other.bump_generation() == 2
    finally:
        await other.close()
    assert await meta.generation() == 2


# -- uploads --------------------------------------------------------------------------------


async def test_uploads(meta: Metadata, small_pages: int) -> None:
    far = time.time() + 600
    ids = [f"up-{n}" for n in range(8)]
    for n, upload_id in enumerate(ids):
        await meta.put_upload(upload_id, {"n": n, "repo": "r"}, far + n)
    await meta.put_upload("gone", {"n": -1}, time.time() - 1)  # over already
    assert await meta.get_upload("up-3") == {"n": 3, "repo": "r"}
    assert await meta.get_upload("gone") is None
    assert await meta.get_upload("nothing") is None
    assert sorted(await collect(meta.iter_uploads())) == [
        (i, {"n": n, "repo": "r"}) for n, i in enumerate(ids)]
    await meta.put_upload("up-3", {"n": 33}, far)  # replaced
    assert await meta.get_upload("up-3") == {"n": 33}
    await meta.drop_upload("up-3")
    await meta.drop_upload("up-3")
    assert await meta.get_upload("up-3") is None
    assert "up-3" not in dict(await collect(meta.iter_uploads()))


async def test_uploads_expire(meta: Metadata) -> None:
    expires = time.time() + 0.2
    await meta.put_upload("short", {"a": 1}, expires)
    await meta.put_upload("long", {"a": 2}, time.time() + 600)
    assert await meta.get_upload("short") == {"a": 1}
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    assert await meta.get_upload("short") is None
    assert await collect(meta.iter_uploads()) == [("long", {"a": 2})]


# -- locks ----------------------------------------------------------------------------------


async def wait_free(meta: Metadata, name: str, deadline: float) -> None:
    while await meta.holder(name) is not None:
        assert time.monotonic() < deadline, "the lease did not expire"
        await asyncio.sleep(0.02)


async def test_locks(meta: Metadata, new: New) -> None:
    other = new()
    await other.open()
    try:
        assert await meta.holder("evict") is None
        assert await meta.acquire("evict", "a", 30.0)
        assert await meta.holder("evict") == "a"
        assert await other.holder("evict") == "a"
        assert not await other.acquire("evict", "b", 30.0)
        assert await other.acquire("evict", "a", 30.0)  # its owner renews it, anywhere
        assert await meta.acquire("scrub", "b", 30.0)  # another lock
        await other.release("evict", "b")  # not its lock: nothing happens
        assert await meta.holder("evict") == "a"
        await other.release("evict", "a")
        assert await meta.holder("evict") is None
        assert await other.acquire("evict", "b", 30.0)
        assert await meta.holder("scrub") == "b"
    finally:
        await other.close()


async def test_a_lease_expires_and_renewal_extends_it(meta: Metadata) -> None:
    lease = 0.4
    started = time.monotonic()
    assert await meta.acquire("l", "a", lease)
    assert await meta.acquire("l", "a", 5.0)  # renewed: far longer
    await asyncio.sleep(lease + 0.1)
    assert await meta.holder("l") == "a"
    assert not await meta.acquire("l", "b", lease)

    assert await meta.acquire("l", "a", lease)  # renewed again, short
    await wait_free(meta, "l", started + 10)
    assert await meta.acquire("l", "b", 30.0)  # an expired lease is anyone's
    assert await meta.holder("l") == "b"


# -- failures and names (Redis) -------------------------------------------------------------


async def test_an_unreachable_redis_is_unavailable() -> None:
    store = RedisMetadata("redis://127.0.0.1:1/0")
    with pytest.raises(MetadataUnavailable):
        await store.open()
    assert not await store.ping()


async def test_a_redis_gone_mid_use_is_unavailable(tmp_path: Path) -> None:
    require_binaries("redis-server", "setpriv")
    with RedisServer(tmp_path / "redis") as server:
        store = RedisMetadata(server.url)
        await store.open()
        try:
            assert await store.bump_generation() == 1
            server.stop()
            assert not await store.ping()
            with pytest.raises(MetadataUnavailable):
                await store.generation()
            server.start()
            assert await store.ping()  # reconnects by itself
            assert await store.generation() == 0  # nothing was persisted
        finally:
            await store.close()


async def test_names_that_could_alias_are_refused(redis_url: str) -> None:
    store = RedisMetadata(redis_url)
    await store.open()
    try:
        with pytest.raises(MetadataError):
            await store.set_tag(record("t", D1, repo="a\0b"), None)
        with pytest.raises(MetadataError):
            await store.linked("docker.io\0x", "r", D1)
    finally:
        await store.close()


async def test_prefixes_keep_installations_apart(redis_url: str) -> None:
    one, two = RedisMetadata(redis_url, prefix="one:"), RedisMetadata(redis_url, prefix="two:")
    await one.open()
    await two.open()
    try:
        await one.set_tag(record("t", D1), None)
        await one.add_content(D1, 5, None, 1.0)
        assert await two.tag("docker.io", "library/alpine", "t", None) is None
        assert await two.totals() == (0, 0)
        assert await one.secret() != await two.secret()
    finally:
        await one.close()
        await two.close()


def test_create_picks_the_store(tmp_path: Path) -> None:
    assert isinstance(metadata_module.create(tmp_path), SqliteMetadata)
    store = metadata_module.create(tmp_path, "redis://127.0.0.1:6379/0")
    assert isinstance(store, RedisMetadata) and store.url == "redis://127.0.0.1:6379/0"


async def test_undone_writes_leave_no_index_entries(redis_url: str) -> None:
    store = RedisMetadata(redis_url)
    await store.open()
    try:
        await store.add_content(D1, 5, "docker.io", 1.0)
        await store.touch({D2: 2.0})  # not recorded content
        await store.drop_content([D1])
        await store.set_tag(record("t", D1), (OCI,))
        await store.set_tag(record("t", D2), None)
        await store.drop_tag("docker.io", "library/alpine", "t")
        await store.add_ref(RefRecord("docker.io", "r", D3, OCI, 1))
        await store.drop_ref("docker.io", "r", D3)
        await store.pin("o", [D1, D2])
        await store.unpin("o")
        await store.put_upload("u", {}, time.time() + 60)
        await store.drop_upload("u")
        await store.grant(Grant("docker.io", "r", "i", 1.0, False))
        await store.revoke("docker.io", "r", "i")
        await store.acquire("l", "o", 60)
        await store.release("l", "o")
        await store.secret()
        client = store.client
        left = {str(k).removeprefix("mirror:") for k in await client.keys("*")}
        assert left == {"schema", "secret", "totals"}
        assert await store.totals() == (0, 0)
    finally:
        await store.close()
