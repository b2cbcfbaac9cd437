"""How the object store client is configured (no store is contacted)."""

from __future__ import annotations

import pytest

from mirror.objectstore import ObjectStore

KEYS = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "eu-west-1"}


def config(endpoint: str | None) -> dict[str, str]:
    keys = dict(KEYS, **({"AWS_ENDPOINT_URL": endpoint} if endpoint is not None else {}))
    store = ObjectStore("s3://bucket/prefix", keys)
    return {k: str(v) for k, v in store._store.config.items()}


@pytest.mark.parametrize("endpoint", ["https://s3.example.net", None])
def test_uploads_over_https_send_their_bodies_unsigned(
    endpoint: str | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_UNSIGNED_PAYLOAD", raising=False)
    assert config(endpoint).get("unsigned_payload") == "true"


def test_uploads_over_plain_http_stay_signed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_UNSIGNED_PAYLOAD", raising=False)
    assert config("http://127.0.0.1:7480").get("unsigned_payload") in (None, "false")


def test_the_environment_decides_when_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_UNSIGNED_PAYLOAD", "false")
    assert "unsigned_payload" not in config("https://s3.example.net")  # obstore reads the env
