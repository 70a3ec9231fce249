"""What the decathlon and the paper's studies share: the domains they run on, how those are loaded and
reported, and their figures.

A preset lists ``DomainEntry``s; ``load_domains`` loads them once (with a held-out test split, logged);
``domain_summary`` / ``domains_table`` record and print what each domain held; Figures are
``training.figures``'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from residual_adapters import MultiDomainNet
from training.data import DomainData, load_domain_data


@dataclass
class DomainEntry:
    """One domain of a preset: a data source and its subset sizes."""

    source: str
    name: str
    train_per_class: int | None = None
    val_per_class: int | None = None
    test_per_class: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.3

    def load(self, input_size: int, seed: int) -> DomainData:
        """This domain's data at ``input_size`` with a held-out test split (the tables report test
        accuracy); ``seed`` fixes the splits."""
        return load_domain_data(
            self.source,
            name=self.name,
            input_size=input_size,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            train_per_class=self.train_per_class,
            val_per_class=self.val_per_class,
            test_per_class=self.test_per_class,
            seed=seed,
        )


def body_parameter_count(net: MultiDomainNet) -> int:
    """Shared parameters without an imported classifier (the paper's counts are "heads apart": the
    ImageNet classifier of torchvision's MobileNetV2, 1.28M weights, is no part of the backbone)."""
    head_prefix = next(name for name, module in net.body.named_modules() if module is net.head) + "."
    return sum(
        v.numel()
        for k, v in net.shared_state_dict().items()
        if "running_" not in k and not k.startswith(head_prefix)
    )


def select_domains(entries: list[DomainEntry], names: list[str] | None) -> list[DomainEntry]:
    """The entries called ``names`` (None: all), refusing names the preset does not have."""
    if not names:
        return entries
    unknown = sorted(set(names) - {e.name for e in entries})
    if unknown:
        raise ValueError(f"unknown domains {unknown}: the preset has {[e.name for e in entries]}")
    return [e for e in entries if e.name in names]


def domain_summary(data: DomainData) -> dict[str, Any]:
    """What a results file records about one domain's data."""
    return {
        "classes": data.num_classes,
        "train": len(data.train),
        "val": len(data.val),
        "test": len(data.test) if data.test is not None else 0,
        "description": data.description,
        "flip": data.flip,
    }


def load_domains(
    entries: list[DomainEntry], input_size: int, seed: int, log: Callable[[str], None]
) -> dict[str, DomainData]:
    """Every entry's data, by name, each described in one log line."""
    datasets: dict[str, DomainData] = {}
    for entry in entries:
        data = entry.load(input_size, seed)
        datasets[entry.name] = data
        log(
            f"{entry.name}: {data.num_classes} classes, train {len(data.train)}, val {len(data.val)}, "
            f"test {len(data.test or [])} ({data.description})"
        )
    return datasets


def domains_table(domains: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the domains a results file records (``domain_summary`` per name)."""
    lines = [
        "| domain | classes | train | val | test | flip | source |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, d in domains.items():
        lines.append(
            f"| {name} | {d['classes']} | {d['train']} | {d['val']} | {d['test']} | {d['flip']} | {d['description']} |"
        )
    return lines
