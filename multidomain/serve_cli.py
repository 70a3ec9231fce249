"""`multidomain serve`: run the server: the supervisor with its front-end and engine processes.

Settings come from the environment (prefix `MD_`, see `server.settings.Settings`); `--host`, `--port` and
`--store` (a directory or `s3://bucket/prefix`) override them. On a store without a backbone, the first-run
import (`multidomain.bootstrap`: MobileNetV2 with ImageNet weights, domain `imagenet`) runs first unless
`--no-bootstrap` is given. The server package itself knows nothing of this command: it lives with the other
commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from adapters_store.open import is_s3_url, open_store
from multidomain.bootstrap import bootstrap_store, has_backbone
from server.settings import Settings


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="run the inference server", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--host", help="bind address (default $MD_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default $MD_PORT or 8000)")
    p.add_argument(
        "--store",
        help="store directory or s3://bucket/prefix (default $MD_STORE_URL, else $MD_STORE_DIR, else ./store)",
    )
    p.add_argument(
        "--no-bootstrap", action="store_true", help="do not import MobileNetV2 into an empty store"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.store is not None:
        overrides.update(
            {"store_url": args.store} if is_s3_url(args.store) else {"store_dir": Path(args.store)}
        )
    return Settings(**overrides)


def serve_environment(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The serving process's environment: the factory reads MD_* itself, so the command-line overrides
    travel there; OpenMP threads sleep rather than spin (see `server/__init__.py`) unless told otherwise."""
    env = dict(os.environ if base is None else base)
    env.update(
        {"MD_HOST": settings.host, "MD_PORT": str(settings.port), "MD_STORE_DIR": str(settings.store_dir)}
    )
    if settings.store_url:
        env["MD_STORE_URL"] = settings.store_url
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def supervisor_command() -> list[str]:
    """The supervisor (`server.supervisor`) in a fresh interpreter; it reads MD_* itself."""
    return [sys.executable, "-m", "server.supervisor"]


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    if not args.no_bootstrap:
        store = open_store(settings.store_location, quotas=settings.store_quotas())
        if not has_backbone(store):
            bootstrap_store(store)
    # A fresh interpreter: this process may have loaded torch (the first-run import); the supervisor and
    # its front ends never load it, and each engine loads it after OMP_WAIT_POLICY is set (torch's
    # OpenMP runtime reads it only when it loads).
    command = supervisor_command()
    env = serve_environment(settings)
    env["MD_LOG_LEVEL"] = args.log_level
    os.execve(command[0], command, env)
    return 0  # not reached: execve replaces this process
