"""Image bytes → uint8 pixels: the one preprocessing of training and serving (PIL and numpy, no torch).

The trainer evaluates a domain and the server (or a torch-free front end) answers with it on exactly the
pixels made here, so the two can never disagree. Normalisation (uint8 → float, mean/std) is a separate,
torch step: ``residual_adapters.inputs.normalise``.

    spec = ImageSpec(input_size=224, resize=256, channels="rgb", interpolation="bilinear")
    pixels = prepare(data, spec, max_pixels=40_000_000)  # np.uint8 [224, 224, 3]; C = 1 for grayscale

``prepare`` is three steps, each public for callers that need to stop in between:

1. ``open_image(data, spec, max_pixels=...)``: ``read_header`` then ``load_pixels``. ``read_header`` checks,
   before any pixel is decoded: JPEG, PNG or WebP only; the pixel count, and the count the image would
   have once its shorter side is resized (a decompression bomb costs nothing); a JPEG's scans (at most
   ``max_jpeg_scans``: a repeated scan multiplies the decode's work, ``domain_format.jpeg``); and what the
   decode will cost, ``ImageHeader.decode_bytes`` (at most ``max_decode_bytes``). A decode cannot be
   interrupted once started, so this is the one place its cost can be bounded. Then the pixels are
   decoded.
2. ``fit(image, spec)``: 16-bit images mapped onto 8 bits by their full range; converted to the spec's
   channels (palette, alpha, CMYK → RGB, or L for grayscale); shorter side resized to ``spec.resize``
   (PIL's antialiased filters, the longer side truncated as torchvision's ``Resize(int)`` does); the centre
   ``resize``×``resize`` square → uint8 [resize, resize, C]. Training keeps these squares in memory: its
   augmentation takes random crops inside them.
3. ``centre_crop(pixels, spec.input_size)``: the evaluation and serving crop, offsets ``centre_offset``.

Failures raise ``ImageRejected`` subclasses, each saying what is wrong: ``UnsupportedImage`` (not one of
the accepted formats), ``TooManyPixels`` (over ``max_pixels``), ``TooManyScans`` (a JPEG with more scans
than any encoder writes), ``TooCostlyToDecode`` (over ``max_decode_bytes``), ``CorruptImage`` (empty,
truncated or unreadable data). The HTTP layer maps them to status codes; this module knows nothing of HTTP.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageMode, UnidentifiedImageError

from domain_format.jpeg import jpeg_scans

Channels = Literal["rgb", "grayscale"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
"""PIL format names; nothing else is ever handed to a decoder."""
ACCEPTED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")
DEFAULT_MAX_PIXELS = 40_000_000
"""The pixel limit for callers without a setting of their own (the server's default too)."""
DEFAULT_MAX_JPEG_SCANS = 32
"""Encoders write at most 18 scans (libjpeg's progressive CMYK; colour 10, grayscale 6, mozjpeg fewer:
measured in ``domain_format.jpeg``): 32 leaves room for hand-made scan scripts and refuses the repeated-scan
bomb (1,000 scans of a 38 KB file cost 2.2 s to decode, 58 times the same image's 10)."""
DEFAULT_MAX_DECODE_BYTES = 24 * DEFAULT_MAX_PIXELS
"""The costliest decode any encoder's image at the pixel limit asks for: 40 Mpx of progressive CMYK,
4 bytes per pixel times 6 passes (colour progressive is 3 x 4.7, grayscale 1 x 6, PNG and WebP 1 to 4 x 1).
What it refuses is work multiplied beyond that: a 40 Mpx JPEG with 32 one-component scans (10.7 passes)."""

_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_MODES: dict[str, str] = {"rgb": "RGB", "grayscale": "L"}
_SINGLE_CHANNEL_MODES = frozenset({"1", "L", "LA", "F"})
"""Modes (after ``to_8bit``) whose conversion to RGB replicates one channel (LA's alpha is dropped)."""


@dataclass(frozen=True)
class ImageSpec:
    """The geometry and channels of a domain's inputs (the manifest's ``Preprocessing`` less mean/std)."""

    input_size: int
    """Side of the square centre crop the network sees."""
    resize: int
    """Shorter side after resizing, before the centre crop; at least ``input_size``."""
    channels: Channels = "rgb"
    """``grayscale``: one channel out (the normalisation step replicates it to three)."""
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        if self.input_size < 1 or self.resize < self.input_size:
            raise ValueError(f"need 1 <= input_size ({self.input_size}) <= resize ({self.resize})")
        if self.channels not in _MODES:
            raise ValueError(f"channels must be one of {sorted(_MODES)}, not {self.channels!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, not {self.interpolation!r}")


class ImageRejected(Exception):
    """An image that cannot be used; the message says what is wrong with it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedImage(ImageRejected):
    """Not a JPEG, PNG or WebP image."""

    accepted = ACCEPTED_MEDIA_TYPES


class CorruptImage(ImageRejected):
    """Empty, truncated or otherwise undecodable image data."""


class TooManyPixels(ImageRejected):
    """More pixels than allowed, as stored or once resized (a decompression bomb, an extreme strip)."""

    def __init__(self, message: str, max_pixels: int) -> None:
        super().__init__(message)
        self.max_pixels = max_pixels


class TooManyScans(ImageRejected):
    """A JPEG with more scans than any encoder writes (each scan is one more pass over the image)."""

    def __init__(self, message: str, max_scans: int) -> None:
        super().__init__(message)
        self.max_scans = max_scans


class TooCostlyToDecode(ImageRejected):
    """An image whose decode would cost more than allowed (``ImageHeader.decode_bytes``)."""

    def __init__(self, message: str, max_decode_bytes: int) -> None:
        super().__init__(message)
        self.max_decode_bytes = max_decode_bytes


@dataclass(frozen=True)
class ImageHeader:
    """An image opened and checked, not yet decoded: what its decode will cost."""

    image: Image.Image
    """Opened by PIL, pixels not loaded (``load_pixels`` loads them)."""
    passes: float = 1.0
    """Passes the decoder makes over the image: a progressive JPEG's coefficient passes, else 1."""

    @property
    def pixels(self) -> int:
        return self.image.width * self.image.height

    @property
    def decode_bytes(self) -> int:
        """The decode's work: pixels x bytes per pixel of the decoded mode x passes. Decode time grows with
        the bytes the decoder writes (PNG inflates them, JPEG rewrites its coefficients on every scan);
        it is also the decoded image's memory."""
        return int(self.pixels * bytes_per_pixel(self.image.mode) * self.passes)


def prepare(
    data: bytes,
    spec: ImageSpec,
    *,
    max_pixels: int,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> np.ndarray:
    """Encoded image bytes → uint8 [input_size, input_size, C] (C = 3 for ``rgb``, 1 for ``grayscale``)."""
    header = read_header(
        data, spec, max_pixels=max_pixels, max_jpeg_scans=max_jpeg_scans, max_decode_bytes=max_decode_bytes
    )
    return decode_header(header, spec)


def decode_header(header: ImageHeader, spec: ImageSpec) -> np.ndarray:
    """A checked header → uint8 [input_size, input_size, C]: decode, fit, centre crop."""
    return centre_crop(fit(load_pixels(header), spec), spec.input_size)


def open_image(
    data: bytes,
    spec: ImageSpec,
    *,
    max_pixels: int,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> Image.Image:
    """Decode an image, refusing what is not JPEG/PNG/WebP, too large or too costly (from the header),
    or corrupt."""
    header = read_header(
        data, spec, max_pixels=max_pixels, max_jpeg_scans=max_jpeg_scans, max_decode_bytes=max_decode_bytes
    )
    return load_pixels(header)


def read_header(
    data: bytes,
    spec: ImageSpec,
    *,
    max_pixels: int,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> ImageHeader:
    """Open an image and check everything that can be checked before decoding it (no pixel is decoded)."""
    if not data:
        raise CorruptImage("the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedImage("not a JPEG, PNG or WebP image") from None
    except Image.DecompressionBombError as exc:  # PIL's own, process-wide guard (at twice its limit)
        raise TooManyPixels(str(exc), max_pixels=max_pixels) from None
    except (OSError, ValueError) as exc:  # ValueError: PIL's guard against PNG text-chunk bombs
        raise CorruptImage(f"the image header cannot be read: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage(f"the image header says {width}x{height} pixels")
    check_pixels(width, height, spec, max_pixels=max_pixels)
    header = ImageHeader(image)
    if image.format in ("JPEG", "MPO"):  # MPO: a JPEG with more pictures after it (the first is decoded)
        # Counting stops one scan past the limit: a scan can be a dozen bytes, a 16 MiB body a million of
        # them, and a client sending such bodies in a loop (bench/abuse.py's scan bomb) made counting them
        # all the front end's largest cost (a sixth of a core for the count in the message alone).
        scans = jpeg_scans(data, stop_after=max_jpeg_scans)
        if scans is not None:
            if scans.scans > max_jpeg_scans:
                raise TooManyScans(
                    f"the JPEG has more than {max_jpeg_scans} scans, the limit (encoders write at most "
                    f"18): each scan is one more pass of the decoder over the whole image",
                    max_scans=max_jpeg_scans,
                )
            header = ImageHeader(image, scans.passes)
    if header.decode_bytes > max_decode_bytes:
        raise TooCostlyToDecode(
            f"decoding the image ({width}x{height} {image.mode}, {header.passes:.1f} passes) would cost "
            f"{header.decode_bytes} bytes of work, over the limit of {max_decode_bytes}",
            max_decode_bytes=max_decode_bytes,
        )
    return header


def load_pixels(header: ImageHeader) -> Image.Image:
    """Decode a checked image's pixels (CorruptImage for truncated or corrupt data). A 16-bit grayscale
    PNG is decoded straight to 8 bits (``narrow_16bit_png``): what ``to_8bit`` would make of it."""
    narrow_16bit_png(header.image)
    try:
        header.image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise CorruptImage(f"the image data is corrupt: {exc}") from None
    return header.image


def narrow_16bit_png(image: Image.Image) -> None:
    """Have a 16-bit grayscale PNG not yet decoded decode straight into 8-bit L, each pixel the top byte
    of its sample (Pillow's ``L;16B`` unpacker): the same pixels as decoding it to I;16 and then
    ``to_8bit``, without the 16-bit image and its copies (at 40 Mpx: 80 MB decoded, then as bytes, then
    shifted, +264 MB peak against +40 MB). Pillow itself decodes 16-bit RGB PNGs this way (``RGB;16B``).
    It changes the decoder's raw mode, as Pillow's own ``draft`` does for JPEGs; anything else is left
    alone. Its tRNS colour, a 16-bit value, is dropped, as ``to_8bit``'s new image drops it (no alpha is
    used)."""
    if not isinstance(image, ImageFile.ImageFile) or image.format != "PNG" or image.mode != "I;16":
        return
    if len(image.tile) != 1:
        return  # already decoded, or a layout this was not made for
    codec, extents, offset, rawmode = image.tile[0]  # a 4-tuple in every Pillow (a NamedTuple lately)
    if codec != "zip" or rawmode != "I;16B":
        return
    image._mode = "L"  # where Pillow keeps the mode (10.1 and later; `mode` is a property of it)
    image.tile = [ImageFile._Tile(codec, extents, offset, "L;16B")]  # Pillow 10.3 and later
    image.info.pop("transparency", None)


def bytes_per_pixel(mode: str) -> int:
    """Bytes a pixel of a PIL mode takes once decoded (1 for L, P and 1-bit; 2 for I;16; 3 for RGB...)."""
    descriptor = ImageMode.getmode(mode)
    return len(descriptor.bands) * int(descriptor.typestr[2:])


def check_pixels(width: int, height: int, spec: ImageSpec, *, max_pixels: int) -> None:
    """TooManyPixels when an image of this size has more than `max_pixels`, as it is or once resized."""
    if width * height > max_pixels:
        raise TooManyPixels(
            f"the image has {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            max_pixels=max_pixels,
        )
    resized_w, resized_h = resized_size(width, height, spec.resize)
    # A 30000x1 strip is small, but "shorter side to 28" would make it 840000x28.
    if resized_w * resized_h > max_pixels:
        raise TooManyPixels(
            f"the image ({width}x{height}) would have {resized_w * resized_h} pixels once its shorter side "
            f"is resized to {spec.resize}, over the limit of {max_pixels}",
            max_pixels=max_pixels,
        )


def fit(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """A decoded image → its centre ``resize``×``resize`` square, uint8 [resize, resize, C]."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the same pixels; straight to RGB/L PIL warns on every such image
    mode = _MODES[spec.channels]
    image = to_8bit(image)
    # A single-channel image is resized as L and only then made RGB (the channel replicated): PIL resizes
    # each channel alike, so the pixels are exactly those of widening first, and the full-size image is
    # 1 byte a pixel instead of 3 (at 40 Mpx: 40 MB instead of 120 MB, a third of the resize's work).
    first_mode = "L" if image.mode in _SINGLE_CHANNEL_MODES else mode
    converted = image if image.mode == first_mode else image.convert(first_mode)  # convert would copy
    side = spec.resize
    size = resized_size(converted.width, converted.height, side)
    if converted.size != size:  # PIL copies an image resized to its own size; skip the copy
        converted = converted.resize(size, _RESAMPLE[spec.interpolation])
    if converted.mode != mode:
        converted = converted.convert(mode)
    pixels = np.asarray(converted)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return centre_crop(pixels, side)


def centre_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size``×``size`` window of [H, W, C] pixels (a copy, contiguous)."""
    top, left = centre_offset(pixels.shape[0], size), centre_offset(pixels.shape[1], size)
    # np.array copies: a writable array of its own, never a view of PIL's read-only buffer
    return np.array(pixels[top : top + size, left : left + size], order="C")


def centre_offset(full: int, size: int) -> int:
    """Where a centred window of ``size`` starts in ``full``: the one rounding rule of every centre crop."""
    if not 0 < size <= full:
        raise ValueError(f"cannot take a centre window of {size} out of {full}")
    return (full - size) // 2


def crop_window(width: int, height: int, spec: ImageSpec) -> tuple[tuple[int, int], int, int]:
    """Where ``decode_header``'s crop of a width x height image lies: the (width, height) it is resized to,
    and the top and left of the ``input_size`` window in that (the centre square, then its centre), for
    decoders that crop in one step (``server.device_jpeg``)."""
    resized_w, resized_h = resized_size(width, height, spec.resize)
    inner = centre_offset(spec.resize, spec.input_size)
    top = centre_offset(resized_h, spec.resize) + inner
    left = centre_offset(resized_w, spec.resize) + inner
    return (resized_w, resized_h), top, left


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) once the shorter side is ``shorter``; the longer side truncated (torchvision's rule)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer images mapped onto 8 bits by their full 16-bit range (the top byte).

    PIL's own convert("L"/"RGB") clips such images at 255, which turns a 16-bit PNG almost white.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image)
        # 16-bit data shifts as it is: widening 40 Mpx to int64 first cost 1.6 s and 320 MB per image
        if values.dtype.kind != "u" or values.dtype.itemsize != 2:
            values = np.clip(values, 0, 65535)
        return Image.fromarray((values >> 8).astype(np.uint8))  # 2-D uint8: mode L
    return image
