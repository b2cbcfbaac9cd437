"""S3 clients (obstore, aiobotocore, botocore) configured for the test radosgw (`support.ceph`).

radosgw 16 wants path-style addressing and SigV4; it does not understand the trailing CRC
checksums botocore >= 1.36 sends by default, so botocore computes checksums only when an
operation requires them. botocore presigns with SigV2 for a custom endpoint unless
`signature_version="s3v4"` is set, and SigV2 URLs are not bound to the host.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import botocore.config
    from obstore.store import S3Store


class S3Target(Protocol):
    """Where and as whom: a `support.ceph.Ceph`, or an `S3Account`."""

    @property
    def endpoint(self) -> str: ...
    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def region(self) -> str: ...


@dataclass(frozen=True)
class S3Account:
    endpoint: str
    access_key: str
    secret_key: str
    region: str

    @classmethod
    def from_env(cls) -> S3Account:
        """From the variables `Ceph.env()` sets."""
        return cls(os.environ["AWS_ENDPOINT_URL"], os.environ["AWS_ACCESS_KEY_ID"],
                   os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_REGION"])


def botocore_config(**overrides: Any) -> botocore.config.Config:
    import botocore.config

    options: dict[str, Any] = {
        "signature_version": "s3v4",
        "s3": {"addressing_style": "path"},
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
        "retries": {"max_attempts": 2, "mode": "standard"},
        "connect_timeout": 5,
        "read_timeout": 60,
    }
    options.update(overrides)
    return botocore.config.Config(**options)


def botocore_client(target: S3Target, **config: Any) -> Any:
    """A synchronous botocore S3 client for the test user (thread-safe)."""
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=target.endpoint, region_name=target.region,
        aws_access_key_id=target.access_key, aws_secret_access_key=target.secret_key,
        config=botocore_config(**config))


@contextlib.asynccontextmanager
async def aiobotocore_client(target: S3Target, **config: Any) -> AsyncIterator[Any]:
    """`async with aiobotocore_client(ceph) as s3:` an aiobotocore S3 client for the test user."""
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3", endpoint_url=target.endpoint, region_name=target.region,
        aws_access_key_id=target.access_key, aws_secret_access_key=target.secret_key,
        config=botocore_config(**config),
    ) as client:
        yield client


def obstore_store(target: S3Target, bucket: str, *,
                  client_options: dict[str, Any] | None = None, **config: Any) -> S3Store:
    """An obstore S3Store on `bucket` for the test user (plain http, path style)."""
    from obstore.store import S3Store

    options = {"allow_http": True, "connect_timeout": "5s", "timeout": "120s"}
    options.update(client_options or {})
    return S3Store(
        bucket,
        endpoint=target.endpoint,
        access_key_id=target.access_key,
        secret_access_key=target.secret_key,
        region=target.region,
        virtual_hosted_style_request=False,
        client_options=options,  # type: ignore[arg-type]
        **config,
    )
