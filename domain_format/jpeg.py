"""A JPEG's scan structure, read from its markers without decoding: how many scans, over how many components.

A progressive JPEG is decoded scan by scan, and libjpeg walks every coefficient block of a scan's
components on each one, however few bytes the scan holds: a file whose last scan is repeated 1,000 times
costs about 1,000 decodes of the image while staying a few tens of kilobytes. What encoders write,
measured (Pillow 13 / libjpeg-turbo 3, `cjpeg`/`jpegtran -progressive` 2.1, mozjpeg's scan optimiser via
`mozjpeg-lossless-optimization` 1.3, on scikit-image's photos): baseline 1 scan; progressive colour
(YCbCr) 10 scans (mozjpeg 6-9), grayscale 6 (mozjpeg 4), CMYK 18 (mozjpeg 17). `preprocess` refuses more
than `DEFAULT_MAX_JPEG_SCANS`.

Written here because nothing well kept exposes it: Pillow parses markers only up to the first scan and
hands the rest to libjpeg; libjpeg-turbo's own scan limit (`TJPARAM_SCANLIMIT`, `djpeg -maxscans`) is not
reachable through Pillow. The walk is over the segment structure only: marker, length, skip; inside a
scan's entropy-coded data a 0xFF byte is always followed by 0x00 (stuffing) or a restart marker, so the
next marker is found with one regular-expression search (in C) per scan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range but are no frames
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
"""The first marker after entropy-coded data (fill bytes 0xFF may come before it)."""
_NOT_FILL = re.compile(rb"[^\xff]")


@dataclass(frozen=True)
class JpegScans:
    scans: int
    """Start-of-scan segments (counting stops one past the caller's limit)."""
    components: int
    """Components of the frame (1 grayscale, 3 YCbCr, 4 CMYK); 0 when no frame header was seen."""
    component_scans: int
    """Sum over the scans of the components each covers: `components` for a baseline image, 14 for a
    10-scan progressive colour one. Divided by `components`, the passes the decoder makes over the
    coefficients."""

    @property
    def passes(self) -> float:
        """Coefficient passes the decoder makes: 1 for a sequential JPEG (however its scans are split)."""
        return max(1.0, self.component_scans / self.components) if self.components else 1.0


def jpeg_scans(data: bytes, stop_after: int | None = None) -> JpegScans | None:
    """The scans of a JPEG (None when `data` does not start like one). Counting stops at the end of the
    image, at bytes that are not a marker where one must be (the decoder reports the corruption), or once
    `stop_after` scans are passed."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    scans = components = component_scans = 0
    while pos + 1 < end and (stop_after is None or scans <= stop_after):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes before a marker: their run skipped in one search (in C), as a
            # byte-per-iteration walk made 16 KiB of them cost 8.6 ms of the event loop's time
            run_end = _NOT_FILL.search(data, pos + 1)
            if run_end is None:
                break
            pos = run_end.start() - 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE or marker == _SOI:
            pos += 2
            continue
        if pos + 4 > end:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        payload = pos + 4
        if marker in _SOF and payload + 6 <= end and not components:
            components = data[payload + 5]
        pos += 2 + length
        if marker == _SOS:
            scans += 1
            if payload < end:
                component_scans += data[payload]
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return JpegScans(scans, components, component_scans)
