"""Parameter allocation: where must the adapters go? (the paper's "adapt both shallow and deep layers").

For each domain, parallel adapters are trained restricted to layer groups of the adaptable units in
depth order (``AdapterConfig.allocation``)::

    none          BN + head only (no adapter anywhere)
    shallow       first third of the units
    middle        second third
    deep          last third
    shallow+deep  first and last thirds
    all           every unit
    lowrank-all   every unit, low-rank adapters U V with the rank r whose adapter count is closest
                  to the deep-third row's: the same budget spread over all depths instead of one end

Every row keeps domain BN in every unit and a new head; only where the 1x1 adapters are changes.
Output: a table (test accuracy per domain, mean, adapter parameters per domain and % of the backbone)
as Markdown + JSON, and accuracy against parameters as a PNG (one marker per allocation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from residual_adapters import AdapterConfig, MultiDomainNet
from training.experiment import (
    DomainEntry,
    body_parameter_count,
    domain_summary,
    domains_table,
    load_domains,
)
from training.figures import save_figure, subplots
from training.stats import mean_std
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

ALLOCATIONS = ("none", "shallow", "middle", "deep", "shallow+deep", "all")
LOWRANK_ROW = "lowrank-all"
ROWS = (*ALLOCATIONS, LOWRANK_ROW)
ROW_NAMES = {
    "none": "none (BN + head)",
    "shallow": "shallow third",
    "middle": "middle third",
    "deep": "deep third",
    "shallow+deep": "shallow + deep",
    "all": "all layers",
    LOWRANK_ROW: "all layers, low-rank",
}


@dataclass
class AllocationSettings(StudySettings):
    epochs: int = 6
    lr: float = 0.05
    """Learning rate of every row (all rows train the same kind of tensors: BN, head, 1x1 adapters)."""
    max_rank: int = 256
    """Largest rank tried when matching the low-rank row to the deep-third row's parameter count."""
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    seeds: int = 1
    """Seeds per row: seed k (added to ``seed``) draws the data splits, the head and the shuffling; cells
    then show the mean ± std over seeds."""


MINI = AllocationSettings(
    backbone="mobilenet_v2",
    # 32 px: the three sources are 8-32 px originals; on 1 CPU thread each row takes about 20 s.
    input_size=32,
    domains=[
        DomainEntry("digits", "digits", train_per_class=100, val_per_class=20),
        DomainEntry("mnist", "mnist", train_per_class=100, val_per_class=20, test_per_class=100),
        DomainEntry("textures", "textures", train_per_class=100, val_per_class=20),
    ],
    epochs=6,
    # lr 0.01 with per-tensor gradient clipping: at 0.05 (the decathlon preset's) BN training on these
    # domains diverges to chance accuracy (docs/studies.md).
    lr=0.01,
    grad_clip=5.0,
    threads=1,
)

TINY = AllocationSettings(
    backbone="resnet26:0.125",
    input_size=16,
    domains=[DomainEntry("digits", "digits", train_per_class=10, val_per_class=5, test_per_class=5)],
    epochs=1,
    lr=0.05,
    threads=1,
)

PRESETS = {"mini": MINI, "tiny": TINY}


def row_config(net: MultiDomainNet, row: str, rank: int | None) -> AdapterConfig:
    if row == LOWRANK_ROW:
        assert rank is not None
        return AdapterConfig(kind="lowrank", rank=rank)
    return AdapterConfig(kind="parallel", allocation=row)


def matching_rank(net: MultiDomainNet, num_classes: int, max_rank: int = 256) -> int:
    """The rank r whose all-layer low-rank adapters count closest to the deep-third parallel adapters
    (the smaller r on a tie)."""
    target = net.domain_parameter_counts(AdapterConfig(allocation="deep"), num_classes)["adapter"]
    best, best_gap = 1, None
    for r in range(1, max_rank + 1):
        count = net.domain_parameter_counts(AdapterConfig(kind="lowrank", rank=r), num_classes)["adapter"]
        gap = abs(count - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = r, gap
        if count > target:  # counts grow with r: nothing further can be closer
            break
    return best


def adapted_units(net: MultiDomainNet, cfg: AdapterConfig) -> list[str]:
    """Names of the units that get an adapter under ``cfg``, in depth order."""
    return [u.name for u in net.units if net.unit_adapter(u, cfg) is not None]


def run_allocation(
    settings: AllocationSettings,
    out_json: Path,
    *,
    fresh: bool = False,
    log: Log = print,
    progress: bool = False,
    device: str = "cpu",
    after_row: AfterRow | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train every row on every domain (skipping rows already in ``out_json``); return the results."""
    started = time.perf_counter()
    unknown = sorted(set(settings.rows) - set(ROWS))
    if unknown:
        raise ValueError(f"unknown allocation rows {unknown}; expected some of {list(ROWS)}")
    results, net, datasets = begin_study("allocation", settings, out_json, fresh=fresh, log=log)
    shared = body_parameter_count(net)
    # The low-rank rank depends only on the architecture (heads are counted apart): one r for every domain.
    rank = matching_rank(net, 1, settings.max_rank)
    rows_info = {}
    for row in settings.rows:
        cfg = row_config(net, row, rank)
        counts = net.domain_parameter_counts(cfg, 1)
        rows_info[row] = {
            "config": cfg.to_dict(),
            "adapter_parameters": counts["adapter"],
            "bn_parameters": counts["bn"],
            "adapter_percent_of_backbone": 100.0 * counts["adapter"] / shared,
            "units": adapted_units(net, cfg),
        }
    results.extra = {
        "backbone": {**backbone_summary(settings, net), "adaptable_units": net.adaptable_units()},
        "lowrank_rank": rank,
        "row_info": rows_info,
        "domains": {name: domain_summary(d) for name, d in datasets.items()},
    }
    todo = [(d, r, k) for k in range(settings.seeds) for d in datasets for r in settings.rows]
    done_before = sum(row_key(d, r, k) in results.rows for d, r, k in todo)
    by_seed = {0: datasets}
    log(
        f"allocation study: {len(todo)} rows ({len(datasets)} domains x {len(settings.rows)} allocations x "
        f"{settings.seeds} seed(s)), "
        f"{done_before} already done; low-rank rank {rank} "
        f"({rows_info.get(LOWRANK_ROW, {}).get('adapter_parameters', '-')} vs deep third "
        f"{rows_info.get('deep', {}).get('adapter_parameters', '-')} adapter parameters)"
    )
    clock = RowClock(results, len(todo), command, started)
    for index, (domain, row, k) in enumerate(todo, 1):
        key = row_key(domain, row, k)
        if key in results.rows:
            continue
        if k not in by_seed:
            by_seed[k] = load_domains(settings.domains, settings.input_size, settings.seed + k, log)
        data = by_seed[k][domain]
        train_cfg = TrainConfig(
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            seed=settings.seed + k,
            progress=progress,
            device=device,
        )
        adapter = row_config(net, row, rank)
        name = f"{domain}__{row.replace('+', '_')}__{k}"
        hook = (
            None
            if after_row is None
            else (lambda m, n, _r=row, _d=domain: after_row(m, n, {"row": _r, "domain": _d}))
        )
        outcome = train_and_test(
            net, name, data, train_cfg, adapter=adapter, grad_clip=settings.grad_clip, after_row=hook
        )
        counts = net.domain_parameter_counts(adapter, data.num_classes)
        results.rows[key] = {
            "domain": domain,
            "row": row,
            "seed": k,
            **counts,
            **vars(outcome),
        }
        left = clock.row_done(index)
        log(
            f"[{index}/{len(todo)}] {domain} {ROW_NAMES[row]} seed {k}: test {outcome.test_accuracy:.4f} "
            f"(val {outcome.val_accuracy:.4f}, {counts['adapter']:,} adapter params, "
            f"{outcome.train_seconds:.0f} s); {left}"
        )
    return clock.finish()


def row_key(domain: str, row: str, seed: int) -> str:
    """The results file's key of one run (seed 0 keeps the single-seed files' key)."""
    return f"{domain}/{row}" if seed == 0 else f"{domain}/{row}/seed{seed}"


def table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per allocation: accuracy per domain (mean over the seeds finished on every domain, and
    std), mean, adapter parameters and % of the backbone."""
    domains = list(results["domains"])
    n_seeds = int(results["settings"].get("seeds", 1))
    out = []
    for row in results["settings"]["rows"]:
        per_domain = {
            d: [
                results["rows"][row_key(d, row, k)]["test_accuracy"]
                for k in range(n_seeds)
                if row_key(d, row, k) in results["rows"]
            ]
            for d in domains
        }
        accs = {d: mean_std(v)[0] for d, v in per_domain.items() if v}
        stds = {d: mean_std(v)[1] for d, v in per_domain.items() if v}
        info = results["row_info"][row]
        out.append(
            {
                "row": row,
                "accuracy": accs,
                "std": stds,
                "seeds": {d: len(v) for d, v in per_domain.items()},
                "mean_accuracy": sum(accs.values()) / len(accs) if len(accs) == len(domains) else None,
                "adapter_parameters": info["adapter_parameters"],
                "adapter_percent_of_backbone": info["adapter_percent_of_backbone"],
                "bn_parameters": info["bn_parameters"],
                "units": len(info["units"]),
            }
        )
    return out


def markdown_table(results: dict[str, Any]) -> str:
    domains = list(results["domains"])
    lines = [
        "| allocation | units | adapter params / domain | % of backbone | "
        + " | ".join(domains)
        + " | mean |",
        "|---|---:|---:|---:|" + "---:|" * len(domains) + "---:|",
    ]
    for t in table(results):
        accs = " | ".join(
            "-" if d not in t["accuracy"]
            else f"{100 * t['accuracy'][d]:.2f}" + (f" ± {100 * t['std'][d]:.2f}" if t["seeds"][d] > 1 else "")
            for d in domains
        )  # fmt: skip
        mean = "-" if t["mean_accuracy"] is None else f"{100 * t['mean_accuracy']:.2f}"
        name = ROW_NAMES.get(t["row"], t["row"])
        if t["row"] == LOWRANK_ROW:
            name += f" (r={results['lowrank_rank']})"
        lines.append(
            f"| {name} | {t['units']} | {t['adapter_parameters']:,} | {t['adapter_percent_of_backbone']:.2f} | "
            f"{accs} | {mean} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    """Mean test accuracy against adapter + BN parameters per domain (log x), one marker per allocation."""
    markers = "osD^v*Xp"
    fig, ax = subplots(figsize=(6.5, 4.2))
    for i, t in enumerate(table(results)):
        if t["mean_accuracy"] is None:
            continue
        x = t["adapter_parameters"] + t["bn_parameters"]
        label = ROW_NAMES.get(t["row"], t["row"])
        ax.scatter(x, 100 * t["mean_accuracy"], marker=markers[i % len(markers)], s=60, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("parameters per domain: adapters + domain BN (log scale, heads apart)")
    ax.set_ylabel(f"mean test accuracy over {len(results['domains'])} domains (%)")
    ax.set_title(
        f"parameter allocation, {results['settings']['backbone']} at {results['settings']['input_size']} px"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """``out``.md (the table and details) and ``out``.png; ``out``.json is the results file itself."""
    png = plot(results, out.with_suffix(".png"))
    s = results["settings"]
    domains = results["domains"]
    lines = [
        "# Parameter allocation study",
        "",
        f"Command: `{results.get('command', '?')}`  ",
        f"Wall time: {fmt_duration(results['wall_seconds'])} on {results['machine']['torch_threads']} torch "
        f"thread(s), {results['machine']['cpus']} CPUs.  ",
        f"Backbone: `{s['backbone']}` at {s['input_size']} px, {results['backbone']['shared_parameters']:,} "
        f"frozen parameters, {len(results['backbone']['adaptable_units'])} adaptable units.  ",
        f"Every row: {s['epochs']} epochs, batch {s['batch_size']}, SGD lr {s['lr']} (x0.1 at 2/3 and 5/6), "
        f"weight decay {s['weight_decay']}; best epoch on validation, accuracy on the held-out test split.",
        "",
        f"Top-1 test accuracy (%){', mean ± std over ' + str(s.get('seeds', 1)) + ' seeds' if s.get('seeds', 1) > 1 else ''}. "
        "% of backbone: of the shared weights, heads apart (an imported classifier is not backbone). "
        "Adapter parameters are per domain (`net.domain_parameter_counts`); every "
        f"row also trains domain BN ({results['row_info'][s['rows'][0]]['bn_parameters']:,} parameters) and a head.",
        "",
        markdown_table(results),
        "",
        f"![accuracy against parameters]({png.name})",
        "",
        "## Domains",
        "",
        *domains_table(domains),
    ]
    lines += ["", "## Units adapted by each row", ""]
    for row in s["rows"]:
        units = results["row_info"][row]["units"]
        shown = (
            ", ".join(units) if len(units) <= 12 else ", ".join(units[:6]) + ", ..., " + ", ".join(units[-3:])
        )
        lines.append(f"- {ROW_NAMES.get(row, row)}: {len(units)} units ({shown or 'none'})")
    lines.append("")
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines))
    return [md, out.with_suffix(".json"), png]


def with_overrides(settings: AllocationSettings, **changes: Any) -> AllocationSettings:
    """The preset with the given fields replaced (None values are ignored)."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
