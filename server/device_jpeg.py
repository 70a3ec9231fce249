"""JPEGs decoded by the engine on its device (`MD_ENGINE_JPEG_DECODE`): the torch twin of
`domain_format.preprocess.decode_header` for the JPEGs whose pixels it makes the same.

With the setting on, a front end reads and checks every image's header as always (format, pixels, scans,
decode cost, the request's pixel budget) and, when every image of a request is one it can hand on
(`engine_decodable`), sends the bytes instead of decoding them; the engine decodes the request's images
in one `torchvision.io.decode_jpeg` call on its device (batched nvJPEG on CUDA), resizes and crops them
there and queues the uint8 crops as it queues a front end's. Every other request is decoded by its front
end as before.

The same pixels within one level, on the CPU: torchvision's libjpeg-turbo decodes exactly what PIL's does
(colour, grayscale, progressive), the colour-to-gray conversion is PIL's integer one, and torch's
antialiased bilinear filter is PIL's, computed in float where PIL rounds to uint8 between its horizontal
and vertical passes: that rounding (at most half a level) through the second pass's non-negative weights
moves a pixel by at most half a level, so the two round to values at most one apart
(tests/server/test_device_jpeg.py). Bilinear only: the bicubic filter overshoots, PIL clips the overshoot
between the passes and torch's float path does not. nvJPEG's IDCT is not libjpeg's; on CUDA its rounding
comes on top (not measured: no GPU has been lent to this project yet).

Front ends do not import torch: only `decode` needs it, and only the engine calls it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from domain_format.preprocess import CorruptImage, ImageHeader, ImageSpec, crop_window

if TYPE_CHECKING:
    import torch

INTERPOLATIONS = ("bilinear",)
"""The domains' filters torch has as PIL has them (see above); other domains' JPEGs decode in the front end."""
MODES = ("RGB", "L")
"""PIL's modes of the JPEGs handed on: YCbCr (PIL says RGB) and grayscale; CMYK ones decode in the front end."""


def engine_decodable(header: ImageHeader, spec: ImageSpec) -> bool:
    """Whether the engine makes the front end's pixels of this checked image (a front end's question)."""
    image = header.image
    return image.format == "JPEG" and image.mode in MODES and spec.interpolation in INTERPOLATIONS


_SOURCE = re.compile(r"^\w+, \S+:\d+, ")
"""The `function, file:line, ` torchvision puts before libjpeg's message."""


def decode(jpegs: Sequence[bytes], spec: ImageSpec, device: torch.device) -> torch.Tensor:
    """A request's JPEGs (each `engine_decodable`) -> uint8 crops [n, input_size, input_size, 3] on
    `device`, grayscale domains' replicated to three channels as a front end's lease holds them.
    CorruptImage names the first image whose data cannot be decoded."""
    import torch
    from torch.nn.functional import interpolate
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecates its image codecs for TorchCodec, which has no batched nvJPEG decode
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]  # bytearray: writable
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one call for the batch; one image at a time only to name the bad one
        images = []
        for index, one in enumerate(data):
            try:
                images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                reason = _SOURCE.sub("", str(exc))
                raise CorruptImage(f"image {index}: the JPEG data is corrupt: {reason}") from None
    side = spec.input_size
    crops = torch.empty((len(images), side, side, 3), dtype=torch.uint8, device=device)
    # PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point (exact in float32: sums stay below 2**24)
    luma = torch.tensor([19595.0, 38470.0, 7471.0], device=device).view(3, 1, 1)
    for row, image in enumerate(images):  # [3, H, W]
        pixels = image.float()
        if spec.channels == "grayscale":
            pixels = torch.floor(((pixels * luma).sum(0, keepdim=True) + 32768.0) / 65536.0)
        (width, height), top, left = crop_window(pixels.shape[2], pixels.shape[1], spec)
        if (width, height) != (pixels.shape[2], pixels.shape[1]):
            pixels = interpolate(pixels[None], size=(height, width), mode="bilinear", antialias=True)[0]
            pixels = pixels.round_().clamp_(0, 255)
        crops[row] = pixels[:, top : top + side, left : left + side].permute(1, 2, 0)  # C = 1 broadcasts
    return crops
