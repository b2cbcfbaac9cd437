"""Bundles: export to a reproducible OCI layout tar, import all-or-nothing, the manifest walk
they share, and the progress display."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mirror import oci
from mirror.airgap import exporter, importer, layout
from mirror.airgap.progress import Progress, human_bytes, human_duration
from mirror.metadata import RefRecord, SqliteMetadata, TagRecord, database_path
from mirror.reference import parse_digest
from mirror.settings import Upstream
from mirror.store import Store

UPSTREAMS = [Upstream("docker.io", "http://127.0.0.1:9", library_prefix=True)]
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
T = TypeVar("T")


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


@contextlib.contextmanager
def new_store(root: Path) -> Iterator[Store]:
    metadata = SqliteMetadata(database_path(root))
    metadata.open_sync()
    try:
        yield Store(root, metadata)
    finally:
        metadata.close_sync()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Builder:
    """Puts content into a store as a pull would."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def blob(self, data: bytes) -> dict[str, Any]:
        digest = digest_of(data)
        run(self.store.write(parse_digest(digest), data, "docker.io"))
        return {"digest": digest, "size": len(data)}

    def manifest(self, doc: dict[str, Any], media_type: str, store: bool = True) -> dict[str, Any]:
        data = json.dumps(doc, indent=3).encode()
        desc = {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}
        if store:
            self.blob(data)
            run(self.store.metadata.add_manifest(desc["digest"], media_type,
                                                 oci.named_digests(data)))
        return desc

    def image(self, name: str, media_type: str = oci.OCI_MANIFEST, arch: str = "amd64",
              store_layers: bool = True) -> dict[str, Any]:
        config = {"mediaType": CONFIG, **self.blob(json.dumps(
            {"os": "linux", "architecture": arch, "name": name}).encode())}
        layer_data = f"layer of {name} {arch}".encode() * 100
        layer = {"mediaType": LAYER, "digest": digest_of(layer_data), "size": len(layer_data)}
        if store_layers:
            self.blob(layer_data)
        return self.manifest({"schemaVersion": 2, "mediaType": media_type, "config": config,
                              "layers": [layer]}, media_type)

    def tag(self, repo: str, tag: str, desc: dict[str, Any]) -> None:
        run(self.store.metadata.set_tag(TagRecord("docker.io", repo, tag, desc["digest"],
                                                  desc["mediaType"], desc["size"],
                                                  time.time()), None))


@pytest.fixture
def filled(store: Store) -> Store:
    """docker.io/library/small:latest (Docker v2), test/multi:1 (OCI index of two
    platforms, arm64 lacking its layer), test/single@digest (OCI, by digest)."""
    b = Builder(store)
    b.tag("library/small", "latest", b.image("small", oci.DOCKER_MANIFEST))
    amd = {**b.image("multi"), "platform": {"os": "linux", "architecture": "amd64"}}
    arm = {**b.image("multi", arch="arm64", store_layers=False),
           "platform": {"os": "linux", "architecture": "arm64"}}
    b.tag("test/multi", "1", b.manifest(
        {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [amd, arm]}, oci.OCI_INDEX))
    single = b.image("single")
    run(store.metadata.add_ref(RefRecord("docker.io", "test/single", single["digest"],
                                         oci.OCI_MANIFEST, single["size"])))
    return store


def quiet() -> Progress:
    return Progress(io.StringIO(), tty=False)


def export_bytes(store: Store, names: tuple[str, ...] = (), since: set[str] | None = None
                 ) -> bytes:
    ex = exporter.Exporter(store, UPSTREAMS)
    out = io.BytesIO()
    ex.write(run(ex.select(names)), out, since or set(), quiet())
    return out.getvalue()


def test_export_is_reproducible_and_a_valid_layout(filled: Store) -> None:
    first = export_bytes(filled)
    assert export_bytes(filled) == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:4]] == ["oci-layout", "index.json", "blobs",
                                                 "blobs/sha256"]
        blobs = [m.name for m in members[4:]]
        assert blobs == sorted(blobs)
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
            if m.isfile() and m.name.startswith("blobs/"):
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                assert digest_of(data) == "sha256:" + m.name.rsplit("/", 1)[1]
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    names = [d["annotations"][layout.REF_NAME] for d in index["manifests"]]
    assert names == ["docker.io/library/small:latest", "docker.io/test/multi:1",
                     f"docker.io/test/single@{filled_digest(filled, 'test/single')}"]
    # The Docker-typed image is named through an OCI index that points at it.
    small = index["manifests"][0]
    assert small["mediaType"] == oci.OCI_INDEX
    assert len(first) % tarfile.RECORDSIZE == 0


def filled_digest(store: Store, repo: str) -> str:
    return next(r.digest for r in refs(store) if r.repo == repo)


def refs(store: Store) -> list[RefRecord]:
    async def collect() -> list[RefRecord]:
        return [r async for r in store.metadata.iter_refs()]

    return run(collect())


def tags(store: Store) -> list[TagRecord]:
    async def collect() -> list[TagRecord]:
        return [t async for t in store.metadata.iter_tags()]

    return run(collect())


def test_export_leaves_out_platforms_the_cache_lacks(filled: Store) -> None:
    ex = exporter.Exporter(filled, UPSTREAMS)
    (entry,) = run(ex.select(["test/multi:1"])).entries
    assert (entry.closure.images, entry.closure.skipped) == (1, 1)
    assert exporter.summary(exporter.Report([entry]), "x.tar").count("1 of 2 platforms") == 1


def test_export_of_a_missing_image_fails(filled: Store) -> None:
    with pytest.raises(exporter.ExportError, match=r"docker\.io/test/nope:1: not in the cache"):
        run(exporter.Exporter(filled, UPSTREAMS).select(["test/nope:1"]))


def test_round_trip_restores_tags_types_links_and_pins(filled: Store, tmp_path: Path) -> None:
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(export_bytes(filled))
    with new_store(tmp_path / "site") as site:
        report = run(importer.import_bundle(site, UPSTREAMS, bundle, quiet()))
        assert len(report.images) == 3
        meta, was = site.metadata, filled.metadata
        for record in tags(filled):
            got = run(meta.tag(record.upstream, record.repo, record.tag, None))
            assert got is not None and got.digest == record.digest, record
            assert run(meta.media_type(record.digest)) == run(was.media_type(record.digest))
            assert run(meta.pinned(record.digest))
            assert run(meta.linked(record.upstream, record.repo, record.digest))
            assert run(meta.holds(record.upstream, record.digest))
            # The operator vouches for the bundle: anyone may read it (offline too).
            assert run(meta.granted(record.upstream, record.repo, "anonymous")) is not None
        small = run(meta.tag("docker.io", "library/small", "latest", None))
        assert small is not None and small.media_type == oci.DOCKER_MANIFEST
        assert refs(site) == refs(filled)
        for path in (site.root / "blobs").rglob("*"):
            if path.is_file():
                assert digest_of(path.read_bytes()).endswith(path.name)
        # Again: everything is there already.
        again = run(importer.import_bundle(site, UPSTREAMS, bundle, quiet()))
        assert again.added == 0


def test_a_corrupt_blob_refuses_the_whole_bundle(filled: Store, tmp_path: Path) -> None:
    data = bytearray(export_bytes(filled))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar.getmembers()
                      if m.name.startswith("blobs/sha256/") and m.size > 1000)
    data[member.offset_data + 10] ^= 0xFF
    bundle = tmp_path / "bad.tar"
    bundle.write_bytes(bytes(data))
    with new_store(tmp_path / "site") as site:
        with pytest.raises(importer.BundleError) as caught:
            run(importer.import_bundle(site, UPSTREAMS, bundle, quiet()))
        bad = "sha256:" + member.name.rsplit("/", 1)[1]
        assert f"blob {bad} is corrupt" in str(caught.value)
        assert [p for p in (site.root / "blobs").rglob("*") if p.is_file()] == []
        assert list(site.tmp.iterdir()) == []
        assert tags(site) == []


def test_since_leaves_out_what_the_old_bundle_has(filled: Store, tmp_path: Path) -> None:
    old = tmp_path / "old.tar"
    ex = exporter.Exporter(filled, UPSTREAMS)
    with open(old, "wb") as f:
        ex.write(run(ex.select(["test/multi:1"])), f, set(), quiet())
    had = layout.blob_digests(old)
    new = export_bytes(filled, since=had)
    with tarfile.open(fileobj=io.BytesIO(new)) as tar:
        names = {m.name for m in tar.getmembers()}
    assert not {layout.blob_name(d) for d in had} & names
    # Without the old one underneath, the new one does not import.
    inc = tmp_path / "new.tar"
    inc.write_bytes(new)
    with new_store(tmp_path / "site") as site:
        with pytest.raises(importer.BundleError, match="incremental bundle"):
            run(importer.import_bundle(site, UPSTREAMS, inc, quiet()))
        run(importer.import_bundle(site, UPSTREAMS, old, quiet()))
        run(importer.import_bundle(site, UPSTREAMS, inc, quiet()))
        assert run(site.metadata.tag("docker.io", "library/small", "latest", None)) is not None


def write_layout(root: Path, ref_name: str | None) -> str:
    """A one-image OCI layout directory as other tools write it; returns the manifest digest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        (blobs / digest_of(data)[7:]).write_bytes(data)
        return {"digest": digest_of(data), "size": len(data)}

    config = {"mediaType": CONFIG, **put(b'{"os": "linux", "architecture": "amd64"}')}
    layer = {"mediaType": LAYER, **put(b"layer")}
    manifest = {"mediaType": oci.OCI_MANIFEST, **put(json.dumps(
        {"schemaVersion": 2, "config": config, "layers": [layer]}).encode())}
    if ref_name:
        manifest["annotations"] = {layout.REF_NAME: ref_name}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
    return str(manifest["digest"])


@pytest.mark.parametrize(
    ("ref_name", "name", "expected"),
    [
        ("1.0", "docker.io/test/x", ("docker.io", "test/x", "1.0")),
        ("1.0", "alpine", ("docker.io", "library/alpine", "1.0")),
        ("ghcr.io/o/x:2", None, ("ghcr.io", "o/x", "2")),
        ("test/x:3", None, ("docker.io", "test/x", "3")),
        ("1.0", None, None),  # a bare tag without --name: imported untagged
        (None, "docker.io/test/x", None),
    ],
)
def test_names_in_other_tools_layouts(
    store: Store, tmp_path: Path, ref_name: str | None, name: str | None,
    expected: tuple[str, str, str] | None,
) -> None:
    digest = write_layout(tmp_path / "layout", ref_name)
    report = run(importer.import_bundle(store, UPSTREAMS, tmp_path / "layout", quiet(), name))
    assert store.has(parse_digest(digest))
    found = [(t.upstream, t.repo, t.tag) for t in tags(store)]
    assert found == ([expected] if expected else [])
    if expected is None and ref_name:
        assert "give --name" in importer.summary(report, tmp_path)


def test_walk_of_a_partial_index(filled: Store) -> None:
    ex = exporter.Exporter(filled, UPSTREAMS)
    record = run(filled.metadata.tag("docker.io", "test/multi", "1", None))
    assert record is not None
    root = oci.Descriptor(oci.OCI_INDEX, record.digest, record.size)
    loose = oci.walk(root, ex.read, ex.has)
    assert loose.complete and (loose.images, loose.skipped) == (1, 1)
    # Strict (import): a child that is there but lacks a layer makes the image incomplete.
    strict = oci.walk(root, ex.read, ex.has, strict=True)
    assert not strict.complete and len(strict.missing) == 1
    # No child at all: incomplete either way.
    assert not oci.walk(root, ex.read, lambda d: False).complete


def test_platform_filter() -> None:
    want = oci.Platform.parse("linux/arm64")
    assert want.matches(oci.Platform("linux", "arm64", "v8"))
    assert not want.matches(oci.Platform("linux", "amd64"))
    assert not oci.Platform.parse("linux/arm/v7").matches(oci.Platform("linux", "arm", "v6"))
    with pytest.raises(ValueError):
        oci.Platform.parse("linux")


def test_progress_plain_lines() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=False)
    task = progress.task("img", 2000)
    task.advance(2000)
    task.finish("done")
    progress.task("other").fail("boom")
    progress.close()
    assert out.getvalue().splitlines() == ["img: done", "other: FAILED: boom"]
    assert human_bytes(999) == "999 B" and human_bytes(1_500_000) == "1.5 MB"
    assert human_duration(3.21) == "3.2s" and human_duration(75) == "1m15s"


def test_progress_on_a_terminal_redraws_in_place() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True)
    task = progress.task("img", 1000)
    task.advance(500)
    progress.update(force=True)
    task.finish("done")
    progress.close()
    text = out.getvalue()
    assert "[############............] 500 B / 1.0 kB" in text
    assert "\x1b[" in text and "img: done\n" in text
