"""Image decoding and per-domain preprocessing (runs in the thread pool, never on the event loop).

Decoding accepts JPEG, PNG and WebP only and checks the pixel count from the header before any pixel is
decoded, so a decompression bomb costs nothing. Preprocessing follows the domain manifest's
`Preprocessing` with torchvision transforms (v2) on PIL images.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from adapters_store.manifest import Preprocessing
from server.errors import CorruptImage, TooManyPixels, UnsupportedMediaType

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
ACCEPTED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")

_INTERPOLATION = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "lanczos": v2.InterpolationMode.LANCZOS,
    "box": v2.InterpolationMode.BOX,
    "hamming": v2.InterpolationMode.HAMMING,
}

Transform = Callable[[Image.Image], torch.Tensor]


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode an uploaded image; raise a 4xx-mapped error naming what is wrong."""
    if not data:
        raise CorruptImage("the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            "not a JPEG, PNG or WebP image", accepted=list(ACCEPTED_MEDIA_TYPES)
        ) from None
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc), max_pixels=max_pixels) from None
    except (OSError, ValueError) as exc:  # ValueError: PIL's guard against PNG text-chunk bombs
        raise CorruptImage(f"the image header cannot be read: {exc}") from None
    pixels = image.width * image.height
    # Checked from the header, before decoding: PIL's own guard only errors at twice its limit.
    if pixels > max_pixels:
        raise TooManyPixels(
            f"the image has {image.width}x{image.height} = {pixels} pixels, over the limit of {max_pixels}",
            max_pixels=max_pixels,
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise CorruptImage(f"the image data is corrupt: {exc}") from None
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer images mapped onto 8 bits by their full 16-bit range.

    PIL's own convert("L"/"RGB") clips such images at 255, which turns a 16-bit PNG almost white.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray((values >> 8).astype(np.uint8), "L")
    return image


def check_resized_pixels(image: Image.Image, pre: Preprocessing, max_pixels: int) -> None:
    """The pixel limit after "resize the shorter side": a 30000x1 strip would become 840000x28 pixels."""
    short = max(1, min(image.width, image.height))
    scale = pre.resize / short
    resized = math.ceil(image.width * scale) * math.ceil(image.height * scale)
    if resized > max_pixels:
        raise TooManyPixels(
            f"the image ({image.width}x{image.height}) would have {resized} pixels once its shorter side is "
            f"resized to {pre.resize}, over the limit of {max_pixels}",
            max_pixels=max_pixels,
        )


def build_transform(pre: Preprocessing) -> Transform:
    """The manifest's preprocessing as one callable PIL image -> float tensor [3, S, S]."""
    steps: list[Callable[..., object]] = []
    steps.append(v2.Resize(pre.resize, interpolation=_INTERPOLATION[pre.interpolation], antialias=True))
    steps.append(v2.CenterCrop(pre.input_size))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    pipeline = v2.Compose(steps)
    mode = "L" if pre.channels == "grayscale" else "RGB"

    def transform(image: Image.Image) -> torch.Tensor:
        # Palette, alpha and CMYK images all become plain RGB (or L for grayscale domains) first.
        converted = to_8bit(image).convert(mode)
        out: torch.Tensor = pipeline(converted)
        return out.expand(3, -1, -1).contiguous() if mode == "L" else out

    return transform
