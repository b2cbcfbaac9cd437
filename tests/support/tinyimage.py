"""Build a tiny valid single-layer image as an OCI layout and push it with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import subprocess
import tarfile
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def host_arch() -> str:
    """Go-style architecture name of this machine (amd64, arm64, ...)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest, len(data)


def layer_tar(files: dict[str, bytes]) -> bytes:
    """Uncompressed, deterministic tar of regular files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def build_oci_layout(
    layout: Path,
    tag: str = "latest",
    files: dict[str, bytes] | None = None,
    arch: str | None = None,
) -> str:
    """Write an OCI image layout holding one image under `tag`; return the manifest digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    raw = layer_tar(files or {"hello.txt": b"hello from a tiny test image\n"})
    layer_digest, layer_size = _put_blob(layout, gzip.compress(raw, mtime=0))
    config = {
        "architecture": arch or host_arch(),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }
    config_digest, config_size = _put_blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": layer_size}],
    }
    manifest_digest, manifest_size = _put_blob(layout, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return manifest_digest


def push_tiny_image(
    workdir: Path, dest: str, fmt: str = "v2s2", files: dict[str, bytes] | None = None
) -> None:
    """Build a tiny image in `workdir` and `skopeo copy` it to `dest` ("host:port/repo:tag")."""
    layout = workdir / "oci-layout"
    build_oci_layout(layout, files=files)
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--format", fmt,
         f"oci:{layout}:latest", f"docker://{dest}"],
        check=True, capture_output=True, timeout=60,
    )
