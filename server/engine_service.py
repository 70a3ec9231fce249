"""What an engine offers its front ends, as plain values: the one API behind both transports.

The engine process (`server.engine_process`) answers the channel's messages by calling these methods;
the in-process transport (`server.engine_client.LocalEngine`) calls them directly. Values in and out are
the channel's: str, int, float, lists, dicts, bytes, and numpy uint8 pixels for `submit`.

It owns the store, the engine, the batcher and the engine's metrics; uploads are validated against the
running backbone here (it alone has the model) and tried (loaded into a scratch bank slot and run on a
probe batch: refused unless the logits are finite) before anything is stored.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors  # safetensors only: never pickle

from adapters_store.errors import ArtifactInvalid, Problem, VersionNotFound
from adapters_store.manifest import DomainManifest
from adapters_store.open import open_store
from adapters_store.store import AdapterStore
from adapters_store.validation import validate_domain_artifact
from model_artifacts import adapter_config
from server.batcher import Batcher
from server.device_jpeg import JpegDecoder
from server.engine import DomainKey, Engine, EngineConfig, Prediction
from server.engine_metrics import EngineMetrics
from server.errors import BadRequest, StaleVersion
from server.protocol import affinity
from server.settings import Settings


def prediction_values(pred: Prediction) -> list[list[Any]]:
    """One image's answer on the channel: [[index, label, probability], ...] (its key travels once)."""
    return [[s.index, s.label, s.probability] for s in pred.top]


class EngineService:
    def __init__(
        self,
        settings: Settings,
        store: AdapterStore | None = None,
        device: str | None = None,
        engine: tuple[int, int] = (0, 1),
    ) -> None:
        """Load the backbone, warm up (measuring the micro-batch) and start the batcher: blocking.
        `engine` is (this engine's index, the number of engines): it warms up with its own domains."""
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        self.settings = settings
        self.store = (
            store
            if store is not None
            else open_store(settings.store_location, quotas=settings.store_quotas())
        )
        self.metrics = EngineMetrics()
        self.engine = Engine(self.store, EngineConfig.of(settings, device), events=self.metrics)
        if settings.warmup:
            index, count = engine
            own = [d for d in self.store.list_domains() if affinity(d, count) == index]
            self.engine.warm_up(largest_batch=settings.max_batch_size, domains=own)
        self.engine.warm = True
        self.batcher = Batcher(
            self.engine,
            # the batches the streams run at once never need more slots than the bank has together
            max_domains_per_batch=max(1, settings.bank_slots // self.engine.streams),
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            events=self.metrics,
        )
        self.batcher.start()
        self.jpeg_decoder = JpegDecoder(self.engine.device) if settings.engine_jpeg_decode else None

    # -- serving ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "backbone": engine.backbone_name,
            "fingerprint": engine.fingerprint,
            "device": str(engine.device),
            "warm": engine.warm,
            "resident_domains": len(engine.resident()),
            "max_queue": self.batcher.max_queue,
        }

    def resolve(self, domain: str, version: int | None = None) -> dict[str, Any]:
        """The active version (or `version`, pinned: VersionNotFound once deleted), its preprocessing and
        class count, with the queue's state for admission."""
        if version is None:
            key, manifest = self.engine.resolve_with_manifest(domain)
        else:
            key = DomainKey(domain, version)
            manifest = self.engine.manifest(key)
        self.engine.prefetch(key)  # a cold domain is read now, in parallel with the worker's batches
        return {
            "domain": key.domain,
            "version": key.version,
            "pinned": version is not None,
            "sha256": manifest.sha256,
            "preprocessing": manifest.preprocessing.model_dump(mode="json"),
            "classes": len(manifest.labels),
            **self.queue_state(),
        }

    def queue_state(self) -> dict[str, int]:
        """What a front end's admission reads (sent with every resolve and classify answer)."""
        return {
            "queued": self.batcher.depth,
            "max_queue": self.batcher.max_queue,
            "retry_after": self.batcher.retry_after(),
        }

    def serving_key(
        self, domain: str, version: int, sha256: str | None, pinned: bool, *, may_block: bool = True
    ) -> DomainKey | None:
        """The key a classify request is served with, once checked: a front end resolves from its cache,
        so the version its pixels were prepared for (`version`, whose tensors have `sha256`) must still be
        the active one (or, `pinned`, still be stored as it was). Raises `StaleVersion` when it is not (the
        front end resolves again and prepares the pixels anew), the store's errors when it is gone.
        `sha256` None: serve `version` unchecked. With `may_block` False, None when checking needs a store
        read (the caller runs it again off its event loop)."""
        key = DomainKey(domain, version)
        if sha256 is None:
            return key
        if pinned:
            manifest = self.engine.cached_manifest(key)
            if manifest is None:
                if not may_block:
                    return None
                manifest = self.engine.manifest(key)
            current = (key, manifest)
        else:
            cached = self.engine.cached_active(domain)
            if cached is None and not may_block:
                return None
            current = cached if cached is not None else self.engine.resolve_with_manifest(domain)
        if current[0] != key or current[1].sha256 != sha256:
            raise StaleVersion(f"{domain} v{version} is no longer what the request resolved to")
        return key

    def submit(
        self,
        domain: str,
        version: int,
        pixels: np.ndarray | torch.Tensor,
        top_k: int,
        deadline_s: float | None = None,
    ) -> list[Future[Prediction]]:
        """Queue a request's crops; those still queued `deadline_s` seconds from now are dropped."""
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        return self.batcher.submit(DomainKey(domain, version), pixels, top_k, deadline=deadline)

    def decode_jpegs(self, domain: str, version: int, jpegs: list[bytes]) -> Future[torch.Tensor]:
        """A request's JPEGs, handed on by a front end (`MD_ENGINE_JPEG_DECODE`), as crops on the device
        with the version's preprocessing, decoded with other requests' (`server.device_jpeg`;
        CorruptImage for undecodable data). Does not block."""
        if self.jpeg_decoder is None:
            raise BadRequest("this engine does not decode JPEGs (MD_ENGINE_JPEG_DECODE is off)")
        if not jpegs or not all(isinstance(j, bytes) for j in jpegs):
            raise BadRequest("a classify message's jpegs are a non-empty list of bytes")
        key = DomainKey(domain, version)
        return self.jpeg_decoder.submit(jpegs, lambda: self.engine.manifest(key).preprocessing.image_spec())

    # -- domains ----------------------------------------------------------------------------------
    def upload(
        self, domain: str, manifest: bytes, tensors: bytes, filename: str | None, activate: bool
    ) -> int:
        engine = self.engine
        validated = validate_domain_artifact(
            manifest,
            tensors,
            spec_for=engine.domain_spec,
            fingerprint=engine.fingerprint,
            limits=self.settings.artifact_limits(),
            filename=filename,
        )
        if validated.manifest.domain != domain:
            msg = f"the manifest is for domain {validated.manifest.domain!r}, uploaded to {domain!r}"
            raise ArtifactInvalid([Problem("manifest.domain", msg, "domain")])
        self._trial(validated.manifest, tensors)
        version = self.store.put(validated, activate=activate)
        engine.notice_store_change()
        return version

    def _trial(self, manifest: DomainManifest, tensors: bytes) -> None:
        """Parse the tensors as a bank load will, then load them into the engine's scratch slot and run a
        probe batch (`Engine.trial`): refused unless every logit is finite."""
        try:
            adapter_config(manifest.adapter)
            parsed = load_safetensors(tensors)
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactInvalid([Problem("tensors", f"the bank cannot load it: {exc}", "load")]) from None
        self.engine.trial(manifest, parsed)

    def activate(self, domain: str, version: int | None) -> int:
        """Activate `version`, or roll back when it is None."""
        if version is None:
            version = self.store.rollback(domain)
        else:
            self.store.activate(domain, version)
        self.engine.notice_store_change()
        return version

    def delete(self, domain: str, version: int | None) -> None:
        if version is None:
            self.store.delete_domain(domain)
        else:
            self.store.delete_version(domain, version)
        self.store_changed(domain, version, evict=True)

    def store_changed(self, domain: str | None, version: int | None, evict: bool) -> None:
        """Another engine changed the store: forget cached versions (and drop a deleted domain's slots)."""
        self.engine.notice_store_change()
        if evict and domain is not None:
            self.engine.evict(domain, version)

    def listing(self) -> list[dict[str, Any]]:
        resident = {k.domain for k in self.engine.resident()}
        # one index read for every domain
        return [
            {"domain": info.domain, "versions": list(info.versions), "active": info.active,
             "resident": info.domain in resident}
            for info in self.store.describe_all()
        ]  # fmt: skip

    def describe(self, domain: str, version: int | None = None) -> dict[str, Any]:
        """The domain's versions and residency, with the manifest of `version` (default: the active one,
        else the newest); VersionNotFound for a version that is not stored."""
        info = self.store.describe(domain)
        shown = info.active if info.active is not None else (info.versions[-1] if info.versions else None)
        if version is not None:
            if version not in info.versions:
                raise VersionNotFound(f"domain {domain!r} has no version {version}")
            shown = version
        manifest = None
        if shown is not None:
            try:
                manifest = self.store.get(domain, shown).manifest.model_dump(mode="json")
            except VersionNotFound:  # deleted between the two reads
                manifest = None
        return {
            "domain": domain,
            "versions": list(info.versions),
            "active": info.active,
            "previous": list(info.previous),
            "resident_versions": sorted(k.version for k in self.engine.resident() if k.domain == domain),
            "manifest": manifest,
        }

    def metrics_text(self) -> bytes:
        return self.metrics.render(self.engine, self.batcher.depth)

    def close(self) -> None:
        """Stop the batcher after the queued images are answered (the drain)."""
        if self.jpeg_decoder is not None:
            self.jpeg_decoder.stop()
        self.batcher.stop()
