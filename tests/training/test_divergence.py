"""Warm-up, clipping and divergence: a run that explodes stops with the rate named, never trains on silently."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from residual_adapters import AdapterConfig
from tests.training.conftest import tiny_net
from training.data import DomainData, load_domain_data
from training.recipes import FINETUNE, family, recipe_for
from training.trainer import (
    TrainConfig,
    TrainingDiverged,
    _DivergenceWatch,
    _lr_lambda,
    steps_per_epoch,
    train_domain,
)


@pytest.fixture(scope="module")
def more_digits() -> DomainData:
    return load_domain_data("digits", input_size=16, train_per_class=40, val_per_class=10)


def test_a_learning_rate_far_too_high_stops_the_run_naming_it(more_digits: DomainData) -> None:
    cfg = TrainConfig(epochs=3, batch_size=32, lr=5.0, progress=False)
    net = tiny_net()
    net.add_domain("hot", AdapterConfig(kind="parallel"), 10)
    with pytest.raises(
        TrainingDiverged, match=r"at epoch [12]/3 with learning rate 5; .*try --lr 0\.5"
    ) as info:
        train_domain(net, "hot", more_digits, cfg)
    assert info.value.lr == 5.0
    calm = tiny_net()  # the same run at a sane rate trains through and learns
    calm.add_domain("calm", AdapterConfig(kind="parallel"), 10)
    result = train_domain(calm, "calm", more_digits, replace(cfg, lr=0.05))
    assert result.history[-1].train_loss < math.log(10) and result.best_val_accuracy > 0.3


def test_the_watch_tolerates_noise_and_catches_a_climb_or_a_nan() -> None:
    learning = _DivergenceWatch(TrainConfig(), num_classes=10)
    for loss in [2.4, 2.9, 3.4, 2.2, 1.5, 6.0, 1.0, 0.8, 0.5]:  # noisy, one bad batch, but learning
        learning.check(loss, 0.01, 1, 3)
    climbing = _DivergenceWatch(TrainConfig(), num_classes=10)
    with pytest.raises(TrainingDiverged, match=r"climbed from 2\.4 .* uniform guess scores 2\.3"):
        for step in range(100):
            climbing.check(2.4 + 0.2 * step, 0.05, 2, 3)
    assert step > 10  # the smoothed loss, not one batch, crossed 2 x 2.4
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at epoch 1/3 with learning rate 0\.05"):
        _DivergenceWatch(TrainConfig(), num_classes=10).check(math.nan, 0.05, 1, 3)


def test_warmup_ramps_then_the_step_decay_applies() -> None:
    factor = _lr_lambda(TrainConfig(epochs=6, warmup_epochs=1.0), epoch_steps=4)
    assert [factor(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert factor(4 * 4) == pytest.approx(0.1) and factor(5 * 4) == pytest.approx(0.01)  # epochs 4 and 5 of 6
    assert _lr_lambda(TrainConfig(epochs=6), epoch_steps=4)(0) == 1.0
    assert steps_per_epoch(66, 32) == 3 and steps_per_epoch(65, 32) == 2  # a 1-image batch is dropped


def test_clipping_bounds_every_step(digits: DomainData) -> None:
    moved = {}
    for clip in (None, 1e-9):
        net = tiny_net()
        net.add_domain("d", AdapterConfig(kind="parallel"), 10)
        before = {k: v.detach().clone() for k, v in net.domain_parameters("d").items()}
        cfg = TrainConfig(
            epochs=1, batch_size=32, lr=0.1, weight_decay=0.0, clip_grad_norm=clip, progress=False
        )
        train_domain(net, "d", digits, cfg)
        moved[clip] = max(
            float((v.detach() - before[k]).abs().max()) for k, v in net.domain_parameters("d").items()
        )
    # lr x clip x (1 + 0.9 + 0.81 + ...) <= 1e-9 per step: nothing moves; unclipped, 1000x that and more.
    assert moved[1e-9] < 1e-7 and moved[None] > 1e-4


def test_every_kind_has_a_recipe_on_both_families() -> None:
    for arch in ("mobilenet_v2", "resnet26", "resnet18"):
        for kind in ("parallel", "series", "lowrank", "bn", "head", FINETUNE):
            recipe = recipe_for(arch, kind)
            assert 0 < recipe.lr < 1 and recipe.warmup_epochs >= 0
    assert family("resnet50") == "resnet" and family("mobilenet_v2") == "mobilenet_v2"
    with pytest.raises(ValueError, match="unknown kind"):
        recipe_for("resnet26", "everything")
    torch.manual_seed(0)


def test_a_low_rank_adapter_starts_at_zero_with_only_u_receiving_gradient(more_digits: DomainData) -> None:
    # Why MobileNetV2's lowrank recipe has no warm-up: U V starts at U = 0, so the first steps move U alone
    # (V's gradient is U^T dL/dW = 0), and a warm-up would shrink those steps further.
    assert recipe_for("mobilenet_v2", "lowrank").warmup_epochs == 0
    net = tiny_net()
    net.add_domain("low", AdapterConfig(kind="lowrank", rank=2), 10)
    params = net.domain_parameters("low")
    us = {k: v for k, v in params.items() if ".adapter." in k and k.endswith(".u")}
    vs = {k: v for k, v in params.items() if ".adapter." in k and k.endswith(".v")}
    assert us and len(us) == len(vs) and all(float(u.detach().abs().max()) == 0.0 for u in us.values())
    net.train()
    from training.data import BatchMaker

    x = BatchMaker(more_digits.preprocessing, flip=False).centre(more_digits.train.images[:16])
    torch.nn.functional.cross_entropy(net.forward_domain(x, "low"), more_digits.train.targets[:16]).backward()
    assert all(v.grad is None or float(v.grad.abs().max()) == 0.0 for v in vs.values())
    assert sum(float(u.grad.abs().sum()) for u in us.values() if u.grad is not None) > 0


def test_bn_warm_start_sets_the_domain_statistics_and_leaves_the_base_alone(digits: DomainData) -> None:
    from training.data import BatchMaker
    from training.trainer import domain_batch_norms, warm_start_batch_norm

    net = tiny_net()
    net.add_domain("d", AdapterConfig(kind="bn"), 10)
    base = {k: v.clone() for k, v in net.shared_state_dict().items()}
    first = net.units[0]
    seen: list[torch.Tensor] = []
    hook = first.domains["d"].bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    cfg = TrainConfig(eval_batch_size=len(digits.train))  # one batch: its statistics are the running ones
    batches = BatchMaker(digits.preprocessing, digits.flip)
    warm_start_batch_norm(net, "d", "domain", digits.train, batches, cfg, torch.contiguous_format)
    hook.remove()
    (x,) = seen
    bn = first.domains["d"].bn
    assert len(domain_batch_norms(net, "d", "domain")) == len(net.units)
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, x.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert bn.momentum == first.base_bn.momentum  # restored after the cumulative pass
    for k, v in net.shared_state_dict().items():
        assert torch.equal(v, base[k]), k
