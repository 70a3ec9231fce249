"""What one front end holds: settings, its engine client, its decode pool, HTTP metrics and admission.

Admission limits and where they hold (K = `MD_WORKERS` front ends, E = engines):
- `max_requests_in_flight` is split: each front end admits ceil(limit / K) classify requests at once,
  counted from when a request's whole body has arrived (beyond it 429), so the server admits at most
  K * ceil(limit / K). Requests still arriving are bounded by the connection limits and the body
  buffer (`server.connection_limits`), not by this.
- `max_queue` is enforced exactly by each engine when images are submitted (its queue is global to all
  front ends). Before decoding, a front end also refuses when the engine's queue (as of the engine's
  latest answer to this front end: every resolve and classify answer carries it) plus the images this
  front end is decoding plus the request's would pass it, so overload is refused before decoding;
  other front ends' images being decoded are not seen there, so up to K times the limit can be decoded
  at once and the excess gets 429 at submit.
- `max_pixels_decoding` is split like `max_requests_in_flight`: each front end admits requests while the
  pixels it has admitted and not yet decoded, the request's included, stay within its share S =
  ceil(limit / K) (429 with Retry-After beyond it). Decoding is what costs here, and it grows with pixels,
  not images: counting images, two requests of 64 images near the pixel limit were admitted together
  and a one-image probe behind them waited 18.6 s. A request of more than S / 64 pixels is admitted only
  while a quarter of S stays free, so requests of small images are still admitted while large ones fill
  the rest; a front end with nothing to decode admits any request within `max_request_pixels` (which
  may be larger than S). So the server decodes at most K * max(S, max_request_pixels) pixels at once;
  with the defaults (320 Mpx, K = 2) 160 Mpx per front end, 320 Mpx in all. Images over S / 64 pixels
  are large: they decode in a lane of their own, max(1, `decode_threads` - 1) threads at a lower OS
  priority (`large_decode_nice`; `server.decoding`), or, with that setting 0, take at most
  `decode_threads` - 1 of the decode threads: one is kept for small images. Either way at most
  max(1, `decode_threads` - 1) large images are decoded at once per front end, and only images being
  decoded hold decoded buffers: a request waiting for a thread holds its encoded body and opened headers
  (no pixel decoded), so a front end's decode memory is bounded by that count times one large decode's
  peak, plus `decode_threads` small decodes (of at most S / 64 pixels each), whatever the share admits.
- A front end's pixel slab bounds its images in flight: a request that does not fit gets 429.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from server.decoding import DecodeScheduler, lower_thread_priority
from server.engine_client import EngineClient
from server.http_metrics import HttpMetrics
from server.settings import Settings

_SMALL_REQUEST = 64
"""A request of at most 1/64 of the pixel share is small (2.5 Mpx with the defaults and K = 2)."""


@dataclass
class FrontEnd:
    settings: Settings
    engines: EngineClient
    pool: ThreadPoolExecutor
    metrics: HttpMetrics
    requests_in_flight: int = 0
    """Classify requests admitted and not yet answered (touched only on the event loop)."""
    images_preparing: int = 0
    """Images admitted and being decoded, not yet submitted (touched only on the event loop)."""
    pixels_decoding: int = 0
    """Pixels of the requests admitted and not yet decoded (touched only on the event loop)."""
    header_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="image-headers")
    )
    """Reads image headers (format, size, JPEG scans) off the event loop, apart from the decode pool so
    admission never waits behind decoding."""
    large_pool: ThreadPoolExecutor | None = field(init=False, default=None)
    """The decode lane for large images, its threads at `large_decode_nice` (None when that is 0)."""
    decoder: DecodeScheduler = field(init=False)

    def __post_init__(self) -> None:
        threads, nice = self.settings.decode_threads, self.settings.large_decode_nice
        large_threads = max(1, threads - 1)
        if nice:
            self.large_pool = ThreadPoolExecutor(
                large_threads, "decode-large", initializer=lower_thread_priority, initargs=(nice,)
            )
        self.decoder = DecodeScheduler(
            self.pool,
            threads,
            self.small_request_pixels,
            large_pool=self.large_pool,
            large_threads=large_threads,
        )

    @property
    def max_requests_in_flight(self) -> int:
        return math.ceil(self.settings.max_requests_in_flight / self.settings.frontends())

    @property
    def max_pixels_decoding(self) -> int:
        """This front end's share of `max_pixels_decoding`."""
        return math.ceil(self.settings.max_pixels_decoding / self.settings.frontends())

    @property
    def small_request_pixels(self) -> int:
        """Requests (and images) of at most this many pixels are small: 1/64 of the share. Small requests
        may use the share's reserved quarter; one decode thread is kept for small images."""
        return self.max_pixels_decoding // _SMALL_REQUEST

    def pixels_fit(self, pixels: int) -> bool:
        """Whether a request of `pixels` can be admitted for decoding now (the rules above)."""
        if self.pixels_decoding == 0:
            return True
        share = self.max_pixels_decoding
        limit = share if pixels <= self.small_request_pixels else share - share // 4
        return self.pixels_decoding + pixels <= limit

    def close(self) -> None:
        self.header_pool.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.large_pool is not None:
            self.large_pool.shutdown(wait=True, cancel_futures=True)
