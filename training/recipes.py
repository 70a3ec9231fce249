"""The default optimisation settings per backbone family and adapter kind, chosen from measurements.

One owner for these facts: the CLI takes its defaults from here and ``bench/train_defaults.py`` (the
runs that chose them, tabled in ``training/README.md``) reads them from here too, so the table always
judges what a user gets. A flag given on the command line overrides the recipe.

Families: ``mobilenet_v2`` (the offline ImageNet weights: a pretrained body whose BN statistics come from
224 px photos) and ``resnet`` (the paper's ResNet-26 trained by ``train backbone``; torchvision ResNets
share its settings, unmeasured).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from residual_adapters import ADAPTER_KINDS
from training.trainer import TrainConfig

FINETUNE = "finetune"
"""The pseudo-kind of ``train finetune`` (every weight trained)."""

DEFAULT_LOWRANK_RANK = 8
"""Rank of ``--kind lowrank`` adapters when ``--rank`` is not given."""


@dataclass(frozen=True)
class Recipe:
    """Settings that make a run converge; everything else is ``TrainConfig``'s default."""

    lr: float
    """Initial learning rate (SGD, momentum 0.9, step decay at 2/3 and 5/6 of the epochs)."""
    warmup_epochs: float = 1.0
    """Linear warm-up: a fresh head on a frozen body sees its largest gradients in the first steps."""
    clip_grad_norm: float | None = 5.0
    """Global gradient-norm clip: bounds the steps a bad batch can take, rarely active otherwise."""
    head_lr: float | None = None
    """The head's own initial learning rate (``TrainConfig.head_lr``; None: ``lr``)."""
    bn_warm_start: bool = False
    """Start the domain BN's running statistics from the training images (``TrainConfig.bn_warm_start``)."""

    def train_config(self, **fields: Any) -> TrainConfig:
        """A ``TrainConfig`` with these settings (its fields of the same names); ``fields`` set the others
        and override these (a flag given on the command line)."""
        return TrainConfig(**{**asdict(self), **fields})


# Chosen on digits, textures and photo patches at 32 px, 4 epochs (training/README.md has the runs).
_MEASURED: dict[tuple[str, str], Recipe] = {
    ("mobilenet_v2", "parallel"): Recipe(lr=0.03),
    ("mobilenet_v2", "series"): Recipe(lr=0.03),
    # No warm-up: a low-rank product U V starts at U = 0, so only U moves at first, with small gradients
    # through a random V, and a warm-up slows that further (2-seed mean on the choose sets: 87.7% without
    # warm-up, 85.1% with one epoch; training/README.md, "How they were chosen", 6).
    ("mobilenet_v2", "lowrank"): Recipe(lr=0.03, warmup_epochs=0.0),
    ("mobilenet_v2", "bn"): Recipe(lr=0.03, bn_warm_start=True),
    ("mobilenet_v2", "head"): Recipe(lr=0.1),
    ("mobilenet_v2", FINETUNE): Recipe(lr=0.01),
    ("resnet", "parallel"): Recipe(lr=0.3),
    ("resnet", "series"): Recipe(lr=0.3),
    ("resnet", "lowrank"): Recipe(lr=0.3),
    ("resnet", "bn"): Recipe(lr=0.3, bn_warm_start=True),
    ("resnet", "head"): Recipe(lr=0.1),
    ("resnet", FINETUNE): Recipe(lr=0.03),
}


def family(arch: str) -> str:
    """The recipe family of a backbone architecture name (``MultiDomainNet.architecture["name"]``)."""
    return "mobilenet_v2" if arch == "mobilenet_v2" else "resnet"


def recipe_for(arch: str, kind: str) -> Recipe:
    """The default settings for training a ``kind`` domain (or ``finetune``) on an ``arch`` backbone."""
    if kind not in (*ADAPTER_KINDS, FINETUNE):
        raise ValueError(f"unknown kind {kind!r}; expected one of {(*ADAPTER_KINDS, FINETUNE)}")
    if (
        kind == "depthwise"
    ):  # parallel adapters plus tiny depthwise deltas: parallel's rate, not measured apart
        kind = "parallel"
    return _MEASURED[(family(arch), kind)]
