"""Fixtures for every test package: a real S3 server (SeaweedFS's ``weed mini``), started once per
session on free loopback ports when a test asks for it, and stopped by its PID at the end."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from adapters_store.seaweedfs import SeaweedFS, start_seaweedfs

BUCKET = "contract"
"""The session's bucket; each test takes a fresh prefix in it (``s3_url``)."""
_prefixes = itertools.count()


def s3_url(prefix: str | None = None) -> str:
    return f"s3://{BUCKET}/{prefix or f'test-{next(_prefixes)}'}"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """The AWS_* settings of the session's SeaweedFS in this process's environment (and its children's)."""
    for name, value in seaweed.env.items():
        monkeypatch.setenv(name, value)
    return seaweed
