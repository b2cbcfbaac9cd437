"""A minimal Debian bookworm root filesystem with python3, made with debootstrap from the
Debian mirror apt uses, as a tarball for `docker import`; cached between runs."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .procs import clean_env

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv")  # venv brings ensurepip's pip and setuptools wheels
DEFAULT_MIRROR = "http://deb.debian.org/debian"
VERSION = "2"  # bump when the way the tarball is made changes


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mirror-tests"


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive apt uses here (deb822 `URIs:` or a one-line `deb` entry)."""
    files = sorted(apt_dir.glob("sources.list.d/*.sources"))
    files += [apt_dir / "sources.list", *sorted(apt_dir.glob("sources.list.d/*.list"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:.*\b" + SUITE + r"\b", stanza, re.M)
            if uris and suites and "security" not in uris[1]:
                return uris[1].rstrip("/")
        for line in text.splitlines():
            match = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", line)
            if match and "security" not in match[1]:
                return match[1].rstrip("/")
    return DEFAULT_MIRROR


def key() -> str:
    """What the tarball is made from (not where it is downloaded from)."""
    return hashlib.sha256(f"{VERSION} {SUITE} minbase {' '.join(PACKAGES)} "
                          f"{os.uname().machine}".encode()).hexdigest()[:16]


def rootfs_tarball(timeout: float = 600) -> Path:
    """The cached tarball, made first if missing (about a minute with a near mirror)."""
    root = cache_root()
    tarball = root / f"debian-{SUITE}-python3-{key()}.tar"
    if tarball.exists():
        return tarball
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=root))
    try:
        target = work / "rootfs"
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
             str(target), debian_mirror()],
            capture_output=True, text=True, timeout=timeout, env=clean_env(), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap failed ({done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-4000:]}")
        # Downloaded packages, indexes, docs and translations: a smaller image copies faster
        # (dockerd's vfs driver copies the whole tree for every build step).
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                     "usr/share/man", "usr/share/info", "usr/share/locale"):
            for path in (target / junk).glob("*"):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.is_file() or path.is_symlink():
                    path.unlink()
        part = work / "rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(target), "-cf", str(part), "."],
                       check=True, timeout=timeout)
        os.replace(part, tarball)  # atomic: a concurrent run sees all of it or nothing
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    return tarball


def wheelhouse(repo: Path, dest: Path, timeout: float = 600) -> Path:
    """Wheels of every dependency of the package at `repo` (a copy: pip builds in it), and
    of setuptools and wheel (to build it), for an install with no index; the package's own
    wheel is left out."""
    dest.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["python3", "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(repo),
         "setuptools>=68", "wheel",
         # Needed by redis-py on the image's Python (Debian's 3.11.2) but not on the host's
         # newer one, whose resolution made the rest of this list.
         "async-timeout>=4.0.3"],
        capture_output=True, text=True, timeout=timeout, env=clean_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{(done.stdout + done.stderr)[-4000:]}")
    for own in dest.glob("mirror-*.whl"):
        own.unlink()
    return dest
