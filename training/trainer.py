"""Training loop shared by every method: adapters (shared weights frozen), fine-tuning, backbones.

What is trained is a *parameter selection* on a ``MultiDomainNet`` domain:

- ``domain``: ``net.domain_parameters(name)`` only (adapters, domain BN, head). The shared convs keep
  ``requires_grad=False``, so autograd computes input gradients through them but never their weight
  gradients: that is why adapter training is cheaper than fine-tuning.
- ``all``: every parameter of the network (fine-tuning baseline, backbone training from scratch);
  run it on a copy (``finetune_copy``), never on the served backbone.

Recipe (the paper's, scaled to any epoch count): SGD momentum 0.9, step decay x0.1 at 2/3 and x0.1
again at 5/6 of the epochs (80 and 100 of 120), weight decay per group (``.adapter.`` tensors get
their own). bf16 autocast on CUDA. The best epoch on validation is kept. A checkpoint after every
epoch holds everything needed to continue bit-identically (model, optimiser, scheduler, RNG states).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual_adapters import AdapterConfig, MultiDomainNet
from training.data import BatchMaker, DomainData, ImageSet

Trainable = Literal["domain", "all"]


class TrainingError(Exception):
    """Training cannot start or continue (bad checkpoint, unknown domain, diverged loss)."""


@dataclass
class TrainConfig:
    """Optimisation settings of one training run."""

    epochs: int = 10
    """Passes over the training split."""
    batch_size: int = 64
    lr: float = 0.1
    """Initial learning rate (the paper's 0.1; fine-tuning a pretrained network wants less)."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    """Weight decay of BN, head and (fine-tuning) shared weights."""
    adapter_weight_decay: float | None = None
    """Weight decay of the ``.adapter.`` tensors (None: ``weight_decay``)."""
    adapter_lr: float | None = None
    """Initial learning rate of the ``.adapter.`` tensors (None: ``lr``). Zero-initialised low-rank
    adapters on 1x1 convs get small gradients; BN and head are unstable at the same high rate."""
    milestones: tuple[float, ...] = (2 / 3, 5 / 6)
    """Fractions of ``epochs`` where the learning rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    seed: int = 0
    """Seeds the shuffling, the augmentation and torch's global RNG (dropout)."""
    device: str = "cpu"
    amp: bool = True
    """bf16 autocast when the device is CUDA (ignored on the CPU)."""
    channels_last: bool = True
    """Train in channels-last memory format: faster convolutions on CPU (oneDNN) and GPU alike, and frozen
    convs' input gradients cheaper still (ResNet-26 at 64 px, one CPU thread: adapters 1.34x fine-tuning's
    images/s in channels-last, 1.27x in NCHW). Values are the same up to rounding."""
    eval_batch_size: int = 256
    progress: bool = True
    """Show a tqdm progress bar (loss, accuracy, images/s)."""


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    images_per_s: float
    lr: float


@dataclass
class TrainResult:
    best_val_accuracy: float
    best_epoch: int
    history: list[EpochStats] = field(default_factory=list)
    train_images_per_s: float = 0.0
    """Training throughput over all epochs of this run (steps only, evaluation excluded)."""
    trainable_parameters: int = 0
    completed: bool = True
    """False when the run stopped early (``stop_after_epoch``) and can be resumed."""


def finetune_copy(net: MultiDomainNet, name: str, num_classes: int) -> MultiDomainNet:
    """A deep copy of ``net`` with a new domain ``name`` (domain BN + head) and EVERY parameter trainable.

    The served backbone is never modified; the copy's parameter count is the whole network's.
    """
    tuned = copy.deepcopy(net)
    if name in tuned.domains:
        tuned.remove_domain(name)
    tuned.add_domain(name, AdapterConfig(kind="bn"), num_classes)
    tuned.requires_grad_(True)
    return tuned


def trainable_parameters(net: MultiDomainNet, name: str, trainable: Trainable) -> dict[str, nn.Parameter]:
    if trainable == "domain":
        return net.domain_parameters(name)
    params = dict(net.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    return params


def _param_groups(params: dict[str, nn.Parameter], cfg: TrainConfig) -> list[dict[str, Any]]:
    adapter = [p for k, p in params.items() if ".adapter." in f".{k}"]
    rest = [p for k, p in params.items() if ".adapter." not in f".{k}"]
    adapter_wd = cfg.weight_decay if cfg.adapter_weight_decay is None else cfg.adapter_weight_decay
    groups: list[dict[str, Any]] = [{"params": rest, "weight_decay": cfg.weight_decay}]
    if adapter:
        lr = cfg.lr if cfg.adapter_lr is None else cfg.adapter_lr
        groups.append({"params": adapter, "weight_decay": adapter_wd, "lr": lr})
    return groups


def _state(net: MultiDomainNet, name: str, trainable: Trainable) -> dict[str, Tensor]:
    """What a checkpoint and the best-epoch copy keep: the domain, or (fine-tuning) the whole network."""
    if trainable == "domain":
        return {k: v.detach().clone() for k, v in net.domain_state(name).items()}
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _restore(net: MultiDomainNet, name: str, trainable: Trainable, state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        if trainable == "domain":
            for k, v in net.domain_state(name).items():
                v.copy_(state[k])
        else:
            net.load_state_dict(state)


@torch.no_grad()
def predict_logits(
    net: MultiDomainNet, name: str, data: ImageSet, batches: BatchMaker, batch_size: int = 256
) -> Tensor:
    """Logits of every image (centre crop, eval mode), in order."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = [
        net.forward_domain(x.to(device), name).float().cpu()
        for x, _ in batches.eval_batches(data, batch_size)
    ]
    net.train(was_training)
    return torch.cat(out) if out else torch.empty(0, net.domains[name].num_classes)


def accuracy(
    net: MultiDomainNet, name: str, data: ImageSet, batches: BatchMaker, batch_size: int = 256
) -> float:
    logits = predict_logits(net, name, data, batches, batch_size)
    return float((logits.argmax(1) == data.targets).float().mean()) if len(data) else 0.0


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    steps = [math.floor(m * cfg.epochs + 1e-9) for m in cfg.milestones]
    return lambda epoch: cfg.gamma ** sum(epoch >= s for s in steps)


def train_domain(
    net: MultiDomainNet,
    name: str,
    data: DomainData,
    cfg: TrainConfig,
    *,
    trainable: Trainable = "domain",
    checkpoint: Path | None = None,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train domain ``name`` of ``net`` on ``data``; the best epoch on validation is left in ``net``.

    ``checkpoint``: written after every epoch; with ``resume`` an existing one is continued (same
    result as an uninterrupted run). ``stop_after_epoch``: stop after that many epochs (resumable).
    """
    if name not in net.domains:
        raise TrainingError(f"unknown domain {name!r}; add it with net.add_domain first")
    if net.domains[name].num_classes != data.num_classes:
        raise TrainingError(
            f"domain {name!r} has {net.domains[name].num_classes} classes, the data has {data.num_classes}"
        )
    device = torch.device(cfg.device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net.to(device)
    net.to(memory_format=memory_format)  # type: ignore[call-overload]
    params = trainable_parameters(net, name, trainable)
    optimiser = torch.optim.SGD(_param_groups(params, cfg), lr=cfg.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(cfg))
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    batches = BatchMaker(data.preprocessing, data.flip)
    result = TrainResult(best_val_accuracy=-1.0, best_epoch=-1)
    result.trainable_parameters = sum(p.numel() for p in params.values())
    best_state: dict[str, Tensor] | None = None
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.exists():
        ckpt = load_checkpoint(checkpoint)
        if ckpt["name"] != name or ckpt["trainable"] != trainable or ckpt["config"] != _config_key(cfg):
            raise TrainingError(f"{checkpoint} is from a different run (domain, mode or settings differ)")
        _restore(net, name, trainable, ckpt["state"])
        optimiser.load_state_dict(ckpt["optimiser"])
        scheduler.load_state_dict(ckpt["scheduler"])
        g.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        best_state = ckpt["best_state"]
        result.best_val_accuracy, result.best_epoch = ckpt["best_val_accuracy"], ckpt["best_epoch"]
        result.history = [EpochStats(**h) for h in ckpt["history"]]
        start_epoch = ckpt["epoch"]
        if log:
            log(f"resumed {name} from {checkpoint} after epoch {start_epoch}")
    autocast = cfg.amp and device.type == "cuda"
    total_images, total_time = 0, 0.0
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            result.completed = False
            break
        net.train()
        seen, correct, loss_sum, epoch_time = 0, 0, 0.0, 0.0
        bar = _progress(cfg, data.train, batches, f"{name} {epoch + 1}/{cfg.epochs}")
        for x, y in batches.train_batches(data.train, cfg.batch_size, g):
            t0 = time.perf_counter()
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = net.forward_domain(x, name)
                loss = F.cross_entropy(logits.float(), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingError(f"loss is {loss_value} at epoch {epoch + 1}: lower the learning rate")
            epoch_time += time.perf_counter() - t0
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss_value * len(y)
            if bar is not None:
                bar.update(len(y))
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}",
                    acc=f"{correct / seen:.3f}",
                    img_s=f"{seen / epoch_time:.0f}",
                )
        if bar is not None:
            bar.close()
        scheduler.step()
        val_acc = accuracy(net, name, data.val, batches, cfg.eval_batch_size)
        stats = EpochStats(
            epoch=epoch + 1,
            train_loss=loss_sum / max(seen, 1),
            train_accuracy=correct / max(seen, 1),
            val_accuracy=val_acc,
            images_per_s=seen / epoch_time if epoch_time else 0.0,
            lr=float(optimiser.param_groups[0]["lr"]),
        )
        result.history.append(stats)
        total_images += seen
        total_time += epoch_time
        if val_acc > result.best_val_accuracy:  # first best wins on ties: fewer epochs, same accuracy
            result.best_val_accuracy, result.best_epoch = val_acc, epoch + 1
            best_state = _state(net, name, trainable)
        if log:
            log(
                f"{name} epoch {epoch + 1}/{cfg.epochs}: loss {stats.train_loss:.4f} "
                f"train acc {stats.train_accuracy:.4f} val acc {val_acc:.4f} ({stats.images_per_s:.0f} img/s)"
            )
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                {
                    "name": name,
                    "trainable": trainable,
                    "config": _config_key(cfg),
                    "epoch": epoch + 1,
                    "state": _state(net, name, trainable),
                    "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": g.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "best_state": best_state,
                    "best_val_accuracy": result.best_val_accuracy,
                    "best_epoch": result.best_epoch,
                    "history": [asdict(h) for h in result.history],
                },
            )
    result.train_images_per_s = total_images / total_time if total_time else 0.0
    if result.completed and best_state is not None:
        _restore(net, name, trainable, best_state)
    net.eval()
    return result


def _config_key(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint (device and display may differ)."""
    key = asdict(cfg)
    for k in ("device", "progress", "eval_batch_size"):
        key.pop(k)
    key["milestones"] = list(key["milestones"])
    return key


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint the operator named; ``weights_only`` keeps pickle from running code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
    except Exception as exc:
        raise TrainingError(f"cannot read checkpoint {path}: {exc}") from None


def _progress(cfg: TrainConfig, data: ImageSet, batches: BatchMaker, desc: str) -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=len(data), desc=desc, unit="img", leave=False, dynamic_ncols=True)
