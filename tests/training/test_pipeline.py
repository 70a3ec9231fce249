"""Train -> export -> validate -> load -> predict, and the frozen-backbone guarantee, on tiny real data."""

from __future__ import annotations

import pytest
import torch

from adapters_store.errors import ArtifactInvalid
from adapters_store.manifest import manifest_to_json
from model_artifacts import backbone_artifact, domain_artifact, validate_domain
from residual_adapters import AdapterConfig, MultiDomainNet
from tests.numerics import difference_bound, relative_error
from tests.training.conftest import SIZE, provenance, tiny_net
from training import export
from training.data import BatchMaker, DomainData
from training.trainer import TrainConfig, TrainingError, finetune_copy, predict_logits, train_domain

# These tests check what training changes, not how well it converges: a head on the random tiny backbone
# does diverge at this rate (loss 2.4 -> 10), so the divergence watch is off here (tested on its own).
FAST = TrainConfig(epochs=2, batch_size=32, lr=0.05, progress=False, divergence_factor=0.0)

KINDS = {
    "parallel": AdapterConfig(kind="parallel"),
    "series": AdapterConfig(kind="series"),
    "lowrank": AdapterConfig(kind="lowrank", rank=2),
    "bn": AdapterConfig(kind="bn"),
    "head": AdapterConfig(kind="head"),
}


def _shared_copy(net: MultiDomainNet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.shared_state_dict().items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_training_changes_the_domain_and_never_the_shared_weights(
    net: MultiDomainNet, digits: DomainData, kind: str
) -> None:
    before = _shared_copy(net)
    fingerprint = net.fingerprint()
    net.add_domain("digits", KINDS[kind], digits.num_classes)
    start = {k: v.clone() for k, v in net.domain_state("digits").items()}
    result = train_domain(net, "digits", digits, FAST)
    after = net.shared_state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"shared tensor {k} changed"
    assert net.fingerprint() == fingerprint
    changed = [k for k, v in net.domain_state("digits").items() if not torch.equal(v, start[k])]
    assert "head.weight" in changed
    if kind in ("parallel", "series", "lowrank"):
        assert any(".adapter." in k for k in changed)
    assert len(result.history) == 2 and 0.0 <= result.best_val_accuracy <= 1.0
    assert result.trainable_parameters == sum(p.numel() for p in net.domain_parameters("digits").values())


def test_train_export_validate_load_predict(net: MultiDomainNet, digits: DomainData, tmp_path) -> None:
    net.add_domain("digits", AdapterConfig(kind="parallel"), digits.num_classes)
    result = train_domain(net, "digits", digits, TrainConfig(epochs=3, batch_size=32, lr=0.1, progress=False))
    artifact = domain_artifact(
        net,
        "digits",
        labels=digits.labels,
        preprocessing=digits.preprocessing,
        provenance=provenance(result.best_val_accuracy),
    )
    manifest, _tensor_bytes = artifact
    assert manifest.preprocessing.input_size == SIZE and manifest.preprocessing.channels == "grayscale"
    assert manifest.backbone == "resnet26" and manifest.backbone_fingerprint == net.fingerprint()
    backbone_dir = export.write_backbone_dir(backbone_artifact(net), tmp_path / "backbone")
    domain_dir = export.write_domain_dir(artifact, tmp_path / "digits")
    bundle = export.write_bundle(artifact, tmp_path / "digits.tar")

    # A fresh process's view: rebuild the backbone from its artifact, validate and load the domain.
    served = export.read_backbone_network(backbone_dir)
    assert served.fingerprint() == net.fingerprint()
    loaded = export.load_domain_into(served, domain_dir)
    assert loaded.labels == digits.labels
    export.load_domain_into(served, bundle, name="from_bundle")
    batches = BatchMaker(digits.preprocessing, flip=False)
    assert digits.test is not None
    expected = predict_logits(net, "digits", digits.test, batches)
    for name in ("digits", "from_bundle"):
        got = predict_logits(served, name, digits.test, batches)
        assert relative_error(got, expected) < difference_bound(net)
    # The server's path: the bank (folded BN) gives the same predictions.
    served.enable_bank(2)
    served.bank_load(0, AdapterConfig.from_dict(loaded.adapter.model_dump()), served.domain_state("digits"))
    x = batches.centre(digits.test.images)
    with torch.no_grad():
        assert relative_error(served.forward_slot(x, 0), expected) < difference_bound(net)
    accuracy = float((expected.argmax(1) == digits.test.targets).float().mean())
    assert accuracy > 0.1  # better than chance after three epochs on real digits


def test_export_refuses_what_the_server_would_refuse(net: MultiDomainNet, digits: DomainData) -> None:
    net.add_domain("digits", AdapterConfig(kind="parallel"), digits.num_classes)
    with pytest.raises(ValueError, match="10 classes but 3 labels"):
        domain_artifact(
            net, "digits", labels=["a", "b", "c"], preprocessing=digits.preprocessing, provenance=provenance()
        )
    manifest, tensor_bytes = domain_artifact(
        net, "digits", labels=digits.labels, preprocessing=digits.preprocessing, provenance=provenance()
    )
    other = tiny_net(seed=1)  # different shared weights: a different fingerprint
    with pytest.raises(ArtifactInvalid) as info:
        validate_domain(manifest_to_json(manifest), tensor_bytes, other)
    assert "fingerprint" in info.value.codes()


def test_float16_artifact_round_trips(net: MultiDomainNet, digits: DomainData, tmp_path) -> None:
    net.add_domain("digits", AdapterConfig(kind="parallel"), digits.num_classes)
    train_domain(net, "digits", digits, TrainConfig(epochs=1, batch_size=32, progress=False))
    artifact = domain_artifact(
        net,
        "digits",
        labels=digits.labels,
        preprocessing=digits.preprocessing,
        provenance=provenance(),
        dtype="float16",
    )
    assert artifact[0].dtype == "float16"
    copy = tiny_net()
    export.load_domain_into(copy, export.write_domain_dir(artifact, tmp_path / "d"))
    for k, v in net.domain_state("digits").items():
        assert torch.allclose(copy.domain_state("digits")[k], v.half().float())


def test_finetune_trains_a_copy_and_leaves_the_backbone_alone(
    net: MultiDomainNet, digits: DomainData
) -> None:
    before = _shared_copy(net)
    tuned = finetune_copy(net, "digits", digits.num_classes)
    result = train_domain(tuned, "digits", digits, FAST, trainable="all")
    assert result.trainable_parameters == sum(p.numel() for p in tuned.parameters())
    assert result.trainable_parameters > net.shared_parameter_count
    assert any(not torch.equal(before[k], v) for k, v in tuned.shared_state_dict().items())
    for k, v in net.shared_state_dict().items():
        assert torch.equal(before[k], v)
    assert "digits" not in net.domains


def test_training_refuses_a_domain_that_does_not_fit(net: MultiDomainNet, digits: DomainData) -> None:
    with pytest.raises(TrainingError, match="unknown domain"):
        train_domain(net, "nope", digits, FAST)
    net.add_domain("three", AdapterConfig(kind="bn"), 3)
    with pytest.raises(TrainingError, match="3 classes, the data has 10"):
        train_domain(net, "three", digits, FAST)
    net.add_domain("hot", AdapterConfig(kind="bn"), 10)
    with pytest.raises(TrainingError, match="lower the learning rate"):
        train_domain(net, "hot", digits, TrainConfig(epochs=1, lr=float("inf"), progress=False))


def test_adapters_get_their_own_weight_decay_and_learning_rate(net: MultiDomainNet) -> None:
    from training.trainer import _param_groups

    net.add_domain("d", AdapterConfig(kind="parallel"), 4)
    params = net.domain_parameters("d")
    cfg = TrainConfig(lr=0.1, weight_decay=1e-4, adapter_weight_decay=1e-2, adapter_lr=0.5)
    rest, adapters = _param_groups(params, cfg)
    assert {id(p) for p in adapters["params"]} == {id(p) for k, p in params.items() if ".adapter." in k}
    assert len(rest["params"]) + len(adapters["params"]) == len(params)
    assert (adapters["weight_decay"], adapters["lr"]) == (1e-2, 0.5)
    assert rest["weight_decay"] == 1e-4 and "lr" not in rest  # the optimiser's default: cfg.lr


def test_the_head_gets_its_own_learning_rate_only_when_set(net: MultiDomainNet) -> None:
    from training.trainer import _param_groups

    net.add_domain("d", AdapterConfig(kind="bn"), 4)
    params = net.domain_parameters("d")
    head = {id(p) for k, p in params.items() if k.startswith("head.")}
    assert len(head) == 2  # weight and bias
    (alone,) = _param_groups(params, TrainConfig(lr=0.03))
    assert head <= {id(p) for p in alone["params"]}  # no head_lr: one group at cfg.lr
    rest, own = _param_groups(params, TrainConfig(lr=0.03, head_lr=0.1))
    assert {id(p) for p in own["params"]} == head and own["lr"] == 0.1
    assert len(rest["params"]) == len(params) - 2 and "lr" not in rest
