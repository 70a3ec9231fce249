"""A run interrupted after an epoch and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch

from residual_adapters import AdapterConfig
from tests.training.conftest import tiny_net
from training.data import DomainData
from training.trainer import TrainConfig, TrainingError, train_domain

CFG = TrainConfig(epochs=3, batch_size=32, lr=0.05, progress=False, seed=7)


@pytest.fixture(autouse=True)
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("trainable", ["domain", "all"])
def test_resume_equals_uninterrupted(digits: DomainData, tmp_path, trainable: str) -> None:
    config = AdapterConfig(kind="parallel") if trainable == "domain" else AdapterConfig(kind="bn")
    straight = tiny_net()
    straight.add_domain("d", config, 10)
    full = train_domain(straight, "d", digits, CFG, trainable=trainable)  # type: ignore[arg-type]

    ckpt = tmp_path / "run.pt"
    first = tiny_net()
    first.add_domain("d", config, 10)
    partial = train_domain(first, "d", digits, CFG, trainable=trainable, checkpoint=ckpt, stop_after_epoch=1)  # type: ignore[arg-type]
    assert not partial.completed and len(partial.history) == 1

    resumed = tiny_net()  # a new process: nothing but the checkpoint carries over
    resumed.add_domain("d", config, 10)
    result = train_domain(resumed, "d", digits, CFG, trainable=trainable, checkpoint=ckpt, resume=True)  # type: ignore[arg-type]

    assert [h.val_accuracy for h in result.history] == [h.val_accuracy for h in full.history]
    assert [h.train_loss for h in result.history] == [h.train_loss for h in full.history]
    assert result.best_epoch == full.best_epoch
    state = resumed.state_dict() if trainable == "all" else resumed.domain_state("d")
    expected = straight.state_dict() if trainable == "all" else straight.domain_state("d")
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


def test_resume_refuses_a_checkpoint_of_another_run(digits: DomainData, tmp_path) -> None:
    ckpt = tmp_path / "run.pt"
    net = tiny_net()
    net.add_domain("d", AdapterConfig(kind="bn"), 10)
    train_domain(net, "d", digits, CFG, checkpoint=ckpt, stop_after_epoch=1)
    other = tiny_net()
    other.add_domain("d", AdapterConfig(kind="bn"), 10)
    changed = TrainConfig(epochs=3, batch_size=32, lr=0.5, progress=False, seed=7)
    with pytest.raises(TrainingError, match="different run"):
        train_domain(other, "d", digits, changed, checkpoint=ckpt, resume=True)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot read checkpoint"):
        train_domain(other, "d", digits, CFG, checkpoint=ckpt, resume=True)
