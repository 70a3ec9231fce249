"""domain_format.preprocess: single-channel images are resized before they are widened to RGB, and 16-bit
grayscale PNGs decode straight to 8 bits; both give exactly the pixels of the earlier path (decode to
I;16, `to_8bit`, convert to RGB, resize), bit for bit, on real photos of odd sizes."""

from __future__ import annotations

import io
import struct
import zlib
from typing import get_args

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from domain_format.preprocess import (
    ImageSpec,
    Interpolation,
    decode_header,
    fit,
    prepare,
    read_header,
    resized_size,
    to_8bit,
)

MAX_PIXELS = 10**8
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)


def fit_widening_first(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The earlier `fit`: to 8 bits, then to the spec's mode (RGB: three channels), then resized."""
    converted = to_8bit(image).convert({"rgb": "RGB", "grayscale": "L"}[spec.channels])
    size = resized_size(converted.width, converted.height, spec.resize)
    if converted.size != size:
        converted = converted.resize(size, Image.Resampling[spec.interpolation.upper()])
    pixels = np.asarray(converted)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    top, left = (pixels.shape[0] - spec.resize) // 2, (pixels.shape[1] - spec.resize) // 2
    return np.array(pixels[top : top + spec.resize, left : left + spec.resize])


def camera(size: tuple[int, int]) -> np.ndarray:
    """skimage's camera photo (8-bit grayscale, 512 x 512), cropped to `size` (width, height)."""
    return np.ascontiguousarray(skdata.camera()[: size[1], : size[0]])


def camera16(size: tuple[int, int]) -> np.ndarray:
    """The camera photo on 16 bits, its low byte filled (a real 16-bit sensor's low bits are noise)."""
    low = np.random.default_rng(0).integers(0, 256, (size[1], size[0]), dtype=np.uint16)
    return camera(size).astype(np.uint16) * 256 + low


def png(pixels: np.ndarray, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", **options)
    return out.getvalue()


def adam7_png16(pixels: np.ndarray) -> bytes:
    """An interlaced (Adam7) 16-bit grayscale PNG, written here because Pillow writes no interlaced PNG."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width = pixels.shape
    raw = bytearray()
    for y0, x0, dy, dx in (
        (0, 0, 8, 8),
        (0, 4, 8, 8),
        (4, 0, 8, 4),
        (0, 2, 4, 4),
        (2, 0, 4, 2),
        (0, 1, 2, 2),
        (1, 0, 2, 1),
    ):
        for row in pixels[y0::dy, x0::dx].astype(">u2"):
            if row.size:
                raw += b"\0" + row.tobytes()  # filter type 0 (none) before each row of each pass
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )


def decoded_widening_first(data: bytes, spec: ImageSpec) -> np.ndarray:
    """The earlier path from bytes: PIL's own decode (16-bit PNGs to I;16), then `fit_widening_first`."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return fit_widening_first(image, spec)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("channels", ["rgb", "grayscale"])
@pytest.mark.parametrize("bits", [8, 16])
def test_grayscale_photos_give_the_pixels_of_widening_first(
    bits: int, channels: str, interpolation: str
) -> None:
    spec = ImageSpec(input_size=57, resize=61, channels=channels, interpolation=interpolation)  # type: ignore[arg-type]
    for size in ((301, 207), (163, 389)):  # odd sizes, landscape and portrait
        data = png(camera16(size) if bits == 16 else camera(size))
        expected = decoded_widening_first(data, spec)
        got = prepare(data, spec, max_pixels=MAX_PIXELS)
        assert got.shape == (57, 57, 3 if channels == "rgb" else 1)
        top = (61 - 57) // 2
        assert np.array_equal(got, expected[top : top + 57, top : top + 57])


def test_a_16_bit_png_decodes_straight_to_its_top_byte() -> None:
    pixels = camera16((301, 207))
    interlaced, with_trns = adam7_png16(pixels), png(pixels, transparency=1000)
    assert Image.open(io.BytesIO(interlaced)).info["interlace"] == 1
    assert Image.open(io.BytesIO(with_trns)).info["transparency"] == 1000
    for data in (png(pixels), interlaced, with_trns):
        header = read_header(data, ImageSpec(input_size=8, resize=8), max_pixels=MAX_PIXELS)
        assert header.image.mode == "I;16" and header.decode_bytes == 2 * pixels.size  # the bound as before
        decoded = Image.open(io.BytesIO(data))
        decoded.load()
        assert decoded.mode == "I;16"  # PIL's own decode, without the narrowing
        spec = ImageSpec(input_size=207, resize=207)
        assert np.array_equal(decode_header(header, spec), fit_widening_first(decoded, spec))
        assert header.image.mode == "L"
        assert np.array_equal(np.asarray(header.image), (pixels >> 8).astype(np.uint8))
        assert "transparency" not in header.image.info  # as to_8bit's new image has none


@pytest.mark.parametrize("mode", ["1", "L", "LA", "I", "F", "I;16"])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_every_single_channel_mode_fits_as_widening_first(mode: str, interpolation: str) -> None:
    photo = camera((151, 97))
    if mode in ("I", "I;16", "F"):
        image = Image.fromarray(
            camera16((151, 97)).astype({"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode])
        )
        if mode == "F":  # floats beyond 255 are clipped by both paths; keep most of them within range
            image = Image.fromarray(photo.astype(np.float32) * 1.2)
    elif mode == "LA":
        image = Image.fromarray(np.stack([photo, 255 - photo], -1), mode="LA")
    else:
        image = Image.fromarray(photo).convert(mode)
    assert image.mode == mode
    for channels in ("rgb", "grayscale"):
        spec = ImageSpec(input_size=31, resize=33, channels=channels, interpolation=interpolation)  # type: ignore[arg-type]
        assert np.array_equal(fit(image, spec), fit_widening_first(image, spec)), (mode, channels)


def test_colour_images_still_convert_before_resizing() -> None:
    photo = Image.fromarray(skdata.chelsea()).crop((0, 0, 301, 207))
    for image in (photo, photo.convert("P"), photo.convert("RGBA"), photo.convert("CMYK")):
        spec = ImageSpec(input_size=41, resize=45)
        assert np.array_equal(fit(image, spec), fit_widening_first(image, spec)), image.mode
