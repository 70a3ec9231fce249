"""`multidomain` command line: one entry point, a command group per package.

Each group module exposes `register(subparsers)`, adding its commands with `func` set to a callable
taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

GROUPS = {
    "store": "multidomain.store_cli",
    "train": "training.cli",
    "serve": "multidomain.serve_cli",
    "classify": "multidomain.classify_cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or only the group ``only`` (when it names one): ``multidomain serve``
    then imports neither training nor torch's training code just to parse its arguments."""
    parser = argparse.ArgumentParser(prog="multidomain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in GROUPS.items():
        if only in GROUPS and name != only:
            continue
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
