"""The client is its own distribution: installable alone from ``client/`` and importing no torch and
nothing of the project (it is what users install to talk to a server)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
PROJECT_PACKAGES = ("domain_format", "residual_adapters", "adapters_store", "model_artifacts", "server",
                    "training", "multidomain")  # fmt: skip

# Run in a fresh interpreter: this test process has imported torch and the project long ago.
PROBE = f"""
import sys
import multidomain_client
from multidomain_client import ClientError, InvalidArtifact, MultidomainClient
assert issubclass(InvalidArtifact, ClientError)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy") + {PROJECT_PACKAGES!r})
print(multidomain_client.__file__)
print(",".join(loaded) or "-")
"""


def _probe(pythonpath: Path, cwd: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(pythonpath)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_client_imports_neither_torch_nor_the_project(tmp_path: Path) -> None:
    path, loaded = _probe(CLIENT_DIR, tmp_path)
    assert Path(path).is_relative_to(CLIENT_DIR)
    assert loaded == "-", f"importing the client loaded {loaded}"


def test_client_installs_alone_from_its_own_pyproject(tmp_path: Path) -> None:
    """``pip install ./client`` (a copy, so the build leaves nothing in the source tree; into a target
    directory, offline: httpx is already installed)."""
    source = shutil.copytree(
        CLIENT_DIR, tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    assert (target / "multidomain_client" / "py.typed").is_file()
    assert not (target / "server").exists() and not (target / "torch").exists()
    path, loaded = _probe(target, tmp_path)
    assert Path(path).is_relative_to(target)  # the installed copy, not the source tree
    assert loaded == "-"
