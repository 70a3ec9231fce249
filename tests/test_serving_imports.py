"""Starting the server loads no training code: ``multidomain serve`` parses with its own group only, the
first-run bootstrap uses ``model_artifacts``, and the served app is ``server`` alone (checked in a fresh
interpreter: this test process imported training long ago)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
from multidomain.cli import build_parser
args = build_parser("serve").parse_args(["serve", "--store", "unused", "--no-bootstrap"])
assert args.func.__module__ == "multidomain.serve_cli"
import multidomain.bootstrap, server.app  # what the serve command and the uvicorn process import
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("training", "multidomain_client"))) or "-")
"""


def test_serving_imports_no_training() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["-"], f"serving imported {done.stdout.strip()}"
