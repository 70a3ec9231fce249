"""Every benchmark still imports (they are not run by the suite, so a moved name would otherwise surface
only when someone runs one), and none reaches another through ``sys.path``."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_imports_and_has_a_main(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert name == "harness" or callable(getattr(module, "main", None))
    assert "sys.path" not in (BENCH / f"{name}.py").read_text()


def test_the_asgi_cost_bench_times_the_answers_it_names() -> None:
    # `measure` raises when an answer's status is not the one its name promises (the stub front end
    # drifting from what the routes read would otherwise time a 500)
    asgi_cost = importlib.import_module("bench.asgi_cost")
    results = asyncio.run(asgi_cost.measure(3))
    assert {name: row["status"] for name, row in results.items()} == {
        name: status for name, status, *_ in asgi_cost.ANSWERS
    }
    assert results["healthz"]["over_healthz"] == 1.0


def test_the_gpu_check_script_parses() -> None:
    """bench/gpu_check.sh runs only where a GPU is lent, in one try: a syntax error must show here."""
    result = subprocess.run(
        ["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
