"""The front ends' Prometheus metrics, and `/metrics` for the whole server.

Counters and histograms of HTTP requests live in each front end; with several front-end processes they
use prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor): each process
writes its values to files there and any front end's `/metrics` sums them. Gauges are not kept here:
the engines export their own (bank, queue, memory), fetched over the channel and merged with an `engine`
label, so a domain that leaves a bank loses its series instead of keeping its last value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HttpMetrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["route", "domain", "status"]
        self.requests = Counter(
            "md_requests", "HTTP requests by route, domain and status", labels, registry=r
        )
        self.latency = Histogram(
            "md_request_latency_seconds", "HTTP request latency by route, domain and status", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.images = Counter("md_images", "Images classified by domain", ["domain"], registry=r)

    def observe_request(self, route: str, domain: str, status: int | str, seconds: float) -> None:
        """`status`: the HTTP status answered, or "disconnect" (the client left before its body arrived)."""
        values = (route, domain, str(status))
        self.requests.labels(*values).inc()
        self.latency.labels(*values).observe(seconds)

    def render(self, engine_texts: list[bytes], domains: set[str] | None = None) -> bytes:
        """The front ends' series (summed) and the engines'; with `domains` (the store's), series labelled
        with any other domain are left out: a deleted domain's counters leave /metrics with it (the
        multiprocess files cannot forget a label set, so it is filtered here)."""
        if self.multiprocess:
            summed = CollectorRegistry()
            MultiProcessCollector(summed)  # every front end's files, this one's included
            own = generate_latest(summed)
        else:
            own = generate_latest(self.registry)
        if domains is not None:
            own = _without_domains(own, domains)
        return own + merge_engine_metrics(engine_texts)


def _without_domains(text: bytes, domains: set[str]) -> bytes:
    """`text` less the samples whose `domain` label names a domain not in `domains` ("" is kept)."""
    families = []
    for family in text_string_to_metric_families(text.decode()):
        kept = [
            s for s in family.samples if s.labels.get("domain", "") in domains or not s.labels.get("domain")
        ]
        out = Metric(family.name, family.documentation, family.type, family.unit)
        out.samples = kept
        families.append(out)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))  # type: ignore[arg-type]
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_engine_metrics(texts: list[bytes]) -> bytes:
    """Several engines' expositions as one, each sample labelled with its engine's index."""
    merged: dict[str, Metric] = {}
    for index, text in enumerate(texts):
        for family in text_string_to_metric_families(text.decode()):
            target = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for sample in family.samples:
                target.samples.append(sample._replace(labels={**sample.labels, "engine": str(index)}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))  # type: ignore[arg-type]
    return generate_latest(registry)
