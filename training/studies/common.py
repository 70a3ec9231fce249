"""What both studies share: the backbone and data they run on, one trained-and-tested row, the results file.

A study is a list of *rows* (one training run each, e.g. "digits, deep-third adapters" or "mnist,
fine-tune, 20 images per class, seed 1"). After each finished row the whole results file (JSON) is
rewritten atomically; a restarted study reads it back and skips the rows already there, so an
interruption costs at most the row that was running. The file also records the study's settings: a
restart with different settings is refused instead of mixing two experiments in one table.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from residual_adapters import AdapterConfig, MultiDomainNet
from training.backbones import load_backbone
from training.data import BatchMaker, DomainData
from training.evaluate import evaluate
from training.experiment import DomainEntry, body_parameter_count, load_domains
from training.trainer import TrainConfig, finetune_copy, train_domain

Log = Callable[[str], None]
AfterRow = Callable[[MultiDomainNet, str, dict[str, Any]], None]
"""Called with (trained network, domain name, row) after each row is trained and tested."""


class StudyError(Exception):
    """A study cannot run or continue (unknown backbone, a results file from other settings...)."""


@dataclass
class StudySettings:
    """What every study needs: the backbone, the domains and the optimisation shared by all rows."""

    backbone: str
    """``mobilenet_v2`` (offline ImageNet weights), ``<arch>[:<width>]`` (random weights, tests), or a
    backbone artifact directory written by ``multidomain train backbone``."""
    input_size: int
    domains: list[DomainEntry]
    batch_size: int = 32
    weight_decay: float = 5e-4
    seed: int = 0
    """Seed of the data splits and (plus the row's own seed) of each row's initialisation and shuffling."""
    threads: int | None = None
    """torch CPU threads (1 on a shared machine: competing OpenMP pools spin instead of working)."""
    grad_clip: float | None = None
    """Clip each trained tensor's gradient to this L2 norm (None: no clipping). ImageNet MobileNetV2 on
    small grayscale domains has BN channels with near-zero variance whose 1/sqrt(var + eps) factors
    make rare batches' gradients explode (x1e7 in one step, then chance accuracy): see docs/studies.md."""


def begin_study(
    study: str, settings: StudySettings, out_json: Path, *, fresh: bool, log: Log
) -> tuple[ResultsFile, MultiDomainNet, dict[str, DomainData]]:
    """What every study does first: its threads, its results file (new or resumed, refused when written
    with other settings or another backbone), its backbone and its domains' data."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = ResultsFile.open(out_json, study, settings_dict(settings), fresh=fresh, log=log)
    net = load_backbone(settings.backbone)
    results.check_backbone(net.fingerprint())
    return results, net, load_domains(settings.domains, settings.input_size, settings.seed, log)


def backbone_summary(settings: StudySettings, net: MultiDomainNet) -> dict[str, Any]:
    """What a results file records about the backbone its rows were trained on."""
    return {
        "spec": settings.backbone,
        # heads apart: an imported ImageNet classifier is not backbone (it would understate "% of backbone")
        "shared_parameters": body_parameter_count(net),
        "fingerprint": net.fingerprint(),
    }


class RowClock:
    """After each finished row: save the results file and estimate the time left from the rows run so far
    (rows kept from an earlier run cost nothing now, so they are not counted)."""

    def __init__(self, results: ResultsFile, total: int, command: str | None, started: float) -> None:
        self.results = results
        self.total = total
        self.command = command
        self.started = started
        """``time.perf_counter()`` when the study started (its wall time includes loading the data)."""
        self.ran = 0

    def row_done(self, index: int) -> str:
        """Save after row ``index`` (1-based, of ``total``); returns "about N min left"."""
        self.ran += 1
        elapsed = time.perf_counter() - self.started
        self.results.save(self.results.seconds_before + elapsed, self.command)
        return f"about {fmt_duration(elapsed / self.ran * (self.total - index))} left"

    def finish(self) -> dict[str, Any]:
        """The final save; the results as written."""
        self.results.save(self.results.seconds_before + time.perf_counter() - self.started, self.command)
        return read_results(self.results.path)


@dataclass
class RowOutcome:
    """One trained and tested row."""

    test_accuracy: float
    val_accuracy: float
    best_epoch: int
    epochs: int
    train_seconds: float
    images_per_s: float
    trainable_parameters: int


def train_and_test(
    net: MultiDomainNet,
    domain: str,
    data: DomainData,
    cfg: TrainConfig,
    *,
    adapter: AdapterConfig | None,
    grad_clip: float | None = None,
    after_row: Callable[[MultiDomainNet, str], None] | None = None,
) -> RowOutcome:
    """Train one row on ``data`` and test it; ``adapter`` None means fine-tuning a copy of ``net``.

    The domain's initial tensors (head) are drawn from the row's own seed, so a row gives the same
    result whether it runs first or after a restart. The domain is removed from ``net`` afterwards.
    """
    assert data.test is not None
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if adapter is None:
        model = finetune_copy(net, domain, data.num_classes)
        trained = dict(model.named_parameters())
    else:
        model = net
        net.add_domain(domain, adapter, data.num_classes)
        trained = net.domain_parameters(domain)
    handles = [] if grad_clip is None else [p.register_hook(_clipper(grad_clip)) for p in trained.values()]
    try:
        result = train_domain(model, domain, data, cfg, trainable="all" if adapter is None else "domain")
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - t0
    model.to("cpu")
    ev = evaluate(model, domain, data.test, BatchMaker(data.preprocessing, data.flip), data.labels)
    if after_row is not None:
        after_row(model, domain)
    if adapter is not None:
        net.remove_domain(domain)
    return RowOutcome(
        test_accuracy=ev.top1,
        val_accuracy=result.best_val_accuracy,
        best_epoch=result.best_epoch,
        epochs=cfg.epochs,
        train_seconds=seconds,
        images_per_s=result.train_images_per_s,
        trainable_parameters=result.trainable_parameters,
    )


def _clipper(max_norm: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook scaling one tensor's gradient down to ``max_norm`` (the trainer has no clipping:
    a hook per tensor keeps this a wrapper around it)."""

    def clip(grad: torch.Tensor) -> torch.Tensor:
        norm = grad.norm()
        return grad * (max_norm / norm) if norm > max_norm else grad

    return clip


# -- the results file ---------------------------------------------------------------------------------------


@dataclass
class ResultsFile:
    """The JSON results of a study, rewritten after every row; read back to resume."""

    path: Path
    study: str
    settings: dict[str, Any]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """Study-level facts (backbone size, domains, the low-rank rank chosen...)."""
    seconds_before: float = 0.0
    """Training wall time spent by earlier (interrupted) invocations."""
    previous_fingerprint: str | None = None
    """The backbone fingerprint the kept rows were trained on."""

    @classmethod
    def open(cls, path: Path, study: str, settings: dict[str, Any], *, fresh: bool, log: Log) -> ResultsFile:
        """Start a new file, or continue an existing one written with the same settings."""
        if fresh or not path.exists():
            return cls(path, study, settings)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StudyError(f"cannot read results file {path}: {exc}; remove it or pass --fresh") from None
        if data.get("study") != study or data.get("settings") != settings:
            raise StudyError(
                f"{path} holds results of other settings ({data.get('study')}); pass --fresh to start over "
                "or choose another --out"
            )
        rows = data.get("rows", {})
        log(f"resuming from {path}: {len(rows)} finished rows kept")
        return cls(
            path,
            study,
            settings,
            rows=rows,
            seconds_before=float(data.get("wall_seconds", 0.0)),
            previous_fingerprint=data.get("backbone", {}).get("fingerprint"),
        )

    def check_backbone(self, fingerprint: str) -> None:
        """Refuse to mix rows trained on different backbone weights (e.g. an artifact directory replaced)."""
        if self.rows and self.previous_fingerprint not in (None, fingerprint):
            raise StudyError(
                f"{self.path} was written with another backbone (fingerprint {str(self.previous_fingerprint)[:12]}..., "
                f"now {fingerprint[:12]}...); pass --fresh to start over"
            )

    def save(self, wall_seconds: float, command: str | None = None) -> None:
        """Write atomically: a kill mid-write leaves the previous file, never half a file."""
        payload = {
            "study": self.study,
            "settings": self.settings,
            **self.extra,
            "rows": self.rows,
            "wall_seconds": wall_seconds,
            "machine": {
                "torch_threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
            },
        }
        if command is not None:
            payload["command"] = command
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(self.path)


def read_results(path: Path) -> dict[str, Any]:
    """A study's results file as written (what the report functions take)."""
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def settings_dict(settings: Any) -> dict[str, Any]:
    """JSON-normalised settings (tuples become lists) so a reread file compares equal."""
    data = asdict(settings)
    data.pop("threads", None)  # how fast, not what: a resumed run may use other threads
    return json.loads(json.dumps(data))  # type: ignore[no-any-return]


def fmt_duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
