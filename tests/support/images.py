"""Test images: built as OCI image layouts in Python, pushed to a registry with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .procs import clean_env
from .registry import Registry

VERSION = "v2"  # bump when the image definitions change: cached layouts are keyed by it
HOST_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
    platform.machine().lower(), platform.machine().lower())
PUSH_CREDS = "alice:alicepw"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

BIG_LAYER_SIZE = 100 * 1024 * 1024

Blob = tuple[str, int]  # (digest, size)


@dataclass
class ImageInfo:
    """One image as pushed upstream. `digest`/`media_type` are the tag's manifest (or index);
    `blobs` are every config and layer blob (of all platforms); `manifests` the child manifests
    of an index; `platforms` maps "os/arch" to a child manifest digest."""

    repo: str
    tag: str
    digest: str
    media_type: str
    size: int
    blobs: list[Blob]
    manifests: list[Blob] = field(default_factory=list)
    platforms: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # small text files in the host's layers
    layout: str = ""  # OCI layout directory the image was pushed from

    @property
    def ref(self) -> str:
        """`repo:tag`, also the key in `seed()`'s result."""
        return f"{self.repo}:{self.tag}"

    @property
    def push_dir(self) -> Path:
        """The `dir:` transport view of `layout` (see `Layout.tag`)."""
        return Path(self.layout) / "dir"

    @property
    def blob_bytes(self) -> int:
        return sum(size for _, size in self.blobs)

    def read_blob(self, digest: str) -> bytes:
        """A blob (or manifest) as built, from the local layout."""
        return (Path(self.layout) / "blobs" / "sha256" / digest.removeprefix("sha256:")
                ).read_bytes()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2).encode()


def make_tar(files: dict[str, bytes]) -> bytes:
    """A reproducible tar archive with `files` (and their parent directories)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(p) for name in files for p in Path(name).parents if str(p) != "."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Layout:
    """A minimal OCI image layout writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.blobs: list[Blob] = []  # configs and layers
        self.manifests: list[Blob] = []

    def add(self, data: bytes) -> dict[str, Any]:
        digest = sha256(data)
        (self.path / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def layer(self, files: dict[str, bytes], media_type: str) -> tuple[dict[str, Any], str]:
        """Add a layer; return its descriptor and diff_id."""
        tar = make_tar(files)
        data = tar if media_type == OCI_LAYER_TAR else gzip.compress(tar, 1, mtime=0)
        desc = {"mediaType": media_type, **self.add(data)}
        self.blobs.append((desc["digest"], desc["size"]))
        return desc, sha256(tar)

    def image(self, layers: list[dict[str, bytes]], *, docker: bool = False,
              arch: str = HOST_ARCH, tar_layers: tuple[int, ...] = ()) -> dict[str, Any]:
        """Add config, layers and manifest of one image; return the manifest's descriptor.
        Layers whose index is in `tar_layers` are stored uncompressed (OCI only)."""
        descs, diff_ids = [], []
        for i, files in enumerate(layers):
            mt = DOCKER_LAYER_GZIP if docker else (
                OCI_LAYER_TAR if i in tar_layers else OCI_LAYER_GZIP)
            desc, diff_id = self.layer(files, mt)
            descs.append(desc)
            diff_ids.append(diff_id)
        config = {
            "created": "2024-01-01T00:00:00Z",
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"mirror tests {i}"}
                        for i in range(len(layers))],
        }
        cdesc = {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, **self.add(_json(config))}
        self.blobs.append((cdesc["digest"], cdesc["size"]))
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": cdesc,
            "layers": descs,
        }
        return {"mediaType": manifest["mediaType"], **self.add(_json(manifest)),
                "platform": {"architecture": arch, "os": "linux"}}

    def index(self, children: list[dict[str, Any]]) -> dict[str, Any]:
        self.manifests = [(c["digest"], c["size"]) for c in children]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
        return {"mediaType": OCI_INDEX, **self.add(_json(index))}

    def tag(self, desc: dict[str, Any], tag: str) -> None:
        """Write index.json naming `desc` as `tag`, and the `dir:` transport view (`push_dir`).

        skopeo's `oci:` transport only accepts OCI media types in index.json, so images are
        pushed from a `dir:` view of the same blobs (hard links) that takes any manifest type."""
        top = {k: desc[k] for k in ("mediaType", "digest", "size")}
        top["annotations"] = {"org.opencontainers.image.ref.name": tag}
        (self.path / "index.json").write_bytes(_json(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]}))
        view = self.path / "dir"
        view.mkdir()
        (view / "version").write_text("Directory Transport Version: 1.1\n")
        os.link(self.blob_path(desc["digest"]), view / "manifest.json")
        for digest, _ in self.manifests:
            os.link(self.blob_path(digest), view / f"{digest[7:]}.manifest.json")
        for digest, _ in self.blobs:
            os.link(self.blob_path(digest), view / digest[7:])

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _text_files(files: dict[str, bytes]) -> dict[str, str]:
    return {k: v.decode() for k, v in files.items() if len(v) < 4096}


def build_all(root: Path) -> dict[str, ImageInfo]:
    """Build every test image as an OCI layout under `root` (no pushing)."""
    images: dict[str, ImageInfo] = {}

    def single(repo: str, tag: str, layers: list[dict[str, bytes]], **kw: Any) -> None:
        layout = Layout(root / repo.replace("/", "_"))
        desc = layout.image(layers, **kw)
        layout.tag(desc, tag)
        files = {k: v for layer in layers for k, v in _text_files(layer).items()}
        images[f"{repo}:{tag}"] = ImageInfo(
            repo, tag, desc["digest"], desc["mediaType"], desc["size"], layout.blobs,
            platforms={f"linux/{kw.get('arch', HOST_ARCH)}": desc["digest"]}, files=files,
            layout=str(layout.path))

    single("library/small", "latest", [{"hello.txt": b"hello from library/small\n"}],
           docker=True)
    single("test/oci-single", "1.0", [
        {"etc/oci-single/one.txt": b"layer one\n"},
        {"etc/oci-single/two.txt": b"layer two\n", "hello.txt": b"oci-single\n"},
    ])
    single("test/docker-v2s2", "1.0", [
        {"docker/a.txt": b"docker v2s2 layer a\n"},
        {"docker/b.txt": b"docker v2s2 layer b\n"},
    ], docker=True)
    single("test/big", "1.0", [
        {"big.bin": os.urandom(BIG_LAYER_SIZE)},
        {"big/README.txt": b"a 100 MiB random layer below\n"},
    ], tar_layers=(0,))
    single("private/secret", "1.0", [{"secret.txt": b"top secret\n"}])

    layout = Layout(root / "test_oci-index")
    children = [layout.image([{f"arch/{arch}.txt": f"platform {arch}\n".encode()}], arch=arch)
                for arch in ("amd64", "arm64")]
    desc = layout.index(children)
    layout.tag(desc, "1.0")
    images["test/oci-index:1.0"] = ImageInfo(
        "test/oci-index", "1.0", desc["digest"], OCI_INDEX, desc["size"], layout.blobs,
        layout.manifests, {f"linux/{c['platform']['architecture']}": c["digest"] for c in children},
        {f"arch/{HOST_ARCH}.txt": f"platform {HOST_ARCH}\n"}, str(layout.path))
    return images


def cached_build(cache_root: Path | None = None) -> dict[str, ImageInfo]:
    """`build_all()` into `cache_root/VERSION-ARCH`, reusing an earlier complete build."""
    if cache_root is None:
        cache_root = Path(os.environ.get("MIRROR_TEST_IMAGE_CACHE")
                          or Path(tempfile.gettempdir()) / "mirror-test-images")
    root = cache_root / f"{VERSION}-{HOST_ARCH}"
    done = root / "images.json"
    if done.exists():
        return {k: ImageInfo(**v) for k, v in json.loads(done.read_text()).items()}
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{VERSION}-", dir=cache_root))
    images = build_all(tmp)
    for info in images.values():
        info.layout = str(root / Path(info.layout).name)
    (tmp / "images.json").write_text(json.dumps({k: asdict(v) for k, v in images.items()}))
    try:
        tmp.rename(root)
    except OSError:  # built concurrently by another process: use theirs
        return cached_build(cache_root)
    return images


class SkopeoError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}"


def skopeo(*args: str, check: bool = True, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run skopeo (no proxies, no stored credentials, permissive policy)."""
    argv = ["skopeo", "--insecure-policy", *args]
    auth = Path(tempfile.gettempdir()) / "mirror-tests-no-auth.json"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=clean_env({"REGISTRY_AUTH_FILE": str(auth), **(env or {})}))
    if check and proc.returncode != 0:
        raise SkopeoError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def _docker_ref(ref: str) -> str:
    return ref if "://" in ref else f"docker://{ref}"


def skopeo_copy_to_dir(src_ref: str, dest_dir: Path, *, creds: str | None = None,
                       all: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Copy `docker://HOST/REPO:TAG` (the prefix may be omitted) into `dir:dest_dir`."""
    args = ["copy", "--src-tls-verify=false", "--preserve-digests"]
    args += [f"--src-creds={creds}"] if creds else ["--src-no-creds"]
    if all:
        args.append("--all")
    return skopeo(*args, _docker_ref(src_ref), f"dir:{dest_dir}", timeout=timeout)


def inspect_raw(ref: str, *, creds: str | None = None, check: bool = True) -> bytes:
    """`skopeo inspect --raw` of `docker://HOST/REPO:TAG` (the prefix may be omitted)."""
    args = ["inspect", "--raw", "--tls-verify=false"]
    args += [f"--creds={creds}"] if creds else ["--no-creds"]
    return skopeo(*args, _docker_ref(ref), check=check).stdout.encode()


def push(image: ImageInfo, host: str, creds: str = PUSH_CREDS) -> None:
    """Push `image` from its layout to `host`, byte for byte, and check the pushed digest."""
    dest = f"docker://{host}/{image.ref}"
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
           f"--dest-creds={creds}", f"dir:{image.push_dir}", dest)
    got = sha256(inspect_raw(dest, creds=creds))
    if got != image.digest:
        raise AssertionError(f"{image.ref}: pushed digest {got} != built {image.digest}")


def seed(registry: Registry, cache_root: Path | None = None,
         creds: str = PUSH_CREDS) -> dict[str, ImageInfo]:
    """Build (or reuse) the test images and push them all to `registry`.

    Returns {"repo:tag": ImageInfo} for library/small:latest, test/oci-single:1.0,
    test/oci-index:1.0, test/docker-v2s2:1.0, test/big:1.0 and private/secret:1.0.
    """
    images = cached_build(cache_root)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: push(i, registry.host, creds), images.values()))
    return images
