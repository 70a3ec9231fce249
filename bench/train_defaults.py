"""Training defaults against a learning-rate sweep: does `train adapter` with no optimisation flags converge?

For every data set, backbone and adapter kind: the best validation accuracy of a run with the default
settings (``training.recipes``) against the best of a 4-rate sweep (everything else at its default), and
head-only at its default as the floor, each a mean over ``--seeds`` (0, 1, 2: the split, the head's draw,
the shuffling). The defaults were chosen on the three CHOOSE data sets and are judged on the two JUDGE ones;
the bar on those, for the adapter kinds: default within 2 points of the sweep's best and never below
head-only. Every run is one thread in one of ``--jobs`` worker processes, so a run's result does not
depend on the machine's core count or on which worker ran it.

    .venv/bin/python -m bench.train_defaults                       # the whole table
    .venv/bin/python -m bench.train_defaults --datasets digits --backbones mobilenet_v2 --seeds 0

Data (all offline; the folders are written by this bench under --data-root, once):
- digits: scikit-learn's 8x8 digits (built-in source).
- textures: scikit-image brick / grass / gravel patches (built-in source).
- photos (ImageFolder, RGB PNG): 32 px patches of seven scikit-image colour photos, one class per photo.
- letters (ImageFolder, grayscale PNG): A-Z rendered in the DejaVu fonts, random size, shift, rotation.
- fashion (ImageFolder pair train/ + val/, PNG): Fashion-MNIST, train/ from the official training set,
  val/ from the official test set (Debian dataset-fashion-mnist).
MNIST is left out: it is the ResNet-26 backbone's base task (training/pretrained/README.md).

Backbones: the offline ImageNet MobileNetV2 and the width-0.5 ResNet-26 pretrained on MNIST
(``--resnet26 DIR``). Every domain is trained at 32 px (each worker loads the data and backbones once).
A run whose loss diverges counts as the accuracy of always guessing the majority class, the value a
user would have got before divergence was caught.

Last line: a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from domain_format.preprocess import ImageSpec
from residual_adapters import AdapterConfig, MultiDomainNet
from training.backbones import load_backbone
from training.data import DomainData, load_domain_data, load_raw
from training.recipes import DEFAULT_LOWRANK_RANK, recipe_for
from training.rendered import FONT_DIRS, PHOTOS, font_files, informative, photo_tiles, random_glyph
from training.trainer import TrainingDiverged, train_domain

ROOT = Path(__file__).resolve().parent.parent
CHOOSE, JUDGE = "choose", "judge"
SWEEPS = {
    "mobilenet_v2": (0.003, 0.01, 0.03, 0.1),
    "resnet26": (0.03, 0.1, 0.3, 1.0),
}
KINDS = {
    "mobilenet_v2": ("parallel", "series", "lowrank", "bn", "head"),
    "resnet26": ("parallel", "series", "head"),
}


@dataclass
class DataSet:
    name: str
    role: str
    source: str
    """A built-in name or a folder under --data-root."""
    load: dict[str, Any] = field(default_factory=dict)


DATASETS = [
    DataSet("digits", CHOOSE, "digits", {"train_per_class": 60}),
    DataSet("textures", CHOOSE, "textures", {"train_per_class": 100}),
    DataSet("photos", CHOOSE, "photos", {"train_per_class": 60}),
    DataSet(
        "letters",
        JUDGE,
        "letters",
        {"grayscale": True, "flip": False, "val_fraction": 0.25, "train_per_class": 50},
    ),
    DataSet("fashion", JUDGE, "fashion", {"grayscale": True, "train_per_class": 100}),
]
INPUT_SIZE = 32


# -- data written as folders --------------------------------------------------------------------------------


def _write_letters(root: Path, per_class: int, seed: int = 0) -> None:
    # DejaVu only (what this table was measured with); the decathlon's glyphs use every installed family.
    fonts = font_files([FONT_DIRS[0]])
    rng = np.random.default_rng(seed)
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        (root / letter).mkdir(parents=True)
        for i in range(per_class):
            glyph = random_glyph(fonts[rng.integers(len(fonts))], letter, rng)
            Image.fromarray(glyph).save(root / letter / f"{i:04d}.png")


def _write_photos(root: Path, per_class: int, seed: int = 0) -> None:
    from skimage import data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = getattr(data, name)()[..., :3]
        tiles = photo_tiles(photo, 32).reshape(-1, 32, 32, 3)
        tiles = tiles[informative(tiles)]
        (root / name).mkdir(parents=True)
        for i, k in enumerate(rng.permutation(len(tiles))[:per_class]):
            Image.fromarray(tiles[k]).save(root / name / f"{i:04d}.png")


def _write_fashion(root: Path, train_per_class: int, val_per_class: int, seed: int = 0) -> None:
    raw = load_raw("fashion-mnist", ImageSpec(28, 28, "grayscale"))  # a built-in: the spec is not applied
    assert raw.test_images is not None and raw.test_targets is not None
    g = torch.Generator().manual_seed(seed)
    for split, images, targets, n in (
        ("train", raw.images, raw.targets, train_per_class),
        ("val", raw.test_images, raw.test_targets, val_per_class),
    ):
        assert isinstance(images, torch.Tensor)
        for c, label in enumerate(raw.labels):
            folder = root / split / label.replace("/", "_")
            folder.mkdir(parents=True)
            idx = (targets == c).nonzero().flatten()
            for i, k in enumerate(idx[torch.randperm(len(idx), generator=g)][:n].tolist()):
                Image.fromarray(images[k, 0].numpy()).save(folder / f"{i:04d}.png")


def write_folders(data_root: Path) -> None:
    """The ImageFolder data sets, written once (a marker file says a folder is complete)."""
    writers = {
        "letters": lambda p: _write_letters(p, per_class=80),
        "photos": lambda p: _write_photos(p, per_class=125),
        "fashion": lambda p: _write_fashion(p, train_per_class=150, val_per_class=60),
    }
    for name, write in writers.items():
        folder = data_root / name
        if (folder / ".complete").exists():
            continue
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        write(folder)
        (folder / ".complete").write_text("written by bench/train_defaults.py\n")


# -- runs ---------------------------------------------------------------------------------------------------


def load_data(ds: DataSet, data_root: Path, seed: int = 0) -> DomainData:
    source = ds.source if ds.source in ("digits", "textures") else str(data_root / ds.source)
    return load_domain_data(source, name=ds.name, input_size=INPUT_SIZE, seed=seed, **ds.load)


def majority_rate(data: DomainData) -> float:
    return float(torch.bincount(data.val.targets).max()) / len(data.val)


OVERRIDES: dict[str, Any] = {}
"""Recipe fields replaced for an exploration run (--warmup, --clip): such a table judges those, not the defaults."""


def train_once(
    net: MultiDomainNet, arch: str, kind: str, data: DomainData, epochs: int, lr: float | None, seed: int = 0
) -> dict[str, Any]:
    recipe = replace(recipe_for(arch, kind), **OVERRIDES)
    cfg = recipe.train_config(epochs=epochs, seed=seed, progress=False, **({} if lr is None else {"lr": lr}))
    rank = DEFAULT_LOWRANK_RANK if kind == "lowrank" else None
    torch.manual_seed(seed)  # the new head is drawn from the global RNG, as in the CLI
    net.add_domain(data.name, AdapterConfig(kind=kind, rank=rank), data.num_classes)  # type: ignore[arg-type]
    started = time.perf_counter()
    try:
        result = train_domain(net, data.name, data, cfg)
        accuracy, diverged = result.best_val_accuracy, False
    except TrainingDiverged:
        accuracy, diverged = majority_rate(data), True
    finally:
        net.remove_domain(data.name)
    return {"lr": cfg.lr, "accuracy": accuracy, "diverged": diverged, "s": time.perf_counter() - started}


def backbone_for(arch: str, resnet26: Path) -> MultiDomainNet:
    return load_backbone("mobilenet_v2" if arch == "mobilenet_v2" else str(resnet26))


@dataclass(frozen=True)
class Task:
    """One training run of the table."""

    arch: str
    dataset: str
    seed: int
    kind: str
    lr: float


_WORKER: dict[str, Any] = {}
"""A worker process's backbones and data, loaded on first use and kept for its later tasks."""


def _init_worker(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    # One thread per run: a 32 px network is too small for two threads to share well (two one-thread runs
    # side by side do more per second), and a run's result no longer depends on the machine's core count.
    torch.set_num_threads(1)
    OVERRIDES.update(overrides)
    _WORKER.update(args=args, nets={}, data={})


def _run_task(task: Task) -> dict[str, Any]:
    args, nets, datas = _WORKER["args"], _WORKER["nets"], _WORKER["data"]
    if task.arch not in nets:
        nets[task.arch] = backbone_for(task.arch, args.resnet26)
    key = (task.dataset, task.seed)
    if key not in datas:
        ds = next(d for d in DATASETS if d.name == task.dataset)
        datas[key] = load_data(ds, args.data_root, task.seed)
    data = datas[key]
    out = train_once(nets[task.arch], task.arch, task.kind, data, args.epochs, task.lr, task.seed)
    out.update(majority=majority_rate(data), val_images=len(data.val), train_images=len(data.train))
    return out


def tasks_for(args: argparse.Namespace) -> list[Task]:
    """Every run of the table: the sweep of each row, plus its default where that is off the sweep."""
    tasks = []
    for arch in args.backbones:
        for ds in (d for d in DATASETS if d.name in args.datasets):
            for kind in (k for k in KINDS[arch] if k in args.kinds):
                rates = list(args.rates or SWEEPS[arch])
                default_lr = recipe_for(arch, kind).lr
                if not any(math.isclose(r, default_lr) for r in rates):
                    rates.append(default_lr)
                tasks += [Task(arch, ds.name, seed, kind, lr) for seed in args.seeds for lr in rates]
    # Longest first (MobileNetV2 adapters), so that the pool does not end on one straggler.
    return sorted(tasks, key=lambda t: (t.arch != "mobilenet_v2", t.kind == "head"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    write_folders(args.data_root)
    tasks = tasks_for(args)
    results: dict[Task, dict[str, Any]] = {}
    say(f"{len(tasks)} runs in {args.jobs} one-thread processes, seeds {args.seeds}")
    context = mp.get_context("spawn")  # a fresh interpreter: no torch threads inherited through fork
    with ProcessPoolExecutor(args.jobs, context, _init_worker, (args, dict(OVERRIDES))) as pool:
        futures = {pool.submit(_run_task, t): t for t in tasks}
        for n, future in enumerate(as_completed(futures), 1):
            t, out = futures[future], future.result()
            results[t] = out
            state = "diverged" if out["diverged"] else f"{out['accuracy']:.4f}"
            say(
                f"[{n}/{len(tasks)}] {t.arch} {t.dataset} seed {t.seed} {t.kind} lr {t.lr:g}: {state} ({out['s']:.0f} s)"
            )
    return {"rows": rows_from(args, results), "runs": len(tasks)}


def rows_from(args: argparse.Namespace, results: dict[Task, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backbone, data set, kind): accuracies are means over the seeds."""

    def mean(arch: str, ds: str, kind: str, lr: float) -> float:
        runs = [results[Task(arch, ds, seed, kind, lr)]["accuracy"] for seed in args.seeds]
        return float(np.mean(runs))

    rows: list[dict[str, Any]] = []
    for arch in args.backbones:
        for ds in (d for d in DATASETS if d.name in args.datasets):
            kinds = [k for k in KINDS[arch] if k in args.kinds]
            lrs = {
                k: sorted({t.lr for t in results if (t.arch, t.dataset, t.kind) == (arch, ds.name, k)})
                for k in kinds
            }
            head_lr = recipe_for(arch, "head").lr
            head = mean(arch, ds.name, "head", head_lr) if "head" in kinds else math.nan
            for kind in kinds:
                default_lr = recipe_for(arch, kind).lr
                rates = args.rates or SWEEPS[arch]
                sweep = {
                    lr: mean(arch, ds.name, kind, lr)
                    for lr in lrs[kind]
                    if any(math.isclose(lr, r) for r in rates)
                }
                best_lr = max(sweep, key=lambda lr: sweep[lr])
                first = results[Task(arch, ds.name, args.seeds[0], kind, default_lr)]
                row = {
                    "dataset": ds.name,
                    "role": ds.role,
                    "backbone": arch,
                    "kind": kind,
                    "default_lr": default_lr,
                    "default": mean(arch, ds.name, kind, default_lr),
                    "best_lr": best_lr,
                    "best": sweep[best_lr],
                    "sweep": {f"{lr:g}": round(v, 4) for lr, v in sweep.items()},
                    "per_seed": {
                        f"{lr:g}": [
                            round(results[Task(arch, ds.name, s, kind, lr)]["accuracy"], 4)
                            for s in args.seeds
                        ]
                        for lr in lrs[kind]
                    },
                    "diverged": sorted(
                        {
                            t.lr
                            for t, r in results.items()
                            if (t.arch, t.dataset, t.kind) == (arch, ds.name, kind) and r["diverged"]
                        }
                    ),
                    "head": head,
                    "majority": first["majority"],
                    "train_images": first["train_images"],
                    "val_images": first["val_images"],
                    "seconds": round(
                        sum(
                            r["s"]
                            for t, r in results.items()
                            if (t.arch, t.dataset, t.kind) == (arch, ds.name, kind)
                        ),
                        1,
                    ),
                }
                # The bar of issue 11, for the adapter kinds; head-only is the floor itself (shown, not judged).
                row["judged"] = ds.role == JUDGE and kind != "head"
                row["meets_bar"] = row["default"] >= row["best"] - 0.02 and not row["default"] < row["head"]
                rows.append(row)
                say(
                    f"  {arch} {ds.name} {kind}: default (lr {default_lr:g}) {row['default']:.4f}, best {row['best']:.4f} "
                    f"(lr {best_lr:g}), head {head:.4f}  sweep {row['sweep']}"
                )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data set | role | backbone | kind | default lr | default | best of sweep (lr) | head-only | bar |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "(the floor)" if r["kind"] == "head" else "yes" if r["meets_bar"] else "**no**"
        lines.append(
            f"| {r['dataset']} | {r['role']} | {r['backbone']} | {r['kind']} | {r['default_lr']:g} | "
            f"{100 * r['default']:.1f} | {100 * r['best']:.1f} ({r['best_lr']:g}) | {100 * r['head']:.1f} | {mark} |"
        )
    return "\n".join(lines)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=[d.name for d in DATASETS])
    parser.add_argument("--backbones", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--kinds", nargs="+", default=["parallel", "series", "lowrank", "bn", "head"])
    parser.add_argument("--rates", nargs="+", type=float, default=None, help="override the sweep's rates")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="each run is made once per seed (the split, the new head's draw, the shuffling); rows are means",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="one-thread worker processes (default: the cores)",
    )
    parser.add_argument("--data-root", type=Path, default=ROOT / "runs" / "train-defaults-data")
    parser.add_argument(
        "--resnet26", type=Path, default=ROOT / "training" / "pretrained" / "resnet26-w0.5-mnist" / "backbone"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    parser.add_argument(
        "--warmup", type=float, default=None, help="exploration: replace the recipes' warm-up"
    )
    parser.add_argument("--clip", type=float, default=None, help="exploration: replace the clip (0: none)")
    parser.add_argument("--bn-warm-start", type=int, default=None, help="exploration: 1 on, 0 off")
    parser.add_argument(
        "--head-lr", type=float, default=None, help="exploration: the head's own rate in every kind (0: lr)"
    )
    args = parser.parse_args()
    if args.bn_warm_start is not None:
        OVERRIDES["bn_warm_start"] = bool(args.bn_warm_start)
    if args.warmup is not None:
        OVERRIDES["warmup_epochs"] = args.warmup
    if args.head_lr is not None:
        OVERRIDES["head_lr"] = args.head_lr or None
    if args.clip is not None:
        OVERRIDES["clip_grad_norm"] = args.clip or None
    started = time.perf_counter()
    result = run(args)
    wall = time.perf_counter() - started
    rows = result["rows"]
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    judged = [r for r in rows if r["judged"]]
    summary = {
        "bench": "train_defaults",
        "wall_s": round(wall),
        "runs": result["runs"],
        "rows": len(rows),
        "judged_rows": len(judged),
        "judged_meeting_bar": sum(r["meets_bar"] for r in judged),
        "bar_met": bool(judged) and all(r["meets_bar"] for r in judged),
        "worst_judged_gap_points": round(
            max((100 * (r["best"] - r["default"]) for r in judged), default=0.0), 1
        ),
        "seeds": args.seeds,
        "jobs": args.jobs,
        "threads_per_run": 1,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
