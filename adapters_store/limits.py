"""Size limits applied to untrusted artifacts before anything expensive is done with them."""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class Limits:
    """Upper bounds for one artifact. The defaults fit ResNet-26 domains with room to spare
    (a width-1 domain is about 3 MB, its backbone about 25 MB)."""

    max_manifest_bytes: int = 1 * MiB
    """manifest.json, read whole into memory and parsed twice."""
    max_tensor_bytes: int = 512 * MiB
    """adapter.safetensors of one domain."""
    max_backbone_bytes: int = 4 * GiB
    """backbone.safetensors (shared weights)."""
    max_header_bytes: int = 4 * MiB
    """The JSON header inside a safetensors file (the 8-byte length prefix is checked against it)."""
    max_tensors: int = 10_000
    """Entries in one safetensors header."""
    max_tensor_name_length: int = 512
    """Characters in one tensor name."""
    max_dims: int = 8
    """Dimensions of one tensor."""
    max_labels: int = 100_000
    """Class labels (head rows) in one domain manifest. The server passes its smaller `max_classes`
    setting: every bank slot is as wide as the widest resident head."""
    max_label_length: int = 256
    """Characters in one class label."""
    max_abs_value: float = 1e4
    """Largest magnitude of any value in a domain's tensors. Finite is not enough: head weights of 3e38
    are finite and make every logit inf, so classify answered 200 with null probabilities. Trained
    weights are tiny by comparison (torchvision's ImageNet MobileNetV2 peaks at 6.1, a BN running_var),
    so 1e4 refuses nothing a trainer makes. It does not by itself bound a
    forward: BN folds to weight / sqrt(running_var + eps), up to 1e4 / sqrt(1e-5) ~ 3e6 per layer, and
    stacked layers can still reach float32's 3.4e38; the engine's trial forward at upload covers that."""
    max_input_size: int = 4096
    """Side of a domain's centre crop (`preprocessing.input_size`); `preprocessing.resize` may be at most
    twice it. The server passes its `max_input_size` setting, what its backbone was built for."""

    @property
    def max_bundle_bytes(self) -> int:
        """A bundle holds one manifest and one tensor file plus tar headers and padding."""
        return self.max_manifest_bytes + self.max_tensor_bytes + 64 * KiB
