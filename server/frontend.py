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
- A front end's pixel slab bounds its images in flight: a request that does not fit gets 429.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.engine_client import EngineClient
from server.http_metrics import HttpMetrics
from server.settings import Settings


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

    @property
    def max_requests_in_flight(self) -> int:
        return math.ceil(self.settings.max_requests_in_flight / self.settings.frontends())

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
