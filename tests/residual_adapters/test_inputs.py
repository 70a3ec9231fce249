"""residual_adapters.inputs.normalise: uint8 pixels → the network's float input, one rule for every caller."""

from __future__ import annotations

import pytest
import torch

from residual_adapters.inputs import normalise

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pixels(n: int, c: int, size: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, c), generator=g, dtype=torch.uint8)  # NHWC


def test_values_are_mean_std_in_pixel_units() -> None:
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 1, 3)
    out = normalise(x, MEAN, STD, layout="nhwc")
    assert out.shape == (1, 3, 1, 1) and out.dtype == torch.float32
    expected = [(v - 255 * m) / (255 * s) for v, m, s in zip((0, 255, 128), MEAN, STD, strict=True)]
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-6)


def test_layouts_and_batch_sizes_give_bit_identical_values() -> None:
    """Serving normalises one image, training's evaluation a batch, in either layout: same bits."""
    nhwc = pixels(7, 3)
    batch = normalise(nhwc, MEAN, STD, layout="nhwc")
    assert torch.equal(batch, normalise(nhwc.permute(0, 3, 1, 2).contiguous(), MEAN, STD, layout="nchw"))
    for i in range(7):
        assert torch.equal(normalise(nhwc[i : i + 1], MEAN, STD, layout="nhwc")[0], batch[i])


def test_a_triple_per_image_gives_each_image_its_own_bits() -> None:
    """A batch mixing domains is normalised in one pass, each row exactly as if alone with its domain's."""
    nhwc = pixels(4, 3)
    stats = [(MEAN, STD), ([0.5] * 3, [0.25] * 3), (MEAN, STD), ([0.1, 0.2, 0.3], [0.9, 0.8, 0.7])]
    batch = normalise(nhwc, [m for m, _ in stats], [s for _, s in stats], layout="nhwc")
    for i, (mean, std) in enumerate(stats):
        assert torch.equal(batch[i], normalise(nhwc[i : i + 1], mean, std, layout="nhwc")[0])
    assert not torch.equal(batch[0], normalise(nhwc[:1], [0.5] * 3, [0.25] * 3, layout="nhwc")[0])


def test_grayscale_is_replicated_to_three_channels() -> None:
    gray = pixels(2, 1)
    out = normalise(gray, [0.5] * 3, [0.25] * 3, layout="nhwc")
    assert out.shape == (2, 3, 5, 5)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    # per-channel statistics still apply to each replica
    out = normalise(gray, MEAN, STD, layout="nhwc")
    assert not torch.equal(out[:, 0], out[:, 1])


def test_bad_inputs_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="uint8"):
        normalise(pixels(1, 3).float(), MEAN, STD, layout="nhwc")
    with pytest.raises(ValueError, match="4 dimensions"):
        normalise(pixels(1, 3)[0], MEAN, STD, layout="nhwc")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        normalise(pixels(1, 4), MEAN, STD, layout="nhwc")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        normalise(pixels(1, 3), MEAN, STD, layout="nchw")  # [1, 5, 5, 3] read as 5 channels
    with pytest.raises(ValueError, match="mean needs 3 values"):
        normalise(pixels(1, 3), [0.5], STD, layout="nhwc")
    with pytest.raises(ValueError, match=r"std needs 3 values, or 3 for each of the 2 images; got \[3, 3\]"):
        normalise(pixels(2, 3), MEAN, [STD] * 3, layout="nhwc")  # a triple per image, for 3 images
    with pytest.raises(ValueError, match="mean needs 3 values, or 3 for each image"):
        normalise(pixels(2, 3), [MEAN, [0.5]], [STD, STD], layout="nhwc")  # ragged
