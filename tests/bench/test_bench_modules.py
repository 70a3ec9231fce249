"""Every benchmark still imports (they are not run by the suite, so a moved name would otherwise surface
only when someone runs one), and none reaches another through ``sys.path``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_imports_and_has_a_main(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert name == "harness" or callable(getattr(module, "main", None))
    assert "sys.path" not in (BENCH / f"{name}.py").read_text()
