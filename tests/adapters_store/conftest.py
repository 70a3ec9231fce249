"""Shared fixtures: fabricated artifacts (adapters_store.testing) and a fresh store per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store import LocalStore
from adapters_store.testing import ArtifactFiles, make_domain_artifact


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def artifact() -> ArtifactFiles:
    return make_domain_artifact(domain="birds", labels=["crow", "wren", "owl"])
