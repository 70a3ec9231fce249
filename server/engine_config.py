"""The engine's settings, declared once: `Settings` (env `MD_*`) inherits these fields, and the engine
receives them as an `EngineConfig` (`EngineConfig.of(settings)`). No torch here: front ends read Settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.eviction import EvictionName


class EngineConfig(BaseModel):
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """auto: cuda when available, else cpu; `cuda:N` for one GPU of several (one engine each)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Compute dtype on CUDA (the CPU always runs float32)."""
    channels_last: bool = True
    """channels_last memory format of the backbone and its inputs, on every device (false: contiguous).
    The bank's kernels work on channels-last activations, and oneDNN's convolutions ran faster in it:
    on the 2-core CPU MobileNetV2 at 224 px 1.4x, ResNet-26 at 64 px 3-6% (server/README.md, "Memory
    format"). cuDNN's tensor-core convolutions prefer it too; float32 on CUDA was not measured."""
    bank_slots: int = Field(default=16, ge=1, le=4096)
    """Resident domains (adapter bank slots); `bank_eviction` picks which one leaves for a new one. The
    bank holds one slot more, the scratch slot an upload is tried in."""
    bank_eviction: EvictionName = "lfu"
    """Which resident domain a miss evicts (server/eviction.py): "lfu", the one with the fewest recent
    requests (counts kept for every domain seen, halved every 10 x bank_slots requests), so a Zipf tail
    of one-off domains does not push the hot ones out; or "lru", the least recently used."""
    merged_cache: int = Field(default=4, ge=0)
    """Domains whose merged (folded) weights are kept for single-domain batches (each costs about one
    backbone's conv weights); 0 disables merging."""
    revision_poll_s: float = Field(default=0.5, ge=0.0)
    """Minimum seconds between two checks of the store's revision, for changes made by other processes
    (0: check on every resolve)."""
    verify_checksums: bool = True
    """Check each artifact's sha256 when it is loaded into the bank (a few ms per MB)."""
    engine_streams: int = Field(default=1, ge=0, le=256)
    """Forwards the engine runs at once, each on the intra-op threads divided between them (one runner
    thread each); 0: one per core torch may use on the CPU (`torch_threads`, else the core count), one on
    CUDA (a device queue serialises kernels anyway). Each stream's batch uses at most
    bank_slots // streams domains, so the batches running at once always fit the bank. Default 1: on the
    2-core machine two streams served ~20% more images/s at a lower median latency, but with a wider tail
    (p99 1.9x p50 against 1.1-1.3x) and ~300 MB more engine memory (server/README.md, "Streams")."""
    forward_split: int = Field(default=2, ge=1, le=64)
    """Parts each forward is split into along the batch, run at once on threads of their own, each on its
    share of the stream's intra-op threads (CPU only, at most one part per thread; 1: no split). Two
    single-thread halves of a batch wait for each other once per batch, not at every op's barrier: on
    the 2-core machine the server delivered 15-20% more images/s at a lower latency, within the tail and
    memory bars (server/README.md, "Split forwards")."""
    micro_batch: int = Field(default=0, ge=0)
    """Largest batch one forward runs (bigger batches are split); 0: measured per input side at warm-up."""

    @classmethod
    def of(cls, settings: BaseModel, device: str | None = None) -> EngineConfig:
        """The engine fields of `settings` (a `Settings`), with another device for one of several engines."""
        values = {name: getattr(settings, name) for name in cls.model_fields}
        if device is not None:
            values["device"] = device
        return cls.model_validate(values)
