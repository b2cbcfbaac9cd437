"""Content in an S3-compatible object store (obstore: the Rust object_store crate).

Why obstore: measured against radosgw here it streams a multipart upload from our own
writes and aborts it when the fill fails (nothing half-written ever becomes visible), uses
about a third of the memory of aiobotocore while uploading and two thirds of its CPU, and
presigns host-bound SigV4 URLs by default. (`obstore.put_async` does not abort on
cancellation; the writer used here does.)

Uploads over https send their bodies unsigned (`UNSIGNED-PAYLOAD`), as the AWS SDKs do: a
signed payload is one more SHA-256 of every byte in the mirror and again in the object store
(measured with radosgw, tests/bench/cluster.py: about 0.5 CPU s/GB in the replica and 0.6 in
radosgw, for a fill that already hashes every byte against its digest), and TLS already
protects the body. Over plain http the payload stays signed, so the store rejects a body
altered on the way; `AWS_UNSIGNED_PAYLOAD` in the environment decides either way.

Layout under `s3://BUCKET/PREFIX/`:

    blobs/<alg>/<hex>              committed content, verified before it was completed
    holders/<upstream>/<alg>/<hex> empty: that upstream delivered the content (access rule 1)
    pins/<sha256 of owner>         JSON {owner, digests}: what an image keeps from eviction

The bucket is the source of truth for content; the metadata store (Redis) keeps a copy of
these facts for speed and is rebuilt from here when lost (sizes by HEAD, holders and pins by
reading these objects).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import obstore
from obstore.store import S3Store

from mirror.reference import Digest

if TYPE_CHECKING:
    from obstore import AsyncWritableFile, GetOptions
    from obstore.store import ClientConfig

log = logging.getLogger("mirror.objectstore")

PART = 16 << 20  # multipart part size: large parts, few requests (measured: 16 MiB)
CONCURRENCY = 4  # parts in flight per upload
READ_CHUNK = 1 << 20
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


class ObjectStoreError(Exception):
    """The object store could not be reached or refused a request."""


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, url: str) -> Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected s3://BUCKET[/PREFIX], got {url!r}")
        prefix = parts.path.strip("/")
        return cls(parts.netloc, prefix + "/" if prefix else "")


def credentials(settings_table: Mapping[str, str], env: Mapping[str, str]) -> dict[str, str]:
    """The standard AWS_* settings: the `[storage]` table, overridden by the environment."""
    found = {k: str(v) for k, v in settings_table.items() if k in ENV_KEYS}
    found.update({k: env[k] for k in ENV_KEYS if env.get(k)})
    return found


class Writer:
    """A multipart upload fed with our writes: `complete()` makes the object visible,
    `abort()` (or any failure) leaves nothing behind."""

    def __init__(self, inner: AsyncWritableFile) -> None:
        self._inner = inner
        self._done = False

    async def write(self, data: bytes | memoryview) -> None:
        await self._inner.write(data)

    async def complete(self) -> None:
        if not self._done:
            self._done = True
            await self._inner.__aexit__(None, None, None)

    async def abort(self, reason: BaseException | None = None) -> None:
        if not self._done:
            self._done = True
            error = reason or ObjectStoreError("upload abandoned")
            try:
                await self._inner.__aexit__(type(error), error, None)
            except Exception as exc:  # the upload was failing anyway: note it, move on
                log.debug("aborting an upload: %r", exc)


class ObjectStore:
    def __init__(self, url: str, keys: Mapping[str, str]) -> None:
        self.location = Location.parse(url)
        endpoint = keys.get("AWS_ENDPOINT_URL", "")
        options: dict[str, Any] = {"connect_timeout": "10s", "timeout": "3600s"}
        if endpoint.startswith("http://"):
            options["allow_http"] = True
        config: dict[str, Any] = {"virtual_hosted_style_request": False}
        if endpoint:
            config["endpoint"] = endpoint
        if keys.get("AWS_ACCESS_KEY_ID"):
            config["access_key_id"] = keys["AWS_ACCESS_KEY_ID"]
            config["secret_access_key"] = keys.get("AWS_SECRET_ACCESS_KEY", "")
        config["region"] = keys.get("AWS_REGION") or "us-east-1"
        if not endpoint.startswith("http://") and not os.environ.get("AWS_UNSIGNED_PAYLOAD"):
            config["unsigned_payload"] = True  # https: TLS protects the body (see above)
        self.url = url
        self.endpoint = endpoint
        self._store = S3Store(self.location.bucket, client_options=cast("ClientConfig", options),
                              **config)

    # -- keys ------------------------------------------------------------------------------

    def key(self, digest: Digest) -> str:
        return f"{self.location.prefix}blobs/{digest.algorithm}/{digest.hex}"

    def holder_key(self, upstream: str, digest: Digest) -> str:
        safe = upstream.replace("/", "%2F")
        return f"{self.location.prefix}holders/{safe}/{digest.algorithm}/{digest.hex}"

    def pin_key(self, owner: str) -> str:
        return f"{self.location.prefix}pins/{hashlib.sha256(owner.encode()).hexdigest()}"

    # -- content ---------------------------------------------------------------------------

    async def size(self, digest: Digest) -> int | None:
        try:
            meta = await obstore.head_async(self._store, self.key(digest))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise ObjectStoreError(f"object store: HEAD {digest}: {exc}") from exc
        return int(meta["size"])

    async def read(self, digest: Digest, start: int = 0,
                   end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the object, streamed."""
        options: dict[str, Any] = {}
        if start or end is not None:
            options["range"] = (start, end) if end is not None else {"offset": start}
        try:
            result = await obstore.get_async(self._store, self.key(digest),
                                             options=cast("GetOptions", options))
            async for chunk in result.stream(min_chunk_size=READ_CHUNK):
                yield bytes(chunk)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ObjectStoreError(f"object store: GET {digest}: {exc}") from exc

    async def read_all(self, digest: Digest) -> bytes | None:
        try:
            result = await obstore.get_async(self._store, self.key(digest))
            return bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise ObjectStoreError(f"object store: GET {digest}: {exc}") from exc

    async def writer(self, digest: Digest) -> Writer:
        inner = obstore.open_writer_async(self._store, self.key(digest), buffer_size=PART,
                                          max_concurrency=CONCURRENCY)
        await inner.__aenter__()
        return Writer(inner)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        try:
            await obstore.put_async(self._store, self.key(digest), data)
        except Exception as exc:
            raise ObjectStoreError(f"object store: PUT {digest}: {exc}") from exc

    async def put_file(self, digest: Digest, path: Path) -> None:
        """Upload a verified local file (a push's blob, an imported one)."""
        writer = await self.writer(digest)
        try:
            with open(path, "rb") as f:
                while data := f.read(PART):
                    await writer.write(data)
        except BaseException as exc:
            await writer.abort(exc)
            raise
        await writer.complete()

    async def delete(self, digest: Digest) -> None:
        try:
            await obstore.delete_async(self._store, self.key(digest))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise ObjectStoreError(f"object store: DELETE {digest}: {exc}") from exc

    async def presign(self, digest: Digest, lifetime: float) -> str:
        """A short-lived, host-bound (SigV4) URL that GETs the object."""
        url = await obstore.sign_async(self._store, "GET", self.key(digest),
                                       timedelta(seconds=lifetime))
        return str(url)

    async def iter_content(self) -> AsyncIterator[tuple[Digest, int]]:
        """Every object under blobs/ (a listing: tools only, never a request path)."""
        prefix = f"{self.location.prefix}blobs/"
        async for batch in obstore.list(self._store, prefix=prefix, chunk_size=1000):
            for meta in batch:
                algorithm, _, hex_ = str(meta["path"])[len(prefix):].partition("/")
                if algorithm and hex_ and "/" not in hex_:
                    yield Digest(algorithm, hex_), int(meta["size"])

    # -- holders and pins ------------------------------------------------------------------

    async def add_holder(self, upstream: str, digest: Digest) -> None:
        await obstore.put_async(self._store, self.holder_key(upstream, digest), b"")

    async def holds(self, upstream: str, digest: Digest) -> bool:
        try:
            await obstore.head_async(self._store, self.holder_key(upstream, digest))
        except FileNotFoundError:
            return False
        return True

    async def put_pin(self, owner: str, digests: list[str]) -> None:
        data = json.dumps({"owner": owner, "digests": digests}).encode()
        await obstore.put_async(self._store, self.pin_key(owner), data)

    async def drop_pin(self, owner: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self._store, self.pin_key(owner))

    async def iter_pins(self) -> AsyncIterator[tuple[str, list[str]]]:
        prefix = f"{self.location.prefix}pins/"
        async for batch in obstore.list(self._store, prefix=prefix, chunk_size=1000):
            for meta in batch:
                try:
                    result = await obstore.get_async(self._store, str(meta["path"]))
                    doc = json.loads(bytes(await result.bytes_async()))
                    yield str(doc["owner"]), [str(d) for d in doc["digests"]]
                except (FileNotFoundError, ValueError, KeyError, TypeError):
                    continue

    async def ping(self) -> bool:
        try:
            async for _ in obstore.list(self._store, prefix=f"{self.location.prefix}blobs/",
                                        chunk_size=1):
                break
        except Exception:
            return False
        return True


def from_settings(storage: str, table: Mapping[str, str]) -> ObjectStore | None:
    """The object store `storage` names (`s3://...`), or None for the cache directory."""
    if not storage.startswith("s3://"):
        return None
    return ObjectStore(storage, credentials(table, os.environ))
