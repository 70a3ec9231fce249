"""JPEGs decoded by the engine on its device (`MD_ENGINE_JPEG_DECODE`): the torch twin of
`domain_format.preprocess.decode_header` for the JPEGs whose pixels it makes the same.

With the setting on, a front end reads and checks every image's header as always (format, pixels, scans,
decode cost, the request's pixel budget) and, when every image of a request is one it can hand on
(`engine_decodable`), sends the bytes instead of decoding them; the engine decodes the request's images
with those of every other request queued meanwhile, in one `torchvision.io.decode_jpeg` call on its
device (`JpegDecoder`: batched nvJPEG on CUDA), resizes and crops them there and queues the uint8 crops as
it queues a front end's. Every other request is decoded by its front end as before.

The same pixels within one level, on the CPU: torchvision's libjpeg-turbo decodes exactly what PIL's does
(colour, grayscale, progressive), the colour-to-gray conversion is PIL's integer one, and torch's
antialiased bilinear filter is PIL's, computed in float where PIL rounds to uint8 between its horizontal
and vertical passes: that rounding (at most half a level) through the second pass's non-negative weights
moves a pixel by at most half a level, so the two round to values at most one apart
(tests/server/test_device_jpeg.py). Bilinear only: the bicubic filter overshoots, PIL clips the overshoot
between the passes and torch's float path does not. nvJPEG's IDCT is not libjpeg's; on CUDA its rounding
comes on top (not measured: no GPU has been lent to this project yet).

Front ends do not import torch: only the engine's side (`decode` and `JpegDecoder`) needs it.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
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


# torchvision 0.29 deprecates its image codecs for TorchCodec, which has no batched nvJPEG decode; set once
# here, not per call: every change to the filters resets every module's record of warnings already shown
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

_SOURCE = re.compile(r"^\w+, \S+:\d+, ")
"""The `function, file:line, ` torchvision puts before libjpeg's message."""


def decode(jpegs: Sequence[bytes], spec: ImageSpec, device: torch.device) -> torch.Tensor:
    """A request's JPEGs (each `engine_decodable`) -> uint8 crops [n, input_size, input_size, 3] on
    `device`, grayscale domains' replicated to three channels as a front end's lease holds them.
    CorruptImage names the first image whose data cannot be decoded."""
    return crops(decode_all(jpegs, device), spec, device)


def decode_all(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEGs -> uint8 [3, H, W] each on `device`, in one decode call (batched nvJPEG on CUDA);
    CorruptImage names the first one whose data cannot be decoded."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]  # bytearray: writable
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)  # type: ignore[no-any-return]
    except RuntimeError:  # one image at a time only to name the bad one
        images = []
        for index, one in enumerate(data):
            try:
                images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                reason = _SOURCE.sub("", str(exc))
                raise CorruptImage(f"image {index}: the JPEG data is corrupt: {reason}") from None
        return images


def crops(images: Sequence[torch.Tensor], spec: ImageSpec, device: torch.device) -> torch.Tensor:
    """Decoded images [3, H, W] -> the domain's uint8 crops [n, input_size, input_size, 3] on `device`."""
    import torch
    from torch.nn.functional import interpolate

    side = spec.input_size
    out = torch.empty((len(images), side, side, 3), dtype=torch.uint8, device=device)
    if spec.channels == "grayscale":  # PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point
        luma = torch.tensor([19595.0, 38470.0, 7471.0], device=device).view(3, 1, 1)  # exact: sums < 2**24
    for row, image in enumerate(images):
        pixels = image.float()
        if spec.channels == "grayscale":
            pixels = torch.floor(((pixels * luma).sum(0, keepdim=True) + 32768.0) / 65536.0)
        (width, height), top, left = crop_window(pixels.shape[2], pixels.shape[1], spec)
        if (width, height) != (pixels.shape[2], pixels.shape[1]):
            pixels = interpolate(pixels[None], size=(height, width), mode="bilinear", antialias=True)[0]
            pixels = pixels.round_().clamp_(0, 255)
        out[row] = pixels[:, top : top + side, left : left + side].permute(1, 2, 0)  # C = 1 broadcasts
    return out


@dataclass(eq=False)
class _Job:
    jpegs: list[bytes]
    spec: Callable[[], ImageSpec]
    """The domain version's spec, asked on the decoder's thread (a pinned version's may need a store read)."""
    done: Future[torch.Tensor]


class JpegDecoder:
    """Requests' JPEGs decoded together on one thread: each round takes every request queued meanwhile
    (up to `max_images`) into one `decode_all` call, so concurrent single-image requests share a batched
    nvJPEG call instead of one call each, with no wait window (a round starts as soon as the last ends).
    A corrupt image fails only its own request: the round falls back to one call per request."""

    def __init__(self, device: torch.device, max_images: int = 64) -> None:
        self.device = device
        self.max_images = max_images
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jpeg-decoder", daemon=True)
        self._thread.start()

    def submit(self, jpegs: list[bytes], spec: Callable[[], ImageSpec]) -> Future[torch.Tensor]:
        """The crops of a request's JPEGs (as `decode`), once its round has run."""
        job = _Job(jpegs, spec, Future())
        with self._cond:
            if self._stopping:
                raise RuntimeError("the JPEG decoder is stopped")
            self._queue.append(job)
            self._cond.notify()
        return job.done

    def stop(self) -> None:
        """Decode what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                jobs: list[_Job] = []
                images = 0
                while self._queue and (not jobs or images + len(self._queue[0].jpegs) <= self.max_images):
                    job = self._queue.popleft()
                    if job.done.set_running_or_notify_cancel():  # False: its request is gone
                        jobs.append(job)
                        images += len(job.jpegs)
            if jobs:
                self._round(jobs)

    def _round(self, jobs: list[_Job]) -> None:
        try:
            decoded = decode_all([j for job in jobs for j in job.jpegs], self.device)
        except CorruptImage:  # which request's: each on its own, so the others are still answered
            for job in jobs:
                self._answer(job, None)
            return
        except Exception as exc:
            for job in jobs:
                job.done.set_exception(exc)
            return
        start = 0
        for job in jobs:
            images = decoded[start : start + len(job.jpegs)]
            start += len(job.jpegs)
            self._answer(job, images)

    def _answer(self, job: _Job, images: list[torch.Tensor] | None) -> None:
        """A job's crops from its decoded images (None: decoded on their own first)."""
        try:
            spec = job.spec()
            made = (
                decode(job.jpegs, spec, self.device) if images is None else crops(images, spec, self.device)
            )
            job.done.set_result(made)
        except Exception as exc:
            job.done.set_exception(exc)
