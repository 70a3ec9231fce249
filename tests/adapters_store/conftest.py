"""Shared fixtures: fabricated artifacts (adapters_store.testing) and a fresh store per test.

``any_store`` runs a test on both backends: a ``LocalStore`` in a temp directory and an ``S3Store``
under a fresh prefix of one bucket of the session's SeaweedFS (``tests/conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store import AdapterStore, LocalStore
from adapters_store.s3 import S3Store
from adapters_store.testing import ArtifactFiles, make_domain_artifact
from tests.conftest import s3_url

__all__ = ["s3_url"]


def write_count(store: AdapterStore) -> int:
    """How many writes the store's index has seen (its revision counter; the S3 revision is an ETag)."""
    if isinstance(store, LocalStore):
        return int(store.revision())
    assert isinstance(store, S3Store)
    return store._read_index()[0].revision


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AdapterStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return S3Store.from_url(s3_url())


@pytest.fixture
def artifact() -> ArtifactFiles:
    return make_domain_artifact(domain="birds", labels=["crow", "wren", "owl"])
