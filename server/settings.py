"""Server settings: one `Settings` object, read from the environment (prefix `MD_`)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters_store.index import StoreQuotas
from adapters_store.limits import Limits, MiB
from domain_format.preprocess import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_JPEG_SCANS, DEFAULT_MAX_PIXELS
from server.engine_config import EngineConfig


class Settings(BaseSettings, EngineConfig):
    """Everything an operator can tune; `MD_BANK_SLOTS=32` sets `bank_slots`, and so on. The engine's
    fields are declared once, in `EngineConfig`, and inherited (the same flat `MD_*` names)."""

    model_config = SettingsConfigDict(env_prefix="MD_", extra="ignore")

    store_dir: Path = Path("./store")
    """The local store (backbone + domain artifacts), used unless `store_url` is set."""
    store_url: str | None = Field(default=None, pattern=r"^s3://[^/]{3,}(/.*)?$")
    """A shared S3 store, `s3://bucket/prefix`, for replicas on several hosts; endpoint and credentials
    come from the usual AWS settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...). Unset: `store_dir`."""
    max_domains: int | None = Field(default=None, ge=1)
    """Most domains the store may hold; an upload of a new domain beyond it gets 409 quota_exceeded."""
    max_versions_per_domain: int | None = Field(default=None, ge=1)
    """Most stored versions of one domain; beyond it an upload gets 409 (delete an old version first)."""
    max_store_bytes: int | None = Field(default=None, ge=1)
    """Most bytes the store may hold (every listed version's manifest and tensors, and the backbone)."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # -- processes --------------------------------------------------------------------------------
    workers: int | None = Field(default=None, ge=1, le=256)
    """Front-end processes (HTTP, decoding) under `multidomain serve`; None: half the cores, 1 to 8."""
    devices: str | None = None
    """Engines, one process per device, comma-separated (e.g. `cuda:0,cuda:1`, or `cpu,cpu` for tests);
    None: one engine on `device`."""
    frontend_sched_batch: bool = True
    """Front ends run under the OS's SCHED_BATCH policy (Linux; left alone under a real-time policy): their
    wake-ups (each request, each decode) then do not preempt the engine's intra-op threads in the middle of
    an operator, which stalls every one of them at its barrier; they run on a free core or at the
    scheduler's next tick. Same CPU share, fewer interruptions (server/README.md, Benchmark)."""
    slab_bytes: int = Field(default=16 * MiB, ge=MiB)
    """Each front end's shared-memory slab for pixels in flight: K of them must fit /dev/shm (Docker's
    default is 64 MiB; the compose file raises it)."""
    engine_endpoints: str | None = None
    """Set by the supervisor for its front ends: the engines' ZeroMQ addresses, comma-separated. Unset:
    `create_app` runs an engine in its own process."""
    engine_timeout_s: float = Field(default=120.0, gt=0)
    """A front end answers 503 when an engine has not answered a request in this time."""

    # -- engine (beyond the fields inherited from EngineConfig, declared there only) ---------------------
    torch_threads: int | None = Field(default=None, ge=1)
    """Intra-op threads for the CPU forward; None keeps torch's default."""
    warmup: bool = True
    """Run a forward at start-up so the first request is not the slow one."""
    warmup_size: int = Field(default=32, ge=1, le=4096)
    """Input side used by the warm-up forward when no domain is stored."""

    # -- batching ---------------------------------------------------------------------------------
    max_batch_size: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0.0)
    """How long the first image of a batch waits for others."""
    max_queue: int = Field(default=512, ge=1)
    """Images waiting for inference; beyond it requests get 429 with Retry-After."""
    max_requests_in_flight: int = Field(default=256, ge=1)
    """Classify requests admitted at once (decoding or waiting for the engine), counted from the moment
    the whole body has arrived: beyond it 429. Clients still sending their bodies hold no slot (they are
    bounded by the connection limits and the body buffer below)."""
    decode_threads: int = Field(default=2, ge=1)
    """Thread pool for image decoding and preprocessing (off the event loop), per front end. Images are
    handed to it smallest request first (`server.decoding`)."""
    inline_decode_pixels: int = Field(default=128 * 128, ge=0)
    """Requests of at most this many pixels in all, with bodies of at most 16 KiB, have their headers read
    and their images decoded on the event loop rather than in the pools (`server.routes.classify`): for
    such images the two thread hand-offs cost more CPU than the work. 0: every request uses the pools."""
    engine_jpeg_decode: bool = False
    """JPEGs decoded by the engine on its device (`server.device_jpeg`: batched nvJPEG on CUDA) instead of
    by the front ends, which then only read and check the headers: for requests whose images are all
    YCbCr or grayscale JPEGs, for domains resizing bilinearly (the pixels within one level of the front
    end's). Off by default: on the CPU the decode would only move from the front ends to the engine's cores."""
    large_decode_nice: int = Field(default=19, ge=0, le=19)
    """OS priority (nice, Linux) of the decode lane for large images (over 1/64 of a front end's pixel
    share): a pool of its own of max(1, `decode_threads` - 1) threads, so a flood of large images yields
    the CPU to the engine, the event loop and small images, and still decodes at full speed on idle cores
    (`server.decoding`). 0: no lane; large images share the decode pool, at most `decode_threads` - 1 of
    them at once."""
    max_pixels_decoding: int = Field(default=320_000_000, ge=1)
    """Pixels (width x height, from the headers) of the requests admitted and not yet decoded, for the
    whole server: each of the K front ends admits ceil(limit / K), so two requests of large images fill
    it and the next gets 429 at once instead of waiting behind them. A request larger than 1/64 of a
    front end's share is admitted only while a quarter of the share stays free, which is kept for small
    requests; an idle front end admits any request within `max_request_pixels`."""
    request_timeout_s: float | None = Field(default=60.0, gt=0)
    """Deadline of a classify request, from the moment its whole body has arrived (reading the body has
    `body_timeout_s`); a client may ask for less with `X-Request-Timeout: <seconds>`. Past it: 504
    `deadline_exceeded`, its images not yet decoded are skipped and the engine drops those still queued.
    None: no deadline."""

    # -- limits -----------------------------------------------------------------------------------
    max_body_bytes: int = Field(default=16 * MiB, ge=1)
    """Largest classify request body (enforced while reading)."""
    max_upload_bytes: int = Field(default=256 * MiB, ge=1)
    """Largest adapter upload body."""
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    """Decompression-bomb guard: images with more pixels are refused (413)."""
    max_request_pixels: int = Field(default=4 * DEFAULT_MAX_PIXELS, ge=1)
    """The sum of width x height over a request's images, from their headers before any is decoded;
    more is refused with 413. The default, 160 Mpx, is 64 full-HD frames or 4 images at the pixel limit
    (a few seconds of one decode thread)."""
    max_jpeg_scans: int = Field(default=DEFAULT_MAX_JPEG_SCANS, ge=1)
    """JPEGs with more scans are refused (422 `too_many_scans`): encoders write at most 18 (progressive
    CMYK; colour 10, grayscale 6), and each scan is one more pass of the decoder over the image (one
    38 KB file with its last scan repeated 1,000 times took 2.2 s)."""
    max_image_decode_bytes: int = Field(default=DEFAULT_MAX_DECODE_BYTES, ge=1)
    """Bound on one image's decode, which cannot be interrupted once started: pixels x bytes per
    decoded pixel x passes (a progressive JPEG's scans; 1 otherwise), from the header; more is refused
    with 413 `too_costly_to_decode`. The default, 960 MB, is the costliest image any encoder writes at
    the default pixel limit (40 Mpx of progressive CMYK: 4 bytes x 6 passes)."""
    max_images_per_request: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=100, ge=1)
    max_classes: int = Field(default=1000, ge=1)
    """Most classes (labels) of an uploaded domain; more gets 422. A head costs only its own bank slot,
    (features + 1) x 4 bytes a class (5 KB on MobileNetV2's 1280 features, 1 KB on ResNet-26's 256), and is
    released when its domain leaves the bank; a mixed batch's logits are as wide as the widest resident
    head. The default fits ImageNet-1k, the largest Decathlon domain (about 5 MB of head on MobileNetV2);
    when every slot was padded to the widest head, a 10,000-class head cost +691 MB and slowed every other
    domain's batches 2x."""
    max_input_size: int = Field(default=512, ge=1)
    """Largest `preprocessing.input_size` of an uploaded domain (its `resize` may be at most twice it);
    more gets 422. Set it to what the backbone was built for: ResNet-26 is trained at 64, MobileNetV2 at
    224. Preprocessing memory and time grow with its square (2048 cost one 156-byte PNG 4 s and
    +975 MB); the default, 512, is 16 times less and leaves room for upscaled MobileNetV2 domains."""

    # -- connections (server/connection_limits.py; enforced by the HTTP protocol, server/http_protocol.py).
    # K = the front ends (`workers`): "global" limits are split, ceil(limit / K) per front end; "per front
    # end" ones hold in each (the kernel spreads one address's connections over all K by hash).
    header_timeout_s: float = Field(default=10.0, gt=0)
    """Most seconds from a request's first byte to the end of its headers; then 408 and the connection is
    closed (slow-header clients hold no connection longer)."""
    body_timeout_s: float = Field(default=60.0, gt=0)
    """Most seconds from the end of a request's headers to the end of its body (16 MiB at 2.2 Mbit/s);
    then 408 and the connection is closed."""
    keep_alive_s: float = Field(default=5.0, gt=0)
    """An idle connection (before its first request, or between two) is closed after this many seconds."""
    max_connections: int = Field(default=2048, ge=1)
    """Open connections, global (each front end holds ceil(limit / K)); beyond it a new connection gets
    503 and is closed. A trusted proxy's connections count but are never refused (the balancer has its
    own maxconn)."""
    max_connections_per_address: int = Field(default=128, ge=1)
    """Open connections from one client address, per front end (so at most K x this in the server); beyond
    it 429 and the connection is closed. Behind a trusted proxy the client is the X-Forwarded-For
    address and this bounds its requests in progress instead (every connection comes from the proxy)."""
    trusted_proxies: str = ""
    """Comma-separated addresses or networks (`10.0.0.0/8`) of proxies whose `X-Forwarded-For` names the
    client (the last address in it that is not itself a trusted proxy). Empty: no one's is believed."""
    body_buffer_bytes: int = Field(default=256 * MiB, ge=1)
    """Request bodies buffered at once, global (each front end holds ceil(budget / K), at least
    `max_body_bytes`): a body that does not fit gets 503 body_buffer_full with Retry-After before it is
    read. Admin uploads (token checked before their body is read) are outside it, bounded by
    `max_upload_bytes` each."""
    body_buffer_per_address_bytes: int = Field(default=32 * MiB, ge=1)
    """Of that buffer, what one client address may hold, per front end (at least `max_body_bytes`), so
    one client's slow bodies cannot take the whole buffer from everyone else's."""

    # -- logs -------------------------------------------------------------------------------------
    log_json: bool = False
    """One JSON object per log line (time, level, logger, component, pid, request_id, message)."""

    # -- auth -------------------------------------------------------------------------------------
    admin_token: SecretStr | None = None
    """Bearer token for adapter upload, activation and deletion; None refuses every admin call."""
    inference_token: SecretStr | None = None
    """Bearer token required for classification; None (default) leaves inference open."""

    @property
    def store_location(self) -> str | Path:
        """What `adapters_store.open_store` opens: `store_url` when set, else `store_dir`."""
        return self.store_url if self.store_url else self.store_dir

    def artifact_limits(self) -> Limits:
        """What an uploaded domain artifact is validated against (the rest are the store's own defaults)."""
        return Limits(max_labels=self.max_classes, max_input_size=self.max_input_size)

    def store_quotas(self) -> StoreQuotas:
        return StoreQuotas(self.max_domains, self.max_versions_per_domain, self.max_store_bytes)

    @field_validator("admin_token", "inference_token", mode="after")
    @classmethod
    def _blank_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        # MD_ADMIN_TOKEN= (empty) in a compose file means "no token", never "the empty token".
        return None if value is None or not value.get_secret_value().strip() else value

    def frontends(self) -> int:
        """How many front-end processes serve (the per-process share of the global limits uses it)."""
        return self.workers or max(1, min(8, (os.cpu_count() or 2) // 2))

    def device_list(self) -> list[str]:
        """One entry per engine process."""
        if self.devices:
            return [d.strip() for d in self.devices.split(",") if d.strip()]
        return [self.device]
