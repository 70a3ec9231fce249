"""The package layers (pyproject's ``[tool.importlinter]`` contracts, written once) hold, and the check
catches a door opened the wrong way: the same check on a copy of the tree with one forbidden import added
must fail and name it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
TREE = ["pyproject.toml", "domain_format", "residual_adapters", "adapters_store", "model_artifacts", "server",
        "training", "multidomain", "client", "bench", "tests"]  # fmt: skip


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # The tree at `root` first on the path (not an installed copy); import-linter reads pyproject there.
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'client'}"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter not installed (make install)"
)


def test_the_layers_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "forbidden", "says"),
    [
        ("server/errors.py", "import training.export", "server is not allowed to import training"),
        ("adapters_store/errors.py", "import residual_adapters", "adapters_store is not allowed to import residual_adapters"),
        ("domain_format/kinds.py", "import model_artifacts", "domain_format is not allowed to import model_artifacts"),
        ("client/multidomain_client/client.py", "import server.errors", "multidomain_client is not allowed to import server"),
    ],
)  # fmt: skip
def test_a_forbidden_import_breaks_the_check(tmp_path: Path, module: str, forbidden: str, says: str) -> None:
    for name in TREE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "build"))
        else:
            shutil.copy(source, tmp_path / name)
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{forbidden}  # the door the wrong way\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert says in done.stdout, done.stdout
