"""What a decode may cost, checked from the bytes before decoding: JPEG scans (`domain_format.jpeg`) and
the decode's work (`ImageHeader.decode_bytes`), and the 16-bit path that made one image cost 1.6 s."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from domain_format.jpeg import jpeg_scans
from domain_format.preprocess import (
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_JPEG_SCANS,
    DEFAULT_MAX_PIXELS,
    ImageSpec,
    TooCostlyToDecode,
    TooManyScans,
    prepare,
    read_header,
    to_8bit,
)

RGB = ImageSpec(input_size=24, resize=28)


def photo(mode: str = "RGB", size: tuple[int, int] = (96, 64)) -> Image.Image:
    """Smooth content with some noise: what an encoder sees in a photo (scans carry real data)."""
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    noise = np.random.default_rng(0).integers(0, 40, (size[1], size[0], 3))
    pixels = np.stack([xx * 2, yy * 3, xx + yy], -1) % 200 + noise
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def jpeg(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


def repeat_last_scan(data: bytes, times: int) -> bytes:
    """The scan bomb: the image's last scan repeated before the end-of-image marker."""
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * times + data[end:]


@pytest.mark.parametrize(
    ("mode", "progressive", "scans", "component_scans"),
    [
        ("RGB", False, 1, 3),
        ("RGB", True, 10, 14),  # libjpeg's progression for YCbCr: DC, AC bands, refinements
        ("L", True, 6, 6),
        ("CMYK", True, 18, 24),  # the most any encoder measured wrote (see domain_format.jpeg)
    ],
)
def test_scans_of_what_libjpeg_writes(mode: str, progressive: bool, scans: int, component_scans: int) -> None:
    found = jpeg_scans(jpeg(photo(mode), progressive=progressive))
    assert found is not None
    assert (found.scans, found.component_scans) == (scans, component_scans)
    assert found.components == len(mode)
    assert found.scans <= DEFAULT_MAX_JPEG_SCANS  # every encoder's output passes the default


def test_scan_markers_inside_other_segments_are_not_counted() -> None:
    # An APP1 segment (where EXIF and its thumbnail JPEG live) holding start-of-scan bytes
    data = jpeg(photo(), exif=b"Exif\x00\x00" + b"\xff\xd8\xff\xda\x00\x08" * 200)
    assert jpeg_scans(data) == jpeg_scans(jpeg(photo()))


def test_fill_bytes_before_a_marker_are_skipped() -> None:
    progressive = jpeg(photo(), progressive=True)
    first_scan, end = progressive.index(b"\xff\xda"), progressive.rindex(b"\xff\xd9")
    filled = (
        progressive[:first_scan] + b"\xff" * 1000 + progressive[first_scan:end] + b"\xff" * 7 + b"\xff\xd9"
    )
    assert jpeg_scans(filled) == jpeg_scans(progressive)
    unfinished = progressive[:first_scan] + b"\xff" * 1000  # fill bytes and no marker after them
    assert jpeg_scans(unfinished) == jpeg_scans(progressive[:first_scan])


def test_counting_stops_where_asked_and_at_the_data_end() -> None:
    bomb = repeat_last_scan(jpeg(photo(), progressive=True), 1000)
    assert jpeg_scans(bomb) is not None and jpeg_scans(bomb).scans == 1010  # type: ignore[union-attr]
    assert jpeg_scans(bomb, stop_after=32).scans == 33  # type: ignore[union-attr]
    truncated = jpeg(photo(), progressive=True)
    cut = truncated[: truncated.index(b"\xff\xda", truncated.index(b"\xff\xda") + 2) + 20]
    assert jpeg_scans(cut).scans == 2  # type: ignore[union-attr]
    assert jpeg_scans(b"\x89PNG\r\n\x1a\n") is None


def test_the_scan_bomb_is_refused_before_decoding_naming_the_limit() -> None:
    progressive = jpeg(photo(), progressive=True)
    assert prepare(progressive, RGB, max_pixels=DEFAULT_MAX_PIXELS).shape == (24, 24, 3)
    bomb = repeat_last_scan(progressive, 1000)
    with pytest.raises(TooManyScans) as refused:
        prepare(bomb, RGB, max_pixels=DEFAULT_MAX_PIXELS)
    assert "more than 32 scans, the limit" in refused.value.message
    # counting stops one scan past the limit (the bomb's other 977 are never walked)
    assert jpeg_scans(bomb, stop_after=32).scans == 33  # type: ignore[union-attr]
    assert jpeg_scans(bomb).scans == 1010  # type: ignore[union-attr]
    assert refused.value.max_scans == DEFAULT_MAX_JPEG_SCANS
    # the limit is exact: 10 scans pass a limit of 10, not one of 9
    prepare(progressive, RGB, max_pixels=DEFAULT_MAX_PIXELS, max_jpeg_scans=10)
    with pytest.raises(TooManyScans, match="more than 9 scans, the limit"):
        prepare(progressive, RGB, max_pixels=DEFAULT_MAX_PIXELS, max_jpeg_scans=9)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "bytes_per_pixel", "passes"),
    [
        (png(photo("RGB")), 3, 1.0),
        (png(photo("RGBA")), 4, 1.0),
        (png(photo("L")), 1, 1.0),
        (png(Image.fromarray(np.full((64, 96), 40000, np.uint16))), 2, 1.0),  # 16-bit grayscale: I;16
        (jpeg(photo("RGB")), 3, 1.0),
        (jpeg(photo("RGB"), progressive=True), 3, 14 / 3),
        (jpeg(photo("CMYK"), progressive=True), 4, 6.0),
    ],
)
def test_decode_bytes_are_pixels_times_bytes_per_pixel_times_passes(
    data: bytes, bytes_per_pixel: int, passes: float
) -> None:
    header = read_header(data, RGB, max_pixels=DEFAULT_MAX_PIXELS)
    assert header.pixels == 96 * 64
    assert header.passes == pytest.approx(passes)
    assert header.decode_bytes == int(96 * 64 * bytes_per_pixel * passes)


def test_an_image_costlier_than_the_bound_is_refused_before_decoding() -> None:
    progressive, baseline = jpeg(photo(), progressive=True), jpeg(photo())
    bound = 96 * 64 * 3 * 4  # four passes: a baseline JPEG fits, the 4.7-pass progressive one does not
    assert prepare(baseline, RGB, max_pixels=DEFAULT_MAX_PIXELS, max_decode_bytes=bound).shape == (24, 24, 3)
    with pytest.raises(TooCostlyToDecode, match=r"4\.7 passes") as refused:
        prepare(progressive, RGB, max_pixels=DEFAULT_MAX_PIXELS, max_decode_bytes=bound)
    assert refused.value.max_decode_bytes == bound


def test_the_default_bound_admits_every_encoders_image_at_the_pixel_limit() -> None:
    # The costliest: 40 Mpx progressive CMYK, 4 bytes x 6 passes (measured above on a small image)
    cmyk = read_header(jpeg(photo("CMYK"), progressive=True), RGB, max_pixels=DEFAULT_MAX_PIXELS)
    assert DEFAULT_MAX_PIXELS * 4 * cmyk.passes <= DEFAULT_MAX_DECODE_BYTES
    # ... and a repeated-scan JPEG at the pixel limit passes it even within the scan limit
    bomb = read_header(repeat_last_scan(jpeg(photo()), 31), RGB, max_pixels=DEFAULT_MAX_PIXELS)
    assert DEFAULT_MAX_PIXELS * 3 * bomb.passes > DEFAULT_MAX_DECODE_BYTES


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_and_32_bit_images_map_onto_8_bits_by_their_top_byte(mode: str) -> None:
    values = np.array([[0, 255, 256, 40000, 65535, 70000, -5]], dtype=np.int64)
    if mode == "I;16":
        values = np.clip(values, 0, 65535)
    image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))
    assert image.mode == mode
    expected = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    assert np.array_equal(np.asarray(to_8bit(image)), expected)
