"""The inference engine: one device-resident backbone, an adapter bank of resident domains.

    engine = Engine(LocalStore("store"), EngineConfig(bank_slots=16))
    engine.warm_up()
    key = engine.resolve("birds")                 # the active version, as a (domain, version) key
    x = preprocess(data, engine.manifest(key).preprocessing, max_pixels=10**7)  # server.preprocess
    [pred] = engine.infer([key], x[None], top_k=5)

Free of HTTP types: the server, the benchmarks and the reliability suite all drive it directly.

Residency: resident domains live in bank slots keyed by (domain, version), least recently used evicted.
A miss reads the artifact from the store once, however many callers wait for it (single-flight), then
copies it into a slot. A batch of one domain runs the merged network (adapters and BN folded into the
convs; cached for the `merged_cache` most recently used slots); a mixed batch runs the bank path, one
gather per layer. Activating a new version changes what `resolve` returns; a key already resolved keeps
its version to the end, so an answer never mixes versions.

Thread safety: `infer` and bank changes are serialised by one lock (a network runs one forward at a
time). Store reads can happen outside it: `prefetch` (called by the server from its decode threads) reads
and parses a cold domain's artifact while the worker runs other batches, so the worker only copies it in.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors  # safetensors only: never pickle
from torch import Tensor

from adapters_store.errors import VersionNotFound
from adapters_store.manifest import DomainManifest
from adapters_store.store import AdapterStore
from adapters_store.validation import DomainSpec
from model_artifacts import BackboneRefused, adapter_config, backbone_network, spec_for
from residual_adapters import AdapterConfig, DomainMismatch, MultiDomainNet
from residual_adapters.inputs import normalise
from server.engine_config import EngineConfig
from server.errors import DomainUnavailable, EngineError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, order=True)
class DomainKey:
    """One version of one domain: what a bank slot holds and what a request is served with."""

    domain: str
    version: int


@dataclass(frozen=True)
class LabelScore:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the exact domain version that produced it and its top-k classes."""

    key: DomainKey
    top: list[LabelScore]


class EngineEvents:
    """Hooks the engine calls; the server's metrics override them. The defaults do nothing."""

    def bank_hit(self, key: DomainKey) -> None: ...
    def bank_miss(self, key: DomainKey) -> None: ...
    def bank_load(self, key: DomainKey, seconds: float) -> None: ...
    def bank_evict(self, key: DomainKey) -> None: ...
    def domain_dropped(self, key: DomainKey) -> None:
        """A version left the bank (LRU eviction, deletion or a store change)."""

    def resident_changed(self, count: int) -> None: ...


@dataclass
class _Slot:
    index: int
    key: DomainKey
    manifest: DomainManifest


@dataclass
class _Fetched:
    manifest: DomainManifest
    config: AdapterConfig
    tensors: dict[str, Tensor]


@dataclass
class EngineStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device {requested!r} requested but CUDA is not available")
    return torch.device(requested)


class Engine:
    def __init__(
        self, store: AdapterStore, config: EngineConfig | None = None, events: EngineEvents | None = None
    ) -> None:
        self.store = store
        self.config = config or EngineConfig()
        self.events = events or EngineEvents()
        self.stats = EngineStats()
        self.device = pick_device(self.config.device)
        on_cuda = self.device.type == "cuda"
        self.dtype = _DTYPES[self.config.dtype] if on_cuda else torch.float32
        self.memory_format = (
            torch.channels_last if on_cuda and self.config.channels_last else torch.contiguous_format
        )
        self.net, self.backbone_name = self._load_backbone()
        self.fingerprint = self.net.fingerprint()
        self.net.enable_bank(self.config.bank_slots)

        self._net_lock = threading.Lock()
        """Held for every forward and bank change, so a slot never changes under a forward that reads it."""
        self._state_lock = threading.Lock()
        """Guards the dictionaries below (short critical sections only)."""
        self._resident: OrderedDict[DomainKey, _Slot] = OrderedDict()  # LRU order: oldest first
        self._merged: OrderedDict[int, None] = OrderedDict()  # slots with merged weights, LRU order
        self._inflight: dict[DomainKey, Future[_Fetched]] = {}
        self._staged: OrderedDict[DomainKey, _Fetched] = OrderedDict()  # prefetched, not yet in the bank
        self._active: dict[str, tuple[DomainKey, DomainManifest]] = {}
        self._revision = store.revision()
        self._revision_checked = time.monotonic()
        self._micro: dict[int, int] = {}
        """Input side -> the micro-batch measured best at warm-up."""
        self.warm = False

    # -- backbone ---------------------------------------------------------------------------------
    def _load_backbone(self) -> tuple[MultiDomainNet, str]:
        stored = self.store.get_backbone()
        # The store's domains (including an imported classifier) come from the store: none built in.
        try:
            net = backbone_network(stored.manifest, load_safetensors(stored.read_tensor_bytes(verify=True)))
        except BackboneRefused as exc:
            raise EngineError(f"the store's backbone cannot be served: {exc}") from None
        net.eval().requires_grad_(False)
        net.to(device=self.device, dtype=self.dtype)
        if self.memory_format is torch.channels_last:
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return net, stored.manifest.name

    def domain_spec(self, manifest: DomainManifest) -> DomainSpec:
        """The tensors a domain manifest implies on this backbone (the upload validator's `spec_for`)."""
        return spec_for(self.net)(manifest)

    # -- which version serves a domain ------------------------------------------------------------
    def notice_store_change(self) -> None:
        """Forget cached active versions (after this process wrote to the store)."""
        with self._state_lock:
            self._active.clear()
            self._revision = self.store.revision()
            self._revision_checked = time.monotonic()

    def _poll_revision(self) -> None:
        now = time.monotonic()
        if now - self._revision_checked < self.config.revision_poll_s:
            return
        revision = self.store.revision()
        with self._state_lock:
            self._revision_checked = now
            if revision != self._revision:  # another process (or replica's admin) changed the store
                self._revision = revision
                self._active.clear()

    def resolve(self, domain: str) -> DomainKey:
        """The key of the domain's active version; raises the store's DomainNotFound/VersionNotFound."""
        return self.resolve_with_manifest(domain)[0]

    def resolve_with_manifest(self, domain: str) -> tuple[DomainKey, DomainManifest]:
        self._poll_revision()
        with self._state_lock:
            cached = self._active.get(domain)
        if cached is not None:
            return cached
        stored = self.store.get(domain)
        entry = (DomainKey(domain, stored.version), stored.manifest)
        with self._state_lock:
            self._active[domain] = entry
        return entry

    def manifest(self, key: DomainKey) -> DomainManifest:
        with self._state_lock:
            slot = self._resident.get(key)
            active = self._active.get(key.domain)
        if slot is not None:
            return slot.manifest
        if active is not None and active[0] == key:
            return active[1]
        return self.store.get(key.domain, key.version).manifest

    # -- residency --------------------------------------------------------------------------------
    def resident(self) -> list[DomainKey]:
        with self._state_lock:
            return list(self._resident)

    def is_resident(self, domain: str) -> bool:
        with self._state_lock:
            return any(k.domain == domain for k in self._resident)

    def _fetch(self, key: DomainKey) -> _Fetched:
        """Read one artifact from the store; concurrent callers for the same key share one read."""
        with self._state_lock:
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
        assert future is not None
        if not owner:
            return future.result()
        try:
            stored = self.store.get(key.domain, key.version)
            data = stored.read_tensor_bytes(verify=self.config.verify_checksums)
            tensors = load_safetensors(data)
            config = adapter_config(stored.manifest.adapter)
            fetched = _Fetched(stored.manifest, config, tensors)
            future.set_result(fetched)
            return fetched
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._state_lock:
                self._inflight.pop(key, None)

    def prefetch(self, key: DomainKey) -> None:
        """Read a non-resident domain from the store ahead of its batch (no-op when resident or staged)."""
        with self._state_lock:
            if key in self._resident or key in self._staged:
                return
        fetched = self._fetch(key)
        with self._state_lock:
            if key not in self._resident:
                self._staged[key] = fetched
                while len(self._staged) > self.config.bank_slots:  # bounded: forget the oldest
                    self._staged.popitem(last=False)

    def _free_slot(self, keep: set[DomainKey]) -> int:
        """A free slot index, evicting the least recently used domain not in `keep` if needed."""
        used = {s.index for s in self._resident.values()}
        for i in range(self.config.bank_slots):
            if i not in used:
                return i
        for key, slot in self._resident.items():  # oldest first
            if key not in keep:
                del self._resident[key]
                self._merged.pop(slot.index, None)
                self.net.bank_clear(slot.index)
                self.stats.evictions += 1
                self.events.bank_evict(key)
                self.events.domain_dropped(key)
                return slot.index
        raise EngineError(f"a batch needs more than {self.config.bank_slots} resident domains")

    def _ensure_resident(self, keys: Sequence[DomainKey]) -> dict[DomainKey, int]:
        """Slots for `keys` (loading misses); call with the net lock held."""
        wanted = set(keys)
        slots: dict[DomainKey, int] = {}
        for key in dict.fromkeys(keys):
            with self._state_lock:
                slot = self._resident.get(key)
                if slot is not None:
                    self._resident.move_to_end(key)
            if slot is not None:
                self.stats.hits += 1
                self.events.bank_hit(key)
                slots[key] = slot.index
                continue
            self.stats.misses += 1
            self.events.bank_miss(key)
            slots[key] = self._load(key, wanted)
        return slots

    def _load(self, key: DomainKey, keep: set[DomainKey]) -> int:
        start = time.perf_counter()
        with self._state_lock:
            staged = self._staged.pop(key, None)
        fetched = staged if staged is not None else self._fetch(key)
        with self._state_lock:
            index = self._free_slot(keep)
        try:
            self.net.bank_load(index, fetched.config, fetched.tensors)
        except (DomainMismatch, ValueError, KeyError) as exc:
            raise DomainUnavailable(
                f"{key.domain} v{key.version} cannot be loaded into the bank: {exc}"
            ) from exc
        with self._state_lock:
            self._resident[key] = _Slot(index, key, fetched.manifest)
            count = len(self._resident)
        seconds = time.perf_counter() - start
        self.stats.loads += 1
        self.stats.load_seconds.append(seconds)
        del self.stats.load_seconds[:-1000]
        self.events.bank_load(key, seconds)
        self.events.resident_changed(count)
        return index

    def load(self, key: DomainKey) -> int:
        """Make `key` resident (a no-op when it is) and return its slot."""
        with self._net_lock:
            return self._ensure_resident([key])[key]

    def evict(self, domain: str, version: int | None = None) -> int:
        """Drop a domain's resident versions (all, or one); returns how many slots were freed."""
        with self._net_lock, self._state_lock:
            gone = [k for k in self._resident if k.domain == domain and version in (None, k.version)]
            for key in gone:
                slot = self._resident.pop(key)
                self._merged.pop(slot.index, None)
                self.net.bank_clear(slot.index)
            self._active.pop(domain, None)
            count = len(self._resident)
        for key in gone:
            self.events.domain_dropped(key)
        if gone:
            self.events.resident_changed(count)
        return len(gone)

    # -- inference --------------------------------------------------------------------------------
    def infer(
        self, keys: Sequence[DomainKey], images: Tensor, top_k: int | Sequence[int] = 5
    ) -> list[Prediction]:
        """Classify a batch: row i with domain version keys[i]. Images are preprocessed [B, 3, S, S]."""
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} keys for {images.shape[0]} images")
        return self._infer(keys, lambda _: images.to(self.device, self.dtype, non_blocking=True), top_k)

    def infer_pixels(
        self, keys: Sequence[DomainKey], pixels: Tensor, top_k: int | Sequence[int] = 5
    ) -> list[Prediction]:
        """Classify uint8 pixels [B, S, S, C] (`domain_format.preprocess.prepare`): `network_input`, then
        `infer`."""
        return self.infer(keys, self.network_input(keys, pixels), top_k)

    def network_input(self, keys: Sequence[DomainKey], pixels: Tensor) -> Tensor:
        """uint8 [B, S, S, C] -> the network's input on the device, row i normalised by keys[i]'s domain.

        Runs outside the network's lock, so a batch can be normalised while the previous one runs."""
        if len(keys) != pixels.shape[0]:
            raise ValueError(f"{len(keys)} keys for {pixels.shape[0]} images")
        # pinned on CUDA, so the copy runs asynchronously with the host's work; uint8: 4x fewer bytes
        host = pixels.pin_memory() if self.device.type == "cuda" else pixels
        on_device = host.to(self.device, non_blocking=True)
        rows: dict[DomainKey, list[int]] = {}
        for row, key in enumerate(keys):
            rows.setdefault(key, []).append(row)
        x = torch.empty(len(keys), 3, *pixels.shape[1:3], device=self.device, dtype=self.dtype)
        for key, idx in rows.items():  # the one normalisation, per domain (its own mean and std)
            pre = self.manifest(key).preprocessing
            index = torch.tensor(idx, device=self.device)
            x[index] = normalise(on_device[index], pre.mean, pre.std, layout="nhwc").to(self.dtype)
        return x

    def _infer(
        self,
        keys: Sequence[DomainKey],
        prepare: Callable[[dict[DomainKey, DomainManifest]], Tensor],
        top_k: int | Sequence[int],
    ) -> list[Prediction]:
        ks = [top_k] * len(keys) if isinstance(top_k, int) else list(top_k)
        with self._net_lock, torch.inference_mode():
            slots = self._ensure_resident(keys)
            with self._state_lock:
                manifests = {k: self._resident[k].manifest for k in slots}
            x = prepare(manifests).contiguous(memory_format=self.memory_format)
            distinct = list(slots)
            step = self.micro_batch(x.shape[-1]) or x.shape[0]
            if len(distinct) == 1:
                logits = torch.cat([self._forward_single(c, slots[distinct[0]]) for c in x.split(step)])
            else:
                index = torch.tensor([slots[k] for k in keys], device=self.device)
                logits = torch.cat(
                    [self.net(c, i) for c, i in zip(x.split(step), index.split(step), strict=True)]
                )
            probs = torch.softmax(logits.float(), dim=1)
            if len(distinct) > 1:
                # Rank only each row's own classes: a saturated softmax gives real classes exactly 0 too,
                # and they must not tie with the padding of a domain with fewer classes.
                probs = probs.masked_fill(self.net.padding_mask(index, probs.shape[1]), -1.0)
            k_max = min(max(ks), probs.shape[1])
            values, indices = probs.topk(k_max, dim=1)
        values_l, indices_l = values.cpu().tolist(), indices.cpu().tolist()
        out = []
        for row, key in enumerate(keys):
            labels = manifests[key].labels
            k = min(ks[row], len(labels))
            top = [
                LabelScore(i, labels[i], p)
                for i, p in zip(indices_l[row][:k], values_l[row][:k], strict=True)
            ]
            out.append(Prediction(key, top))
        return out

    def micro_batch(self, side: int) -> int | None:
        """The batch the device runs best at this input side (measured at warm-up), None: any size."""
        if self.config.micro_batch > 0:
            return self.config.micro_batch
        return self._micro.get(side)

    def measure_micro_batch(self, side: int, largest: int) -> int:
        """Time the base forward at batch sizes up to `largest` and keep the best images per second.

        The biggest batch is not always the fastest (MobileNetV2 at 224 px on a 2-core CPU ran 2.4x faster
        as sub-batches of about 6 than as one batch of 64); a smaller one is chosen only when it is clearly
        (10%) faster per image, so noise does not fragment batches."""
        sizes = sorted({min(largest, b) for b in (4, 8, 16, 32, 64, 128, 256) if b <= largest} | {largest})
        rate: dict[int, float] = {}
        x_full = torch.zeros(largest, 3, side, side, device=self.device, dtype=self.dtype)
        x_full = x_full.contiguous(memory_format=self.memory_format)
        with self._net_lock, torch.inference_mode():
            for b in sizes:
                x = x_full[:b]
                self.net.forward_base(x)  # the first call at a size pays one-off costs
                self._synchronise()
                start = time.perf_counter()
                self.net.forward_base(x)
                self._synchronise()
                rate[b] = b / max(time.perf_counter() - start, 1e-9)
        best = max(rate, key=lambda b: rate[b])
        chosen = best if rate[best] > 1.1 * rate[largest] else largest
        self._micro[side] = chosen
        return chosen

    def _synchronise(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward_single(self, x: Tensor, slot: int) -> Tensor:
        if self.config.merged_cache <= 0:
            return self.net.forward_slot(x, slot)
        with self._state_lock:
            if slot in self._merged:
                self._merged.move_to_end(slot)
            else:
                self._merged[slot] = None
                while len(self._merged) > self.config.merged_cache:
                    self.net.unmerge(self._merged.popitem(last=False)[0])
        return self.net.forward_merged(x, slot)

    def warm_up(self, largest_batch: int | None = None, domains: Sequence[str] | None = None) -> None:
        """One forward through each path so the first request pays no one-off costs, with two of `domains`
        (default: the store's); with `largest_batch` (and `micro_batch` 0) also measure the best
        micro-batch for each of their input sides."""
        with self._net_lock, torch.inference_mode():
            size = 32
            x = torch.zeros(2, 3, size, size, device=self.device, dtype=self.dtype)
            self.net.forward_base(x.contiguous(memory_format=self.memory_format))
        sides: set[int] = set()
        for domain in list(self.store.list_domains() if domains is None else domains)[:2]:
            try:
                key, manifest = self.resolve_with_manifest(domain)
            except VersionNotFound:
                continue
            side = manifest.preprocessing.input_size
            sides.add(side)
            self.infer_pixels([key, key], torch.zeros(2, side, side, 3, dtype=torch.uint8))
        if largest_batch is not None and self.config.micro_batch == 0:
            for side in sides:
                self.measure_micro_batch(side, largest_batch)
        self.warm = True

    # -- memory -----------------------------------------------------------------------------------
    def bank_bytes(self) -> int:
        """Bytes held by the adapter bank (all slots, empty or not)."""
        return self.net.bank_bytes()

    def merged_bytes(self) -> int:
        """Bytes held by merged (folded) weights: bounded by `merged_cache` domains."""
        return self.net.merged_bytes()

    def device_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return process_rss_bytes()


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
