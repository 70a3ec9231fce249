"""`multidomain train adapter --kind depthwise` on MobileNetV2: the trainer trains the depthwise deltas, the
artifact carries them (format 2), and it loads back into a bank that serves it."""

from __future__ import annotations

from pathlib import Path

import torch

from model_artifacts import backbone_artifact
from residual_adapters import AdapterConfig, create_backbone
from tests.numerics import difference_bound, relative_error
from tests.training.test_data import make_folder
from training import export
from training.cli import main
from training.trainer import TrainConfig, _param_groups


def test_train_adapter_depthwise_trains_and_exports_the_deltas(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_backbone("mobilenet_v2", classifier_domain=None)
    export.write_backbone_dir(backbone_artifact(net), tmp_path / "backbone")
    data = make_folder(tmp_path / "pets", {"cat": 8, "dog": 8, "owl": 8})
    code = main(
        ["adapter", "--backbone", str(tmp_path / "backbone"), "--data", str(data), "--kind", "depthwise",
         "--input-size", "16", "--epochs", "1", "--batch-size", "8", "--no-progress", "--threads", "1",
         "--out", str(tmp_path / "pets-dw")]
    )  # fmt: skip
    assert code == 0
    manifest, _ = export.read_domain(tmp_path / "pets-dw")
    assert manifest.format_version == 2 and manifest.adapter.kind == "depthwise"

    served = export.read_backbone_network(tmp_path / "backbone").eval()
    export.load_domain_into(served, tmp_path / "pets-dw")
    state = served.domain_state("pets")
    deltas = {k: v for k, v in state.items() if k.endswith(".depthwise.weight")}
    assert len(deltas) == len(served.depthwise_units()) == 17
    assert all(v.abs().max() > 0 for v in deltas.values())  # trained away from their zero start
    served.load_domains_into_bank()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = served.forward_domain(x, "pets")
        assert relative_error(served.forward_merged(x, 0), reference) < difference_bound(served)


def test_depthwise_deltas_are_adapter_parameters_for_the_optimiser() -> None:
    net = create_backbone("mobilenet_v2", classifier_domain=None)
    net.add_domain("d", AdapterConfig(kind="depthwise"), num_classes=2)
    params = net.domain_parameters("d")
    deltas = [p for k, p in params.items() if k.endswith(".depthwise.weight")]
    assert len(deltas) == 17
    groups = _param_groups(params, TrainConfig(weight_decay=5e-4, adapter_weight_decay=1e-4))
    adapter_group = next(g for g in groups if g["weight_decay"] == 1e-4)
    assert all(any(p is q for q in adapter_group["params"]) for p in deltas)
