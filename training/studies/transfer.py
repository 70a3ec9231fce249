"""Transfer with little data: accuracy against images per class, adapters against fine-tuning.

For each domain and each training-set size (images per class, e.g. 5, 20, 50, all) the same subset
is given to four methods:

    head      the frozen backbone as a feature extractor + a new linear head
    parallel  parallel 1x1 adapters on every unit + domain BN + head
    lowrank   the same with low-rank adapters U V of a fixed rank
    finetune  every weight of a copy of the backbone (+ a new head): the paper's baseline

Same schedule rules for all methods (only the learning rate is per method, as in the decathlon
preset): each run makes at least ``min_steps`` optimiser steps and at least ``min_epochs`` epochs, at
most ``max_epochs``, so a 5-image-per-class run is not starved of updates next to a 200-per-class one.
Validation (a fixed split of the domain, the same for every size) picks the best epoch; the table
reports the held-out test split. Sizes up to ``seeds_up_to`` images per class run ``seeds`` times with
different subsets and initialisations, so the table shows the spread (mean +- standard deviation).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from residual_adapters import AdapterConfig
from training.data import DomainData, ImageSet, stratified_split
from training.experiment import DomainEntry, body_parameter_count, domain_summary
from training.figures import save_figure, subplots
from training.studies.common import (
    AfterRow,
    Log,
    RowClock,
    StudySettings,
    backbone_summary,
    begin_study,
    fmt_duration,
    train_and_test,
)
from training.trainer import TrainConfig

METHODS = ("head", "parallel", "lowrank", "finetune")
METHOD_NAMES = {
    "head": "head only",
    "parallel": "parallel adapters",
    "lowrank": "low-rank adapters",
    "finetune": "full fine-tuning",
}
ALL = "all"


@dataclass
class TransferSettings(StudySettings):
    sizes: list[int | str] = field(default_factory=lambda: [5, 20, 50, ALL])
    """Training images per class; ``all``: the whole training split of the domain entry."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    lr: dict[str, float] = field(
        default_factory=lambda: {"head": 0.1, "parallel": 0.05, "lowrank": 0.05, "finetune": 0.01}
    )
    rank: int = 4
    """Rank of the low-rank adapters."""
    min_steps: int = 60
    min_epochs: int = 4
    max_epochs: int = 60
    seeds: int = 3
    seeds_up_to: int = 20
    """Sizes of at most this many images per class run ``seeds`` seeds; larger ones one seed."""


MINI = TransferSettings(
    backbone="mobilenet_v2",
    input_size=32,
    domains=[
        DomainEntry("digits", "digits", val_per_class=10),
        DomainEntry("textures", "textures", train_per_class=120, val_per_class=10),
    ],
    sizes=[5, 20, 50, ALL],
    # Lower rates than the decathlon preset plus per-tensor gradient clipping: BN training on these
    # domains diverges at 0.05 (docs/studies.md).
    lr={"head": 0.1, "parallel": 0.01, "lowrank": 0.01, "finetune": 0.005},
    grad_clip=5.0,
    threads=1,
)

TINY = TransferSettings(
    backbone="resnet26:0.125",
    input_size=16,
    domains=[DomainEntry("digits", "digits", train_per_class=8, val_per_class=3, test_per_class=3)],
    sizes=[2, ALL],
    min_steps=1,
    min_epochs=1,
    max_epochs=1,
    seeds=2,
    seeds_up_to=2,
    threads=1,
)

PRESETS = {"mini": MINI, "tiny": TINY}


def schedule(n_train: int, batch_size: int, settings: TransferSettings) -> int:
    """Epochs of a run on ``n_train`` images: at least min_steps steps and min_epochs, at most max_epochs."""
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    wanted = max(settings.min_epochs, math.ceil(settings.min_steps / steps_per_epoch))
    return min(settings.max_epochs, wanted)


def subset(data: DomainData, per_class: int | None, seed: int) -> DomainData:
    """``per_class`` training images of each class (None: all), drawn with ``seed``; val/test unchanged."""
    if per_class is None:
        return data
    counts = torch.bincount(data.train.targets, minlength=data.num_classes)
    if int(counts.min()) < per_class:
        raise ValueError(
            f"{data.name}: {per_class} images per class asked, the smallest class has {int(counts.min())}"
        )
    (idx,) = stratified_split(data.train.targets, [1.0], seed, [per_class])
    train = ImageSet(data.train.images[idx], data.train.targets[idx])
    return replace(data, train=train)


def method_config(method: str, rank: int) -> AdapterConfig | None:
    if method == "finetune":
        return None
    if method == "lowrank":
        return AdapterConfig(kind="lowrank", rank=rank)
    return AdapterConfig(kind=method)  # type: ignore[arg-type]


def run_transfer(
    settings: TransferSettings,
    out_json: Path,
    *,
    fresh: bool = False,
    log: Log = print,
    progress: bool = False,
    device: str = "cpu",
    after_row: AfterRow | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train every (domain, size, seed, method) run not yet in ``out_json``; return the results."""
    started = time.perf_counter()
    unknown = sorted(set(settings.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    for size in settings.sizes:
        if size != ALL and (not isinstance(size, int) or size < 1):
            raise ValueError(f"bad size {size!r}: images per class (>= 1) or 'all'")
    results, net, datasets = begin_study("transfer", settings, out_json, fresh=fresh, log=log)
    shared = body_parameter_count(net)
    method_parameters = {}
    for method in settings.methods:
        adapter_cfg = method_config(method, settings.rank)
        if adapter_cfg is None:
            method_parameters[method] = {"trained_per_domain": shared, "stored_per_domain": shared}
        else:
            c = net.domain_parameter_counts(adapter_cfg, 1)
            trained = c["adapter"] + c["bn"] if adapter_cfg.kind != "head" else 0
            method_parameters[method] = {"trained_per_domain": trained, "stored_per_domain": trained}
    results.extra = {
        "backbone": backbone_summary(settings, net),
        "method_parameters": method_parameters,
        "domains": {name: domain_summary(d) for name, d in datasets.items()},
    }
    todo: list[tuple[str, int | str, int, str]] = []
    for domain, data in datasets.items():
        smallest = int(torch.bincount(data.train.targets, minlength=data.num_classes).min())
        for size in settings.sizes:
            if size != ALL and int(size) > smallest:
                log(
                    f"{domain}: skipping {size} per class (the training split has {smallest} for its smallest class)"
                )
                continue
            n_seeds = settings.seeds if size != ALL and int(size) <= settings.seeds_up_to else 1
            for seed in range(n_seeds):
                for method in settings.methods:
                    todo.append((domain, size, seed, method))
    done_before = sum(_key(*t) in results.rows for t in todo)
    log(f"transfer study: {len(todo)} runs, {done_before} already done")
    clock = RowClock(results, len(todo), command, started)
    for index, (domain, size, seed, method) in enumerate(todo, 1):
        key = _key(domain, size, seed, method)
        if key in results.rows:
            continue
        full = datasets[domain]
        # seed 0 of every size uses the study seed, so sizes are nested subsets of one shuffle.
        run_seed = settings.seed + seed
        data = subset(full, None if size == ALL else int(size), run_seed)
        batch = min(settings.batch_size, len(data.train))
        train_cfg = TrainConfig(
            epochs=schedule(len(data.train), batch, settings),
            batch_size=batch,
            lr=settings.lr[method],
            weight_decay=settings.weight_decay,
            seed=run_seed,
            progress=progress,
            device=device,
        )
        name = f"{domain}__{method}__{size}__{seed}"
        info = {"domain": domain, "method": method, "size": size, "seed": seed}
        hook = None if after_row is None else (lambda m, n, _i=info: after_row(m, n, _i))
        outcome = train_and_test(
            net,
            name,
            data,
            train_cfg,
            adapter=method_config(method, settings.rank),
            grad_clip=settings.grad_clip,
            after_row=hook,
        )
        per_class = len(data.train) // data.num_classes
        results.rows[key] = {
            **info,
            "images_per_class": per_class,
            "train_images": len(data.train),
            **vars(outcome),
        }
        left = clock.row_done(index)
        log(
            f"[{index}/{len(todo)}] {domain} {size}/class seed {seed} {METHOD_NAMES[method]}: "
            f"test {outcome.test_accuracy:.4f} ({train_cfg.epochs} epochs, {outcome.train_seconds:.0f} s); {left}"
        )
    return clock.finish()


def _key(domain: str, size: int | str, seed: int, method: str) -> str:
    return f"{domain}/{size}/{seed}/{method}"


@dataclass
class Cell:
    """Test accuracy of one (domain, size, method) over its seeds."""

    mean: float
    std: float
    n: int
    images_per_class: int
    values: list[float]


def cells(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Cell]]]:
    """domain -> size label -> method -> Cell (sizes in the settings' order)."""
    out: dict[str, dict[str, dict[str, Cell]]] = {}
    for domain in results["domains"]:
        out[domain] = {}
        for size in results["settings"]["sizes"]:
            by_method: dict[str, Cell] = {}
            for method in results["settings"]["methods"]:
                rows = [
                    r
                    for r in results["rows"].values()
                    if r["domain"] == domain and str(r["size"]) == str(size) and r["method"] == method
                ]
                if not rows:
                    continue
                values = [r["test_accuracy"] for r in sorted(rows, key=lambda r: r["seed"])]
                by_method[method] = Cell(
                    mean=statistics.fmean(values),
                    std=statistics.stdev(values) if len(values) > 1 else 0.0,
                    n=len(values),
                    images_per_class=rows[0]["images_per_class"],
                    values=values,
                )
            if by_method:
                out[domain][str(size)] = by_method
    return out


def markdown_table(results: dict[str, Any]) -> str:
    methods = results["settings"]["methods"]
    lines = [
        "| domain | images / class | seeds | " + " | ".join(METHOD_NAMES[m] for m in methods) + " |",
        "|---|---:|---:|" + "---:|" * len(methods),
    ]
    for domain, sizes in cells(results).items():
        for label, by_method in sizes.items():
            any_cell = next(iter(by_method.values()))
            size_text = f"{any_cell.images_per_class}" + (" (all)" if label == ALL else "")
            entries = []
            for m in methods:
                c = by_method.get(m)
                if c is None:
                    entries.append("-")
                elif c.n > 1:
                    entries.append(f"{100 * c.mean:.2f} ± {100 * c.std:.2f}")
                else:
                    entries.append(f"{100 * c.mean:.2f}")
            lines.append(f"| {domain} | {size_text} | {any_cell.n} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    """Test accuracy against images per class (log x), one panel per domain, one curve per method."""
    table = cells(results)
    fig, axes = subplots(1, len(table), figsize=(5 * len(table), 3.8), squeeze=False)
    for ax, (domain, sizes) in zip(axes[0], table.items(), strict=True):
        for method in results["settings"]["methods"]:
            points = [(c[method].images_per_class, c[method]) for c in sizes.values() if method in c]
            if not points:
                continue
            xs = [p[0] for p in points]
            ax.errorbar(
                xs,
                [100 * p[1].mean for p in points],
                yerr=[100 * p[1].std for p in points],
                marker="o",
                capsize=3,
                label=METHOD_NAMES[method],
            )
        ax.set_xscale("log")
        ax.set_xlabel("training images per class (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(domain)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"transfer with little data, {results['settings']['backbone']} at {results['settings']['input_size']} px"
    )
    return save_figure(fig, path)


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    png = plot(results, out.with_suffix(".png"))
    s = results["settings"]
    lrs = ", ".join(f"{m} {s['lr'][m]}" for m in s["methods"])
    lines = [
        "# Transfer with little data",
        "",
        f"Command: `{results.get('command', '?')}`  ",
        f"Wall time: {fmt_duration(results['wall_seconds'])} on {results['machine']['torch_threads']} torch "
        f"thread(s), {results['machine']['cpus']} CPUs.  ",
        f"Backbone: `{s['backbone']}` at {s['input_size']} px, {results['backbone']['shared_parameters']:,} "
        "frozen parameters.  ",
        f"Schedule (every method): at least {s['min_steps']} SGD steps and {s['min_epochs']} epochs, at most "
        f"{s['max_epochs']}; batch min({s['batch_size']}, training images); lr x0.1 at 2/3 and 5/6; "
        f"weight decay {s['weight_decay']}; learning rates {lrs}; "
        f"low-rank rank {s['rank']}. Best epoch on a fixed validation split; accuracy on the held-out test split.  ",
        f"Seeds: {s['seeds']} (different subsets and initialisations) for sizes up to {s['seeds_up_to']} images "
        "per class, 1 above; cells show mean ± standard deviation over seeds.",
        "",
        "Top-1 test accuracy (%):",
        "",
        markdown_table(results),
        "",
        f"![accuracy against images per class]({png.name})",
        "",
        "## Parameters trained (and stored) per domain, heads apart",
        "",
        "| method | parameters | % of the backbone |",
        "|---|---:|---:|",
    ]
    shared = results["backbone"]["shared_parameters"]
    for m in s["methods"]:
        n = results["method_parameters"][m]["trained_per_domain"]
        lines.append(f"| {METHOD_NAMES[m]} | {n:,} | {100 * n / shared:.2f} |")
    lines += [
        "",
        "## Domains",
        "",
        "| domain | classes | train (all) | val | test | source |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, d in results["domains"].items():
        lines.append(
            f"| {name} | {d['classes']} | {d['train']} | {d['val']} | {d['test']} | {d['description']} |"
        )
    lines.append("")
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines))
    return [md, out.with_suffix(".json"), png]


def with_overrides(settings: TransferSettings, **changes: Any) -> TransferSettings:
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
