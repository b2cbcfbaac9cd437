"""A single-node Ceph cluster (one ceph-mon, one ceph-osd, one radosgw) as plain processes on
loopback, for tests that need an S3-compatible object store.

    with Ceph(tmp_path / "ceph") as ceph:
        ceph.create_bucket("b")
        ... ceph.endpoint, ceph.access_key, ceph.secret_key, ceph.region, ceph.env() ...

Everything (configuration, keyring, monitor and OSD data, the OSD's sparse bluestore file,
admin sockets, pid and log files) lives under the given directory. On 2 cores a start from
clean takes about 2.5 s, a restart on existing data about 1.5 s and a stop about 0.3 s (see
the settings marked as start-up or shutdown savers in `conf_text`); idle, the three daemons
use about 160 MB.

Needs the Debian packages ceph-mon, ceph-osd, radosgw and ceph-common (tests/run installs
them). There is no ceph-mgr: `ceph df` shows nothing and `ceph osd df` hangs, but S3 is
unaffected. Daemons get SIGTERM if the process that started them dies (`setpriv
--pdeathsig`), so start the cluster from a thread that outlives it (pytest's main thread).

radosgw 16 quirks: CompleteMultipartUpload answers with an empty ETag (HEAD has it);
`If-None-Match: *` is honoured on PutObject but ignored on CompleteMultipartUpload; ListParts
of an aborted upload answers NoSuchKey rather than NoSuchUpload.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import secrets
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from .procs import Proc, clean_env, free_port

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool", "setpriv")
GiB = 1 << 30
# Unix socket paths (admin sockets) must stay below 108 bytes.
_MAX_DIR_LEN = 60
# The OSD binds its messengers (public, cluster, two heartbeat; v2 and v1 each) in this many
# consecutive ports, chosen below the kernel's ephemeral range so they do not collide with
# free_port() picks or outgoing connections.
_OSD_PORTS = 24


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def cephx_key() -> str:
    """A new cephx secret as ceph-authtool --gen-key writes it: base64 of (type AES=1, creation
    time sec/nsec, length 16, 16 random bytes)."""
    now = time.time_ns()
    raw = struct.pack("<HIIH", 1, now // 10**9, now % 10**9, 16) + secrets.token_bytes(16)
    return base64.b64encode(raw).decode()


def _port_block(count: int, tries: int = 64) -> int:
    """The first of `count` consecutive loopback ports that are free right now."""
    for _ in range(tries):
        base = random.randrange(10000, 32000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found in {tries} tries")


class CephError(RuntimeError):
    pass


class Ceph:
    """A one-monitor, one-OSD Ceph cluster with a radosgw (beast) on a free loopback port and an
    S3 user. Context manager; `stop()` and `start()` again restart it on the same data.

    `keep_data=False` (the default) removes the OSD's and monitor's data on `__exit__` (the
    logs stay); the block file is sparse (`osd_size` bytes apparent, only what is written used).
    """

    RGW_NAME = "rgw.test"  # the radosgw's entity is client.rgw.test

    def __init__(
        self,
        workdir: Path,
        *,
        osd_size: int = 10 * GiB,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        keep_data: bool = False,
    ) -> None:
        self.workdir = workdir.resolve()
        if len(str(self.workdir)) > _MAX_DIR_LEN:
            raise CephError(f"{self.workdir}: path too long for admin sockets"
                            f" (at most {_MAX_DIR_LEN} characters)")
        self.osd_size = osd_size
        self.access_key = access_key or "TEST" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self.keep_data = keep_data
        self.fsid = str(uuid.uuid4())
        self.osd_uuid = str(uuid.uuid4())
        self.mon_ports = (free_port(), free_port())  # v2, v1
        self.rgw_port = free_port()
        self.osd_port_min = _port_block(_OSD_PORTS)
        self.conf_path = self.workdir / "ceph.conf"
        self.keyring_path = self.workdir / "keyring"
        self.log_dir = self.workdir / "log"
        self.mon: Proc | None = None
        self.osd: Proc | None = None
        self.rgw: Proc | None = None
        self.startup_seconds = 0.0
        self.shutdown_seconds = 0.0
        self._created = False  # monitor and OSD made (mkfs), user created
        self._client: Any = None

    # -- S3 side -------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.rgw_port}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}"

    def env(self) -> dict[str, str]:
        """AWS_* variables pointing an S3 client (obstore, botocore, the aws CLI) at the
        radosgw with the test user's credentials. obstore also needs plain http allowed
        (`client_options={"allow_http": True}`, or AWS_ALLOW_HTTP=true)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self) -> Any:
        """A synchronous botocore S3 client for the test user (see `support.s3`), made once."""
        if self._client is None:
            from .s3 import botocore_client

            self._client = botocore_client(self)
        return self._client

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Delete bucket `name` with every object in it and abort its pending multipart
        uploads (a missing bucket is fine)."""
        s3 = self.client()
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=name):
                for up in page.get("Uploads", []):
                    s3.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
            s3.delete_bucket(Bucket=name)
        except s3.exceptions.NoSuchBucket:
            pass

    # -- cluster side ---------------------------------------------------------------------------

    def ceph(self, *args: str, timeout: float = 30) -> str:
        """Run `ceph -c CONF ARGS...` as client.admin; its stdout, or CephError."""
        return self._run(["ceph", "-c", str(self.conf_path), "--connect-timeout",
                          str(int(timeout)), *args], timeout)

    def radosgw_admin(self, *args: str, timeout: float = 30) -> str:
        return self._run(["radosgw-admin", "-c", str(self.conf_path), *args], timeout)

    def _run(self, argv: Sequence[str], timeout: float) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                               env=clean_env(), stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as e:
            raise CephError(f"{' '.join(argv)}: timed out after {timeout}s{self._tails()}") from e
        if r.returncode != 0:
            raise CephError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}{r.stderr}"
                            f"{self._tails()}")
        return r.stdout

    def _tails(self) -> str:
        out = []
        for proc in (self.mon, self.osd, self.rgw):
            if proc is not None:
                state = "running" if proc.alive else f"exited {proc.returncode}"
                out.append(f"\n--- {proc.name} ({state}) ---\n{proc.log_text()[-3000:]}")
        return "".join(out)

    def conf_text(self) -> str:
        d = self.workdir
        v2, v1 = self.mon_ports
        return f"""\
[global]
fsid = {self.fsid}
mon_host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
mon_initial_members = a
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_port_min = {self.osd_port_min}
ms_bind_port_max = {self.osd_port_min + _OSD_PORTS - 1}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {self.keyring_path}
run_dir = {d}/run
admin_socket = {d}/run/$cluster-$name.$pid.asok
pid_file = {d}/run/$cluster-$name.pid
log_file = {d}/log/$cluster-$name.log
log_to_stderr = false
err_to_stderr = true
mon_cluster_log_file = {d}/log/$cluster.log
crash_dir = {d}/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_warn_on_pool_no_redundancy = false
auth_allow_insecure_global_id_reclaim = false
# start-up saver: ops sent while no OSD is up wait for the objecter's next tick (default 5 s)
objecter_tick_interval = 0.5

[mon]
mon_data = {d}/mon/$cluster-$id
# start-up saver: radosgw waits for one proposal per pool it creates (default 1 s each)
paxos_propose_interval = 0.01
# a busy test machine's disk may be nearly full: do not stop the monitor for that
mon_data_avail_warn = 1
mon_data_avail_crit = 0

[osd]
osd_data = {d}/osd/$cluster-$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = {self.osd_size}
osd_memory_target = 939524096
osd_crush_update_on_start = true
# start-up saver: every close of the block device waits for the aio thread's poll timeout
# (default 250 ms); mkfs and start-up close it about 8 times each
bdev_aio_poll_ms = 10

[client.{self.RGW_NAME}]
rgw_frontends = beast endpoint={self.host}
rgw_data = {d}/rgw
# deleted and overwritten data is reclaimed a minute or two later (default: after 2 h)
rgw_gc_obj_min_wait = 60
rgw_gc_processor_period = 60
rgw_enable_usage_log = false
# shutdown saver: the lifecycle thread sleeps 5 s uninterruptibly, delaying every stop
# (bucket lifecycle rules are not applied)
rgw_enable_lc_threads = false
"""

    def _keyring_text(self) -> str:
        entities = {
            "mon.": {"mon": "allow *"},
            "client.admin": {"mon": "allow *", "osd": "allow *", "mgr": "allow *",
                             "mds": "allow *"},
            "osd.0": {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
            f"client.{self.RGW_NAME}": {"mon": "allow rw", "osd": "allow rwx",
                                        "mgr": "allow rw"},
        }
        out = []
        for name, caps in entities.items():
            out.append(f"[{name}]\n\tkey = {cephx_key()}\n")
            out.extend(f'\tcaps {what} = "{cap}"\n' for what, cap in caps.items())
        return "".join(out)

    def _daemon(self, argv: list[str], name: str) -> Proc:
        # -f: foreground; setpriv: SIGTERM if we die, so no daemon outlives its test run
        return Proc(["setpriv", "--pdeathsig", "TERM", "--", *argv, "-f", "-c",
                     str(self.conf_path)], self.log_dir, name=name, env=clean_env(),
                    log_name=f"{name}.out")

    def _create(self) -> None:
        """First start: configuration, keys, monitor and OSD file systems."""
        self.remove_data()
        for sub in ("run", "log", "crash", "mon", "osd/ceph-0", "rgw"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.conf_text())
        self.keyring_path.write_text(self._keyring_text())
        self.keyring_path.chmod(0o600)
        monmap = self.workdir / "monmap"
        v2, v1 = self.mon_ports
        self._run(["monmaptool", "--create", "--clobber", "--fsid", self.fsid, "--addv", "a",
                   f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]", str(monmap)], 10)
        self._run(["ceph-mon", "-c", str(self.conf_path), "--mkfs", "-i", "a", "--monmap",
                   str(monmap), "--keyring", str(self.keyring_path)], 30)

    def _mkfs_osd(self, deadline: float) -> None:
        """`ceph-osd --mkfs` (bluestore on a new sparse file). It needs no monitor
        (--no-mon-config), so it runs while the monitor starts."""
        with subprocess.Popen(
            ["ceph-osd", "-c", str(self.conf_path), "-i", "0", "--mkfs", "--osd-uuid",
             self.osd_uuid, "--no-mon-config"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=clean_env(),
        ) as mkfs:
            try:
                self.mon = self._daemon(["ceph-mon", "-i", "a"], "ceph-mon")
                out, _ = mkfs.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except BaseException:
                mkfs.kill()
                out, _ = mkfs.communicate()
                raise CephError(f"ceph-osd --mkfs did not finish:\n{out}") from None
        if mkfs.returncode != 0:
            raise CephError(f"ceph-osd --mkfs: exit {mkfs.returncode}\n{out}")

    def _wait_s3(self, deadline: float) -> None:
        """Until radosgw answers an anonymous `GET /` with 200; fail early if a daemon dies."""
        last = "no answer"
        with httpx.Client(timeout=2, trust_env=False) as http:
            while True:
                for proc in (self.mon, self.osd, self.rgw):
                    if proc is not None and not proc.alive:
                        raise CephError(f"{proc.name} exited ({proc.returncode}) during"
                                        f" start-up{self._tails()}")
                try:
                    status = http.get(self.endpoint + "/").status_code
                    if status == 200:
                        return
                    last = f"status {status}"
                except httpx.HTTPError as e:
                    last = f"{type(e).__name__}: {e}"
                if time.monotonic() > deadline:
                    raise CephError(f"radosgw did not answer at {self.endpoint} in time"
                                    f" ({last}){self._tails()}")
                time.sleep(0.05)

    def start(self, timeout: float = 60) -> Ceph:
        """Start (creating the cluster the first time) and wait until S3 answers."""
        started = time.monotonic()
        deadline = started + timeout
        try:
            first = not self._created
            if first:
                self._create()
                self._mkfs_osd(deadline)  # starts the monitor meanwhile
                self.ceph("osd", "new", self.osd_uuid, "0",
                          timeout=max(1.0, deadline - time.monotonic()))
            else:
                self.mon = self._daemon(["ceph-mon", "-i", "a"], "ceph-mon")
            self.osd = self._daemon(["ceph-osd", "-i", "0"], "ceph-osd")
            # radosgw waits for the OSD itself while it creates its pools
            self.rgw = self._daemon(["radosgw", "-n", f"client.{self.RGW_NAME}"], "radosgw")
            self._wait_s3(deadline)
            if first:
                self.radosgw_admin("user", "create", "--uid=test", "--display-name=test",
                                   f"--access-key={self.access_key}",
                                   f"--secret-key={self.secret_key}",
                                   timeout=max(1.0, deadline - time.monotonic()))
                self._created = True
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """SIGTERM radosgw, the OSD and the monitor (in that order), SIGKILL after 10 s each."""
        started = time.monotonic()
        for attr in ("rgw", "osd", "mon"):
            proc: Proc | None = getattr(self, attr)
            if proc is not None:
                proc.stop(timeout=10)
                setattr(self, attr, None)
        self.shutdown_seconds = time.monotonic() - started

    def remove_data(self) -> None:
        """Remove monitor and OSD data (the OSD block file most of all); logs stay."""
        for sub in ("mon", "osd", "rgw", "run"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)
        self._created = False

    def __enter__(self) -> Ceph:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if not self.keep_data:
            self.remove_data()

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each running daemon."""
        out = {}
        for proc in (self.mon, self.osd, self.rgw):
            if proc is not None and proc.alive:
                with contextlib.suppress(OSError):
                    out[proc.name] = _rss(proc.pid)
        return out

    def status(self) -> dict[str, Any]:
        """`ceph status` as JSON."""
        result: dict[str, Any] = json.loads(self.ceph("status", "-f", "json"))
        return result

    def __repr__(self) -> str:
        return f"Ceph({self.endpoint}, dir={self.workdir})"


def _rss(pid: int) -> int:
    """VmRSS of `pid` and its descendants (setpriv execs, so the pid is the daemon's own)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
    return total


__all__ = ["BINARIES", "Ceph", "CephError", "GiB", "cephx_key", "missing_binaries"]
