"""Accuracy of a domain: top-1, top-5 and the confusion matrix (plotted as a PNG with matplotlib's Agg)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from residual_adapters import MultiDomainNet
from training.data import BatchMaker, ImageSet
from training.figures import save_figure, subplots
from training.trainer import predict_logits


@dataclass
class Evaluation:
    domain: str
    images: int
    top1: float
    top5: float
    """Top-5 accuracy (equals 1.0 when there are at most 5 classes)."""
    confusion: list[list[int]]
    """confusion[true][predicted] counts."""
    labels: list[str]

    def to_dict(self) -> dict[str, object]:
        return {
            "domain": self.domain,
            "images": self.images,
            "top1": self.top1,
            "top5": self.top5,
            "labels": self.labels,
            "confusion": self.confusion,
        }


def evaluate(
    net: MultiDomainNet,
    name: str,
    data: ImageSet,
    batches: BatchMaker,
    labels: list[str],
    *,
    batch_size: int = 256,
) -> Evaluation:
    """Evaluate domain ``name`` on ``data`` with the serving geometry (centre crop)."""
    logits = predict_logits(net, name, data, batches, batch_size)
    targets = data.targets
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    n = len(targets)
    top1 = float((top[:, 0] == targets).float().mean()) if n else 0.0
    top5 = float((top == targets[:, None]).any(1).float().mean()) if n else 0.0
    classes = len(labels)
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    confusion.index_put_((targets, top[:, 0]), torch.ones(n, dtype=torch.int64), accumulate=True)
    return Evaluation(name, n, top1, top5, confusion.tolist(), list(labels))


def plot_confusion(evaluation: Evaluation, path: Path, title: str | None = None) -> Path:
    """Row-normalised confusion matrix as a PNG (counts annotated for up to 20 classes)."""
    counts = torch.tensor(evaluation.confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    n = len(evaluation.labels)
    side = min(4 + 0.4 * n, 24)
    fig, ax = subplots(figsize=(side, side))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= 50:
        ax.set_xticks(range(n), evaluation.labels, rotation=90)
        ax.set_yticks(range(n), evaluation.labels)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        title
        or f"{evaluation.domain}: top-1 {evaluation.top1:.1%}, top-5 {evaluation.top5:.1%} (n={evaluation.images})"
    )
    return save_figure(fig, path)
