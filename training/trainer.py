"""Training loop shared by every method: adapters (shared weights frozen), fine-tuning, backbones.

What is trained is a *parameter selection* on a ``MultiDomainNet`` domain:

- ``domain``: ``net.domain_parameters(name)`` only (adapters, domain BN, head). The shared convs keep
  ``requires_grad=False``, so autograd computes input gradients through them but never their weight
  gradients: that is why adapter training is cheaper than fine-tuning.
- ``all``: every parameter of the network (fine-tuning baseline, backbone training from scratch);
  run it on a copy (``finetune_copy``), never on the served backbone.

Recipe (the paper's, scaled to any epoch count): SGD momentum 0.9, step decay x0.1 at 2/3 and x0.1
again at 5/6 of the epochs (80 and 100 of 120), weight decay per group (adapter tensors, ``.adapter.`` and ``.depthwise.``, get
their own); optionally a linear warm-up and gradient-norm clipping (``training.recipes`` holds the
measured defaults per backbone and kind). bf16 autocast on CUDA. The best epoch on validation is kept.
A checkpoint after every epoch holds everything needed to continue bit-identically (model, optimiser,
scheduler, RNG states).

Divergence is caught, never trained through: a non-finite loss, or a smoothed loss that climbs to
``divergence_factor`` times where it started (worse than guessing uniformly), stops the run with a
``TrainingDiverged`` naming the learning rate.
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

from residual_adapters import AdapterConfig, MultiDomainNet, is_adapter_tensor
from training.data import BatchMaker, DomainData, ImageSet

Trainable = Literal["domain", "all"]


class TrainingError(Exception):
    """Training cannot start or continue (bad checkpoint, unknown domain, diverged loss)."""


class TrainingDiverged(TrainingError):
    """The loss became non-finite or exploded: the learning rate is too high for this run."""

    def __init__(self, message: str, lr: float) -> None:
        super().__init__(message)
        self.lr = lr


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
    """Weight decay of the adapter tensors (``.adapter.``, ``.depthwise.``; None: ``weight_decay``)."""
    adapter_lr: float | None = None
    """Initial learning rate of the adapter tensors (None: ``lr``). Zero-initialised low-rank
    adapters on 1x1 convs get small gradients; BN and head are unstable at the same high rate."""
    head_lr: float | None = None
    """Initial learning rate of the head (None: ``lr``). A fresh linear head on fixed features takes a
    higher rate than the adapters and BN that perturb a pretrained body."""
    warmup_epochs: float = 0.0
    """Linear learning-rate warm-up from lr/steps to lr over this many epochs (0: none). The first
    steps of a fresh head on a pretrained body see the largest gradients."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm of the trained tensors to this (None: no clipping)."""
    bn_warm_start: bool = False
    """Before the first step, set the domain's BN running statistics to the training images' own (one
    forward pass, centre crops). A new domain's BN starts from the backbone's statistics (ImageNet
    photos at 224 px for MobileNetV2); with a few hundred steps the momentum-0.1 running averages would
    still carry part of them at evaluation time."""
    divergence_factor: float = 2.0
    """Stop when the smoothed training loss exceeds this many times max(first loss, ln classes):
    a loss twice that of a uniform guess means the run is confidently wrong, not learning."""
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
    """BN (and, fine-tuning, shared weights) at ``lr`` first (the rate progress and errors name), then the
    head at ``head_lr`` and the adapters at ``adapter_lr`` where those are set."""
    adapter = [p for k, p in params.items() if is_adapter_tensor(k)]  # 1x1 matrices, depthwise deltas
    own_head = cfg.head_lr is not None
    head = [p for k, p in params.items() if own_head and k.startswith("head.")]
    rest = [
        p for k, p in params.items() if not is_adapter_tensor(k) and not (own_head and k.startswith("head."))
    ]
    adapter_wd = cfg.weight_decay if cfg.adapter_weight_decay is None else cfg.adapter_weight_decay
    groups: list[dict[str, Any]] = [{"params": rest, "weight_decay": cfg.weight_decay}]
    if head:
        groups.append({"params": head, "weight_decay": cfg.weight_decay, "lr": cfg.head_lr})
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


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimiser steps in one epoch (``BatchMaker.train_batches`` drops a final 1-image batch)."""
    full, rest = divmod(images, batch_size)
    return full + (1 if rest >= 2 else 0)


def _lr_lambda(cfg: TrainConfig, epoch_steps: int) -> Callable[[int], float]:
    """Multiplier of the learning rate at optimiser step ``step``: warm-up, then the step decay."""
    milestones = [math.floor(m * cfg.epochs + 1e-9) for m in cfg.milestones]
    warmup = max(1, round(cfg.warmup_epochs * epoch_steps)) if cfg.warmup_epochs > 0 else 0
    epoch_steps = max(1, epoch_steps)

    def factor(step: int) -> float:
        decay = cfg.gamma ** sum(step // epoch_steps >= m for m in milestones)
        return decay * min(1.0, (step + 1) / warmup) if warmup else decay

    return factor


class _DivergenceWatch:
    """Training loss against where it started (see ``TrainConfig.divergence_factor``).

    Two signs, both measured against ``max(first loss, ln classes)`` (a uniform guess scores ln K):
    the loss smoothed over about ten steps exceeding ``divergence_factor`` times that (an explosion),
    or a whole epoch after the first averaging above it (an oscillation that never learns: the run
    of issue 11 went 2.60, 6.42, 4.93, 2.94, 3.07). Epochs of fewer than 5 steps are too noisy to judge.
    """

    def __init__(self, cfg: TrainConfig, num_classes: int) -> None:
        self.factor = cfg.divergence_factor
        self.floor = math.log(max(num_classes, 2))
        self.start: float | None = None
        self.smoothed = 0.0

    @property
    def reference(self) -> float:
        return max(self.start or 0.0, self.floor)

    def _diverged(self, what: str, lr: float, epoch: int, epochs: int) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged: {what} at epoch {epoch}/{epochs} with learning rate {lr:g}; "
            f"lower the learning rate (try --lr {lr / 10:g})",
            lr,
        )

    def check(self, loss: float, lr: float, epoch: int, epochs: int) -> None:
        if not math.isfinite(loss):
            raise self._diverged(f"the loss is {loss}", lr, epoch, epochs)
        if self.start is None:
            self.start = self.smoothed = loss
            return
        self.smoothed = 0.9 * self.smoothed + 0.1 * loss
        if self.smoothed > self.factor * self.reference:
            raise self._diverged(
                f"the loss climbed from {self.start:.3g} to {self.smoothed:.3g} "
                f"(a uniform guess scores {self.floor:.3g})",
                lr,
                epoch,
                epochs,
            )

    def end_epoch(self, mean_loss: float, steps: int, lr: float, epoch: int, epochs: int) -> None:
        if epoch >= 2 and steps >= 5 and mean_loss > self.reference:
            raise self._diverged(
                f"the loss averaged {mean_loss:.3g} over an epoch, above its start {self.start:.3g} "
                f"(a uniform guess scores {self.floor:.3g})",
                lr,
                epoch,
                epochs,
            )


def domain_batch_norms(net: MultiDomainNet, name: str, trainable: Trainable) -> list[nn.BatchNorm2d]:
    """The BN layers a run trains (the domain's own; every BN when fine-tuning), never the base BN."""
    params = {id(p) for p in trainable_parameters(net, name, trainable).values()}
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and id(m.weight) in params]


@torch.no_grad()
def warm_start_batch_norm(
    net: MultiDomainNet,
    name: str,
    trainable: Trainable,
    data: ImageSet,
    batches: BatchMaker,
    cfg: TrainConfig,
    memory_format: torch.memory_format,
) -> None:
    """Running statistics = the cumulative average over ``data`` (centre crops), for ``bn_warm_start``."""
    norms = domain_batch_norms(net, name, trainable)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the whole pass
    net.train()
    device = torch.device(cfg.device)
    for x, _ in batches.eval_batches(data, cfg.eval_batch_size):
        if len(x) > 1:  # training-mode BN needs two images
            net.forward_domain(x.to(device, memory_format=memory_format), name)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


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
    epoch_steps = steps_per_epoch(len(data.train), cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(cfg, epoch_steps))  # per step
    watch = None if cfg.divergence_factor <= 0 else _DivergenceWatch(cfg, data.num_classes)
    clipped = [p for p in params.values() if p.requires_grad]
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
    if cfg.bn_warm_start and start_epoch == 0:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            warm_start_batch_norm(net, name, trainable, data.train, batches, cfg, memory_format)
    total_images, total_time = 0, 0.0
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            result.completed = False
            break
        net.train()
        seen, correct, loss_sum, epoch_time, steps = 0, 0, 0.0, 0.0, 0
        step_lr = float(optimiser.param_groups[0]["lr"])
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
            if cfg.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(clipped, cfg.clip_grad_norm)
            step_lr = float(optimiser.param_groups[0]["lr"])
            optimiser.step()
            scheduler.step()
            loss_value = float(loss.detach())
            if watch is not None:
                watch.check(loss_value, step_lr, epoch + 1, cfg.epochs)
            epoch_time += time.perf_counter() - t0
            seen += len(y)
            steps += 1
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
        if watch is not None:
            watch.end_epoch(loss_sum / max(seen, 1), steps, step_lr, epoch + 1, cfg.epochs)
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
