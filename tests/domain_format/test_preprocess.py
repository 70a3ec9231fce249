"""domain_format.preprocess: decode → 8-bit → channels → resize → centre crop, uint8 out, without torch."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from domain_format.preprocess import (
    ACCEPTED_MEDIA_TYPES,
    CorruptImage,
    ImageRejected,
    ImageSpec,
    TooManyPixels,
    UnsupportedImage,
    centre_crop,
    centre_offset,
    fit,
    open_image,
    prepare,
    resized_size,
)

RGB = ImageSpec(input_size=24, resize=28, channels="rgb")
GRAY = ImageSpec(input_size=24, resize=28, channels="grayscale")


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def png_without_pixels(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grayscale) and whose pixel data is a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )


def test_imports_no_torch() -> None:
    """The torch-free front ends run this module: importing it (and using it) must not load torch."""
    code = (
        "import sys, io\n"
        "import domain_format.preprocess as p\n"
        "from PIL import Image\n"
        "out = io.BytesIO(); Image.new('RGB', (40, 30)).save(out, format='PNG')\n"
        "assert p.prepare(out.getvalue(), p.ImageSpec(24, 28), max_pixels=10**6).shape == (24, 24, 3)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("fmt", "options"), [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"lossless": True})]
)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_accepted_formats_give_uint8_hwc(fmt: str, options: dict, mode: str) -> None:
    data = encode(noise((40, 31), mode), fmt, **options)
    rgb, gray = prepare(data, RGB, max_pixels=10**6), prepare(data, GRAY, max_pixels=10**6)
    assert rgb.dtype == gray.dtype == np.uint8
    assert rgb.shape == (24, 24, 3) and gray.shape == (24, 24, 1)
    assert rgb.flags.writeable and rgb.flags.c_contiguous
    if mode == "L":  # a grayscale file asked for as RGB: three equal channels
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_geometry_shorter_side_then_two_centre_crops() -> None:
    """Without resampling (shorter side already `resize`, nearest) the output is a known window."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (7, 10, 3), dtype=np.uint8)  # H 7, W 10
    spec = ImageSpec(input_size=5, resize=7, channels="rgb", interpolation="nearest")
    square = fit(Image.fromarray(pixels), spec)
    assert np.array_equal(square, pixels[:, 1:8])  # (10 - 7) // 2 = 1
    assert np.array_equal(prepare(encode(Image.fromarray(pixels)), spec, max_pixels=100), pixels[1:6, 2:7])
    assert np.array_equal(centre_crop(square, 5), square[1:6, 1:6])


def test_resize_is_torchvisions_resize_and_centre_crop() -> None:
    """Where the crop offsets round alike, the pixels equal torchvision's Resize(int) + CenterCrop on PIL
    (the server's previous pipeline): same output size rule, same PIL filters."""
    from torchvision.transforms import v2

    for size, interpolation, mode in [
        ((61, 45), "bilinear", v2.InterpolationMode.BILINEAR),
        ((45, 61), "bicubic", v2.InterpolationMode.BICUBIC),
        ((200, 120), "lanczos", v2.InterpolationMode.LANCZOS),
    ]:
        image = noise(size, seed=size[0])
        spec = ImageSpec(input_size=28, resize=28, channels="rgb", interpolation=interpolation)
        ours = prepare(encode(image), spec, max_pixels=10**6)
        theirs = v2.CenterCrop(28)(v2.Resize(28, interpolation=mode, antialias=True)(image))
        assert np.array_equal(ours, np.asarray(theirs))


def test_resized_size_and_centre_offset() -> None:
    assert resized_size(40, 30, 28) == (37, 28)  # int(28 * 40 / 30) = 37
    assert resized_size(30, 41, 28) == (28, 38)
    assert resized_size(28, 28, 28) == (28, 28)
    assert centre_offset(29, 24) == 2 and centre_offset(24, 24) == 0
    with pytest.raises(ValueError, match="centre window of 25 out of 24"):
        centre_offset(24, 25)


def test_sixteen_bit_png_maps_by_full_range() -> None:
    """16-bit PNGs keep their contrast: the top byte, not PIL's clip at 255 (which turns them white)."""
    levels = np.array([[0, 255, 256], [8000, 32767, 56000], [65280, 65535, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(levels.repeat(7, 0).repeat(7, 1)))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    spec = ImageSpec(input_size=21, resize=21, channels="grayscale", interpolation="nearest")
    out = prepare(data, spec, max_pixels=10**6)[..., 0]
    assert out[::7, ::7].tolist() == [[0, 0, 1], [31, 127, 218], [255, 255, 3]]
    assert (prepare(data, RGB, max_pixels=10**6) < 255).any()  # as RGB too: not clipped white


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK"])
def test_palette_alpha_and_cmyk_become_rgb(mode: str) -> None:
    image = noise((30, 30), "RGB").convert(mode)
    data = encode(image, "JPEG" if mode == "CMYK" else "PNG")
    assert prepare(data, RGB, max_pixels=10**6).shape == (24, 24, 3)


def test_other_formats_are_refused_by_type() -> None:
    for fmt in ("GIF", "BMP", "TIFF"):
        with pytest.raises(UnsupportedImage, match="not a JPEG, PNG or WebP") as info:
            prepare(encode(noise((30, 30)), fmt), RGB, max_pixels=10**6)
        assert info.value.accepted == ACCEPTED_MEDIA_TYPES
    with pytest.raises(UnsupportedImage):
        prepare(b"definitely not an image", RGB, max_pixels=10**6)


def test_empty_and_truncated_data_are_corrupt() -> None:
    with pytest.raises(CorruptImage, match="empty"):
        prepare(b"", RGB, max_pixels=10**6)
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = encode(noise((64, 64)), fmt)
        with pytest.raises(CorruptImage, match=r"corrupt|cannot be read"):
            prepare(data[: len(data) // 2], RGB, max_pixels=10**6)


def test_pixel_count_is_checked_from_the_header_before_decoding() -> None:
    """A header claiming 5000x5000 pixels over 8 bytes of data: refused for its size, never decoded
    (decoding would have found the data short and called it corrupt)."""
    with pytest.raises(TooManyPixels, match="5000x5000 = 25000000 pixels") as info:
        open_image(png_without_pixels(5000, 5000), RGB, max_pixels=10**6)
    assert info.value.max_pixels == 10**6
    with pytest.raises(CorruptImage):  # the same file within the limit: now it is decoded, and corrupt
        open_image(png_without_pixels(5000, 5000), RGB, max_pixels=25_000_000)


def test_extreme_strip_is_refused_by_its_resized_size() -> None:
    strip = encode(Image.new("RGB", (5000, 1)))  # 5000 pixels; 140000x28 once resized
    with pytest.raises(TooManyPixels, match="resized to 28") as info:
        prepare(strip, RGB, max_pixels=100_000)
    assert info.value.max_pixels == 100_000
    assert prepare(strip, RGB, max_pixels=140_000 * 28).shape == (24, 24, 3)


def test_every_refusal_is_an_image_rejected_with_a_message() -> None:
    for exc_type in (UnsupportedImage, CorruptImage, TooManyPixels):
        assert issubclass(exc_type, ImageRejected)
    with pytest.raises(ImageRejected) as info:
        prepare(b"\x89PNG\r\n\x1a\n", RGB, max_pixels=10**6)
    assert info.value.message == str(info.value) and info.value.message


def test_spec_is_checked() -> None:
    with pytest.raises(ValueError, match="input_size"):
        ImageSpec(input_size=30, resize=28)
    with pytest.raises(ValueError, match="channels"):
        ImageSpec(input_size=24, resize=28, channels="cmyk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interpolation"):
        ImageSpec(input_size=24, resize=28, interpolation="area")  # type: ignore[arg-type]
