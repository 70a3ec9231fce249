"""The engine's Prometheus metrics: bank, batches, queue, memory and busy time, one registry per engine.

`EngineMetrics` implements the engine's and batcher's event hooks, so neither imports prometheus. The
engine process renders this registry itself and front ends fetch and merge it (`server.http_metrics`),
so the engine's gauges are exact (no multiprocess arithmetic) and the series of a domain that leaves the
bank are removed, not left at their last value.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.batcher import BatchEvents
from server.engine import DomainKey, Engine, EngineEvents

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineMetrics(EngineEvents, BatchEvents):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_wait_s = Histogram(
            "md_queue_wait_seconds",
            "Time an image waits before its batch runs",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth_g = Gauge("md_queue_depth", "Images waiting for inference", registry=r)
        self.batch_size = Histogram("md_batch_size", "Images per batch", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_domains = Histogram(
            "md_batch_domains", "Distinct domain versions per batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "md_batch_seconds", "Engine time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.bank_hits = Counter("md_bank_hits", "Batches' domain lookups found resident", registry=r)
        self.bank_misses = Counter("md_bank_misses", "Domain lookups that needed a load", registry=r)
        self.bank_loads = Counter("md_bank_loads", "Domains loaded from the store into the bank", registry=r)
        self.bank_evictions = Counter("md_bank_evictions", "Domains evicted from the bank (LRU)", registry=r)
        self.bank_load_s = Histogram(
            "md_bank_load_seconds", "Store -> bank load latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.resident = Gauge("md_resident_domains", "Domain versions resident in the bank", registry=r)
        self.device_memory = Gauge(
            "md_device_memory_bytes",
            "Device memory in use (CUDA allocated, or process RSS on the CPU)",
            registry=r,
        )
        self.bank_memory = Gauge("md_bank_memory_bytes", "Bytes held by the adapter bank", registry=r)
        self.merged_memory = Gauge("md_merged_memory_bytes", "Bytes held by merged-weight caches", registry=r)
        self.domain_resident = Gauge(
            "md_domain_resident",
            "1 for each domain version resident in the bank",
            ["domain", "version"],
            registry=r,
        )
        self.busy_seconds = Counter(
            "md_engine_busy_seconds",
            "Seconds the engine spent running batches (busy fraction: its rate)",
            registry=r,
        )

    # -- engine events ----------------------------------------------------------------------------
    def bank_hit(self, key: DomainKey) -> None:
        self.bank_hits.inc()

    def bank_miss(self, key: DomainKey) -> None:
        self.bank_misses.inc()

    def bank_load(self, key: DomainKey, seconds: float) -> None:
        self.bank_loads.inc()
        self.bank_load_s.observe(seconds)
        self.domain_resident.labels(key.domain, str(key.version)).set(1)

    def domain_dropped(self, key: DomainKey) -> None:
        with contextlib.suppress(KeyError):  # never loaded through these metrics
            self.domain_resident.remove(key.domain, str(key.version))

    def bank_evict(self, key: DomainKey) -> None:
        self.bank_evictions.inc()

    def resident_changed(self, count: int) -> None:
        self.resident.set(count)

    # -- batch events -----------------------------------------------------------------------------
    def batch_run(self, size: int, domains: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_domains.observe(domains)
        self.batch_seconds.observe(seconds)
        self.busy_seconds.inc(seconds)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_s.observe(seconds)

    def queue_depth(self, images: int) -> None:
        self.queue_depth_g.set(images)

    # -- exposition -------------------------------------------------------------------------------
    def render(self, engine: Engine | None, queue_depth: int) -> bytes:
        self.queue_depth_g.set(queue_depth)
        if engine is not None:
            self.device_memory.set(engine.device_memory_bytes())
            self.bank_memory.set(engine.bank_bytes())
            self.merged_memory.set(engine.merged_bytes())
            self.resident.set(len(engine.resident()))
        return generate_latest(self.registry)
