"""uint8 pixels → network input: the one normalisation of training and serving.

``domain_format.preprocess`` makes the pixels (decode, 8-bit, channels, resize, centre crop; no torch);
this step turns them into the float tensor a network takes, with the domain's per-channel mean and std (in
[0, 1] units, as the manifest's ``Preprocessing`` holds them). A one-channel (grayscale) input is
replicated to the three channels every backbone expects.

The arithmetic is elementwise and the same for any batch size, so an image normalised alone (serving) and
inside a batch (training's evaluation) gives bit-identical values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Layout = Literal["nhwc", "nchw"]


Stats = Sequence[float] | Sequence[Sequence[float]]


def normalise(pixels: Tensor, mean: Stats, std: Stats, *, layout: Layout) -> Tensor:
    """uint8 pixels [N, H, W, C] (``nhwc``) or [N, C, H, W] (``nchw``), C = 1 or 3 → float32 [N, 3, H, W].

    ``(x - 255 mean) / (255 std)`` per channel, with one mean and std triple for every image, or one per
    image (N triples: a batch mixing domains, in one pass; each image's values are the same bits as when
    it is normalised alone). From ``nhwc`` the result is a channels-last tensor (the same values; call
    ``.contiguous()`` for the default memory format).
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 4:
        raise ValueError(f"expected uint8 pixels of 4 dimensions, got {pixels.dtype} {tuple(pixels.shape)}")
    x = pixels.permute(0, 3, 1, 2) if layout == "nhwc" else pixels
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]} ({layout} {tuple(pixels.shape)})")
    scaled_mean = _per_image(mean, "mean", x) * 255.0
    scaled_std = _per_image(std, "std", x) * 255.0
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - scaled_mean) / scaled_std


def _per_image(values: Stats, name: str, x: Tensor) -> Tensor:
    """3 values, or one triple per image, as a float32 [1 or N, 3, 1, 1] tensor on x's device."""
    try:
        t = torch.tensor(values, dtype=torch.float32, device=x.device)
    except (TypeError, ValueError) as exc:  # ragged or not numbers
        raise ValueError(f"{name} needs 3 values, or 3 for each image: {exc}") from None
    if t.shape not in ((3,), (x.shape[0], 3)):
        shape = list(t.shape)
        raise ValueError(f"{name} needs 3 values, or 3 for each of the {x.shape[0]} images; got {shape}")
    return t.view(-1, 3, 1, 1)
