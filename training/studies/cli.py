"""`multidomain train allocation` and `multidomain train transfer`: the paper's two studies on your data.

Both start from a preset (``mini``: real ImageNet MobileNetV2 on offline domains, sized for 2 CPU cores;
``tiny``: a smoke test) and let every setting be overridden: ``--backbone`` (artifact directory,
``mobilenet_v2`` or ``resnet26:0.25``...), ``--data`` (repeatable: built-ins or ImageFolder
directories), sizes, epochs. ``--out PATH`` (no suffix) gets PATH.json (the results, rewritten after
every finished row: run the same command again to continue after an interruption), PATH.md and PATH.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from training.data import DataError, _default_name
from training.experiment import DomainEntry, select_domains
from training.studies import allocation, transfer
from training.studies.common import StudyError, fmt_duration
from training.trainer import TrainingError

_EXPECTED_ERRORS = (StudyError, DataError, TrainingError, FileNotFoundError, ValueError)
_DEFAULTS: dict[str, Any] = {"val_fraction": 0.2, "test_fraction": 0.3}
"""Option values left out of the reported command (the parser's non-None defaults)."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(func: Any, args: argparse.Namespace) -> int:
    """Expected failures become one clear line and exit code 2; anything else is a bug and raises."""
    try:
        return int(func(args))
    except _EXPECTED_ERRORS as exc:
        _say(f"error: {type(exc).__name__}: {exc}")
        return 2


def _domains(args: argparse.Namespace, preset: list[DomainEntry]) -> list[DomainEntry] | None:
    """--data sources as domain entries, or --domains' subset of the preset's (None: keep the preset's)."""
    if args.domains:
        if args.data:
            raise StudyError("give --data (your domains) or --domains (a subset of the preset's), not both")
        return select_domains(preset, args.domains.split(","))
    if not args.data:
        return None
    names = [_default_name(s) for s in args.data]
    if len(set(names)) != len(names):
        raise StudyError(f"two --data sources have the same domain name: {names}")
    return [
        DomainEntry(
            source,
            name,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            test_per_class=args.test_per_class,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
        )
        for source, name in zip(args.data, names, strict=True)
    ]


def _command_line(study: str, args: argparse.Namespace, parser_defaults: dict[str, Any]) -> str:
    """The command that reproduces this run (the options given, in a fixed order), for the report."""
    parts = ["multidomain", "train", study, "--preset", args.preset, "--out", str(args.out)]
    for dest, value in vars(args).items():
        if dest in ("preset", "out", "func", "command", "train_command", "fresh", "progress", "device"):
            continue
        if (
            value is None
            or value == parser_defaults.get(dest)
            or (dest.endswith("_fraction") and not args.data)
        ):
            continue
        flag = "--" + dest.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            parts += [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_allocation(args: argparse.Namespace) -> int:
    settings = allocation.with_overrides(
        allocation.PRESETS[args.preset],
        backbone=args.backbone,
        input_size=args.input_size,
        domains=_domains(args, allocation.PRESETS[args.preset].domains),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
        rows=args.rows.split(",") if args.rows else None,
        seeds=args.seeds,
    )
    return _run_and_report("allocation", allocation.run_allocation, allocation, settings, args)


def _sizes(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part == transfer.ALL:
            out.append(part)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise ValueError(f"bad size {part!r} in --sizes: images per class (e.g. 5,20,50,all)")
    return out


def cmd_transfer(args: argparse.Namespace) -> int:
    preset = transfer.PRESETS[args.preset]
    settings = transfer.with_overrides(
        preset,
        backbone=args.backbone,
        input_size=args.input_size,
        domains=_domains(args, preset.domains),
        sizes=_sizes(args.sizes) if args.sizes else None,
        methods=args.methods.split(",") if args.methods else None,
        rank=args.rank,
        seeds=args.seeds,
        seeds_up_to=args.seeds_up_to,
        min_steps=args.min_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
    )
    return _run_and_report("transfer", transfer.run_transfer, transfer, settings, args)


def _run_and_report(
    name: str, run: Callable[..., dict[str, Any]], study: ModuleType, settings: Any, args: argparse.Namespace
) -> int:
    """Run a study (resuming from OUT.json), write its report and print its table."""
    started = time.perf_counter()
    results = run(
        settings,
        args.out.with_suffix(".json"),
        fresh=args.fresh,
        log=_say,
        progress=args.progress,
        device=args.device,
        command=_command_line(name, args, _DEFAULTS),
    )
    paths = study.write_report(results, args.out)
    _say(study.markdown_table(results))
    _say(
        f"done in {fmt_duration(time.perf_counter() - started)} (study total {fmt_duration(results['wall_seconds'])}); "
        f"wrote {', '.join(str(p) for p in paths)}"
    )
    return 0


def _common_args(p: argparse.ArgumentParser, presets: list[str], out: str) -> None:
    p.add_argument("--preset", default="mini", choices=presets, help="starting settings (default mini)")
    p.add_argument("--out", type=Path, default=Path(out), help=f"output path without suffix (default {out})")
    p.add_argument("--fresh", action="store_true", help="ignore finished rows in OUT.json and start over")
    p.add_argument(
        "--backbone", default=None, help="backbone artifact directory, mobilenet_v2, or ARCH[:WIDTH] (random)"
    )
    p.add_argument(
        "--data",
        action="append",
        default=None,
        help="a domain (repeatable): ImageFolder directory or digits, mnist, fashion-mnist, textures",
    )
    p.add_argument("--domains", default=None, help="comma-separated subset of the preset's domains")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--train-per-class", type=int, default=None, help="with --data: cap of the training split")
    p.add_argument("--val-per-class", type=int, default=None, help="with --data")
    p.add_argument("--test-per-class", type=int, default=None, help="with --data")
    p.add_argument("--val-fraction", type=float, default=0.2, help="with --data")
    p.add_argument("--test-fraction", type=float, default=0.3, help="with --data")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (presets: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--progress", action="store_true", help="progress bars")


def register(sub: Any) -> None:
    """Add `allocation` and `transfer` to the `multidomain train` sub-commands."""
    help_text = "parameter allocation study: adapters on shallow/middle/deep layers (Markdown + JSON + PNG)"
    p = sub.add_parser("allocation", help=help_text, description=help_text)
    p.set_defaults(func=lambda args: _run(cmd_allocation, args))
    _common_args(p, list(allocation.PRESETS), "docs/allocation-mini")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(allocation.ROWS)}")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (training and data-split seed)")

    help_text = (
        "transfer with little data: accuracy against images per class per method (Markdown + JSON + PNG)"
    )
    p = sub.add_parser("transfer", help=help_text, description=help_text)
    p.set_defaults(func=lambda args: _run(cmd_transfer, args))
    _common_args(p, list(transfer.PRESETS), "docs/transfer-mini")
    p.add_argument("--sizes", default=None, help="images per class, e.g. 5,20,50,all")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(transfer.METHODS)}")
    p.add_argument("--rank", type=int, default=None, help="rank of the low-rank adapters")
    p.add_argument("--seeds", type=int, default=None, help="seeds at the small sizes")
    p.add_argument(
        "--seeds-up-to", type=int, default=None, help="sizes up to this many per class get --seeds"
    )
    p.add_argument("--min-steps", type=int, default=None, help="optimiser steps every run makes at least")
