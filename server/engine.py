"""The inference engine: one device-resident backbone, an adapter bank of resident domains.

    engine = Engine(LocalStore("store"), EngineConfig(bank_slots=16))
    engine.warm_up()
    key = engine.resolve("birds")                 # the active version, as a (domain, version) key
    x = preprocess(data, engine.manifest(key).preprocessing, max_pixels=10**7)  # server.preprocess
    [pred] = engine.infer([key], x[None], top_k=5)

Free of HTTP types: the server, the benchmarks and the reliability suite all drive it directly.

The engine's parts, each the one owner of its facts:
- `server.versions.ActiveVersions`: which version serves each domain (cached until the store changes);
- `server.residency.Residency`: which version is in which bank slot (`server.eviction` picks who
  leaves), single-flight store reads, prefetched artifacts, the merged-weight LRU, and domains deleted
  meanwhile never loaded;
- the network (`residual_adapters.MultiDomainNet`): the bank's tensors, merged weights and the padding
  of narrower heads (-inf logits);
- this module: the backbone, the forward (merged path for a single-domain batch, the bank's mixed path
  otherwise, split into the measured micro-batch), the answers (top-k, non-finite rows refused) and the
  trial of an uploaded artifact in a scratch slot.

Streams: on the CPU the engine runs `streams` forwards at once (`engine_streams`; default one per core
the engine may use, each forward then on one intra-op thread), since independent single-thread forwards
have no per-op barrier: a core taken by a front end pauses one stream, not all of them. A CUDA device
queue serialises kernels anyway, so there it runs one. `Batcher` runs one runner thread per stream.
Split forwards (`forward_split`, CPU): each forward's batch is cut into parts run at once on threads of
their own, each on its share of the stream's intra-op threads; the parts wait for each other once, at
the end of the batch, instead of at every op's barrier.

Thread safety: residency changes (`ensure`, `load`, `evict`, `trial`) hold the bank lock; a forward
runs outside it, on the slots it pinned under it. A pinned slot (a count per slot: every forward running
on it) is never evicted or overwritten: a load that finds only pinned victims waits for a forward to end;
a deleted domain's pinned slots leave the residency table at once (nothing new can use them) and are
cleared when their last forward ends. Store reads can happen outside the lock: `prefetch` (called by the
server from its decode threads) reads and parses a cold domain's artifact while the runners run other
batches, so a runner only copies it in.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors  # safetensors only: never pickle
from torch import Tensor

from adapters_store.errors import ArtifactInvalid, Problem, VersionNotFound
from adapters_store.manifest import DomainManifest
from adapters_store.store import AdapterStore
from adapters_store.validation import DomainSpec
from model_artifacts import BackboneRefused, adapter_config, backbone_network, spec_for
from residual_adapters import DomainMismatch, MultiDomainNet
from residual_adapters.inputs import normalise
from server.engine_config import EngineConfig
from server.errors import EngineError, NonFiniteOutput
from server.residency import EngineEvents, EngineStats, Residency, SlotsPinned
from server.versions import ActiveVersions, DomainKey

__all__ = [
    "DomainKey",
    "Engine",
    "EngineConfig",
    "EngineEvents",
    "EngineStats",
    "LabelScore",
    "Prediction",
    "pick_device",
    "process_rss_bytes",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        self.device = pick_device(self.config.device)
        on_cuda = self.device.type == "cuda"
        self.dtype = _DTYPES[self.config.dtype] if on_cuda else torch.float32
        self.memory_format = torch.channels_last if self.config.channels_last else torch.contiguous_format
        self.net, self.backbone_name = self._load_backbone()
        self.fingerprint = self.net.fingerprint()
        # One slot more than the residency uses: the scratch slot an upload is tried in.
        self.net.enable_bank(self.config.bank_slots + 1)
        self._scratch = self.config.bank_slots

        self._bank_lock = threading.Condition()
        """Held for every bank change; notified when a forward unpins its slots."""
        self._pins: Counter[int] = Counter()
        """Slot -> forwards running on it now (guarded by `_bank_lock`): never evicted or overwritten."""
        self.streams, self.stream_threads = _streams(self.device, self.config.engine_streams)
        """Forwards run at once, and the intra-op threads each runs with (`enter_stream`)."""
        self._parts = _ForwardParts.for_engine(self.device, self.streams, self.stream_threads, self.config)
        """None, or the threads a forward's parts run on at once (`forward_split`)."""
        self.versions = ActiveVersions(store, self.config.revision_poll_s)
        self.residency = Residency(
            store, self.net, slots=self.config.bank_slots, merged_cache=self.config.merged_cache,
            verify_checksums=self.config.verify_checksums, events=self.events,
            eviction=self.config.bank_eviction, pinned=self._pins,
        )  # fmt: skip
        self.stats: EngineStats = self.residency.stats
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

    # -- which version serves a domain (server.versions) -------------------------------------------
    def notice_store_change(self) -> None:
        """Forget cached active versions (after this process wrote to the store)."""
        self.versions.notice_store_change()

    def resolve(self, domain: str) -> DomainKey:
        """The key of the domain's active version; raises the store's DomainNotFound/VersionNotFound."""
        return self.versions.resolve(domain)[0]

    def resolve_with_manifest(self, domain: str) -> tuple[DomainKey, DomainManifest]:
        return self.versions.resolve(domain)

    def cached_active(self, domain: str) -> tuple[DomainKey, DomainManifest] | None:
        """`resolve_with_manifest` when it needs no store read, else None (for an event loop)."""
        return self.versions.cached(domain)

    def cached_manifest(self, key: DomainKey) -> DomainManifest | None:
        """`manifest(key)` when it is resident or active (no store read), else None."""
        resident = self.residency.manifest(key)
        if resident is not None:
            return resident
        active = self.versions.cached(key.domain)
        return active[1] if active is not None and active[0] == key else None

    def manifest(self, key: DomainKey) -> DomainManifest:
        cached = self.cached_manifest(key)
        return cached if cached is not None else self.store.get(key.domain, key.version).manifest

    # -- residency (server.residency) -------------------------------------------------------------
    def resident(self) -> list[DomainKey]:
        return self.residency.resident()

    def is_resident(self, domain: str) -> bool:
        return any(k.domain == domain for k in self.residency.resident())

    def prefetch(self, key: DomainKey) -> None:
        """Read a non-resident domain from the store ahead of its batch (no-op when resident or staged)."""
        self.residency.prefetch(key)

    def load(self, key: DomainKey) -> int:
        """Make `key` resident (a no-op when it is) and return its slot."""
        # Every bank change runs in inference mode: the bank's tensors are made by forwards and loads
        # in it, and torch refuses in-place changes to such tensors outside it.
        with self._bank_lock, torch.inference_mode():
            return self._ensure([key])[key]

    def _ensure(self, keys: Sequence[DomainKey]) -> dict[DomainKey, int]:
        """`Residency.ensure`, waiting for a forward to unpin a slot while every victim is pinned (the bank
        lock held; released while waiting)."""
        while True:
            try:
                return self.residency.ensure(keys)
            except SlotsPinned:
                self._bank_lock.wait()

    @contextmanager
    def _pinned(self, slots: Sequence[int]) -> Iterator[None]:
        """Pin `slots` for one forward (the bank lock held on entry, released inside the block): no bank
        change touches them until it ends; a slot dropped meanwhile is cleared when its last pin goes."""
        self._pins.update(slots)
        self._bank_lock.release()
        try:
            yield
        finally:
            self._bank_lock.acquire()
            self._pins.subtract(slots)
            for slot in slots:
                if self._pins[slot] <= 0:
                    del self._pins[slot]
                    self.residency.unpinned(slot)
            self._bank_lock.notify_all()

    def evict(self, domain: str, version: int | None = None) -> int:
        """Drop a deleted domain's versions (all, or one): out of the bank, and never loaded again from
        a read begun before now; returns how many slots were freed."""
        with self._bank_lock, torch.inference_mode():
            freed = self.residency.drop(domain, version)
        self.versions.forget(domain)
        return freed

    # -- trying an upload -------------------------------------------------------------------------
    def trial(self, manifest: DomainManifest, tensors: dict[str, Tensor]) -> None:
        """Load an artifact into the scratch slot and run a probe batch through the bank's path and the
        merged one; `ArtifactInvalid` unless it loads and every logit is finite (finite weights can still
        overflow: BN scales of 1e4 over sqrt(1e-5), layer after layer). Holds the bank lock for one
        probe forward per path (and the merge) in the scratch slot, which no other forward uses."""
        config = adapter_config(manifest.adapter)
        pre = manifest.preprocessing
        side = pre.input_size
        g = torch.Generator().manual_seed(0)
        probe = torch.stack(
            [
                torch.full((side, side, 3), 128, dtype=torch.uint8),
                torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8),
            ]
        ).to(self.device)
        x = normalise(probe, pre.mean, pre.std, layout="nhwc").to(self.dtype)
        x = x.contiguous(memory_format=self.memory_format)
        problem: str | None = None
        with self._bank_lock, torch.inference_mode():
            try:
                self.net.bank_load(self._scratch, config, tensors)
            except (DomainMismatch, ValueError, KeyError, RuntimeError) as exc:
                raise ArtifactInvalid(
                    [Problem("tensors", f"the bank cannot load it: {exc}", "load")]
                ) from None
            try:
                for path, forward in (("bank", self.net.forward_slot), ("merged", self.net.forward_merged)):
                    if not bool(torch.isfinite(forward(x, self._scratch)).all()):
                        problem = f"a probe batch gives non-finite logits on the {path} path"
                        break
            finally:
                self.net.bank_clear(self._scratch)
        if problem is not None:
            raise ArtifactInvalid([Problem("tensors", f"the artifact cannot be served: {problem}", "trial")])

    # -- inference --------------------------------------------------------------------------------
    def infer(
        self, keys: Sequence[DomainKey], images: Tensor, top_k: int | Sequence[int] = 5
    ) -> list[Prediction]:
        """Classify a batch: row i with domain version keys[i]. Images are preprocessed [B, 3, S, S]."""
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} keys for {images.shape[0]} images")
        return self._infer(keys, lambda: images.to(self.device, self.dtype, non_blocking=True), top_k)

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
        host = pixels.pin_memory() if self.device.type == "cuda" and pixels.device.type == "cpu" else pixels
        on_device = host.to(self.device, non_blocking=True)
        pre = {key: self.manifest(key).preprocessing for key in set(keys)}
        # the one normalisation, each row with its own domain's mean and std, in one pass: a handful of ops
        # per batch instead of a gather and a scatter per domain (staging ran ~5 ms per batch that way on
        # 2 cores, time the next batch's runner could wait for)
        mean = [pre[key].mean for key in keys]
        std = [pre[key].std for key in keys]
        return normalise(on_device, mean, std, layout="nhwc").to(self.dtype)

    def _infer(
        self, keys: Sequence[DomainKey], prepare: Callable[[], Tensor], top_k: int | Sequence[int]
    ) -> list[Prediction]:
        ks = [top_k] * len(keys) if isinstance(top_k, int) else list(top_k)
        with torch.inference_mode():
            x = prepare().contiguous(memory_format=self.memory_format)
            self._bank_lock.acquire()
            try:
                slots = self._ensure(keys)
                manifests = {k: self.manifest(k) for k in slots}  # resident now: no store read
                merged = len(slots) == 1 and self.residency.use_merged(slots[keys[0]])
                with self._pinned(list(slots.values())):  # the forward runs outside the lock
                    logits = self._forward(keys, slots, x, merged)
            finally:
                self._bank_lock.release()
            probs = torch.softmax(logits.float(), dim=1)
            # Ranked by logit, not probability: a saturated softmax gives real classes exactly 0 too, and
            # they must not tie with the padding of narrower heads (the network's -inf logits).
            k_max = min(max(ks), probs.shape[1])
            ranked = logits.float().topk(k_max, dim=1).indices
            values = probs.gather(1, ranked)
            finite = torch.isfinite(probs).all(dim=1)
        values_l, indices_l, finite_l = values.cpu().tolist(), ranked.cpu().tolist(), finite.cpu().tolist()
        out: list[Prediction | None] = []
        for row, key in enumerate(keys):
            if not finite_l[row]:
                out.append(None)
                continue
            labels = manifests[key].labels
            ranks = [(i, p) for i, p in zip(indices_l[row], values_l[row], strict=True) if i < len(labels)]
            out.append(Prediction(key, [LabelScore(i, labels[i], p) for i, p in ranks[: ks[row]]]))
        if any(p is None for p in out):
            bad = sorted({f"{k.domain} v{k.version}" for k, p in zip(keys, out, strict=True) if p is None})
            raise NonFiniteOutput(
                f"the network's output for {', '.join(bad)} is not finite (NaN or infinite logits)", out
            )
        return out  # type: ignore[return-value]

    def _forward(
        self, keys: Sequence[DomainKey], slots: dict[DomainKey, int], x: Tensor, merged: bool
    ) -> Tensor:
        """Logits of a batch whose slots are pinned, in micro-batches: one domain on its merged weights
        (`merged`: the residency keeps them) or its bank slot, several through the bank."""
        step = self.micro_batch(x.shape[-1]) or x.shape[0]
        index = torch.tensor([slots[k] for k in keys], device=self.device)
        if len(slots) == 1:
            slot = slots[keys[0]]
            forward = self.net.forward_merged if merged else self.net.forward_slot

            def run(part: Tensor, rows: Tensor) -> list[Tensor]:
                return [forward(c, slot) for c in part.split(step)]
        else:

            def run(part: Tensor, rows: Tensor) -> list[Tensor]:
                return [self.net(c, i) for c, i in zip(part.split(step), rows.split(step), strict=True)]

        if self._parts is None:
            chunks = run(x, index)
        else:
            chunks = self._parts.run(run, x, index)
        if len(chunks) == 1:
            return chunks[0]
        # A mixed batch's logits are padded to the widest head resident at the time: another stream's
        # load or drop between two micro-batches can change it (never below this batch's own heads).
        width = max(c.shape[1] for c in chunks)
        return torch.cat(
            [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=float("-inf")) for c in chunks]
        )

    def enter_stream(self) -> None:
        """Called once by each runner thread before its first forward: its intra-op thread count."""
        if self.device.type == "cpu":
            torch.set_num_threads(self.stream_threads)

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
        with torch.inference_mode():  # the plain backbone: no bank slot, nothing to lock
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

    def warm_up(self, largest_batch: int | None = None, domains: Sequence[str] | None = None) -> None:
        """One forward through each path so the first request pays no one-off costs, with two of `domains`
        (default: the store's); with `largest_batch` (and `micro_batch` 0) also measure the best
        micro-batch for each of their input sides."""
        with torch.inference_mode():
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


class _ForwardParts:
    """A forward split along the batch into `count` parts run at once (`forward_split`), each on `threads`
    intra-op threads: the first on the caller's thread, part i on the i-th thread of a set of its own,
    one set per stream (taken for the forward), so two parts never share a thread and run in turn.

    torch keeps its thread count per thread, and also as a process default that threads starting later
    adopt; setting a count sets both. So the parts' threads are all started here and the default put
    back; the caller's count is set for its part and put back after it."""

    def __init__(self, count: int, sets: int, threads: int) -> None:
        default = torch.get_num_threads()
        self.count, self.threads = count, threads
        self._sets: queue.SimpleQueue[list[ThreadPoolExecutor]] = queue.SimpleQueue()
        for s in range(sets):
            helpers = [
                ThreadPoolExecutor(
                    1, f"forward-part-{s}.{i}", initializer=torch.set_num_threads, initargs=(threads,)
                )
                for i in range(1, count)
            ]
            wait([h.submit(lambda: None) for h in helpers])  # each thread started, its count set
            self._sets.put(helpers)
        torch.set_num_threads(default)

    @classmethod
    def for_engine(
        cls, device: torch.device, streams: int, stream_threads: int, config: EngineConfig
    ) -> _ForwardParts | None:
        split = min(config.forward_split, stream_threads)  # at least one intra-op thread per part
        if device.type != "cpu" or split < 2:
            return None
        return cls(split, streams, stream_threads // split)

    def run(self, run: Callable[[Tensor, Tensor], list[Tensor]], x: Tensor, index: Tensor) -> list[Tensor]:
        """`run`'s chunks of every part, in row order."""

        def part(xs: Tensor, rows: Tensor) -> list[Tensor]:
            with torch.inference_mode():  # per thread: the caller's does not carry over to the helpers
                return run(xs, rows)

        pieces = [
            (xs, rows)
            for xs, rows in zip(x.tensor_split(self.count), index.tensor_split(self.count), strict=True)
            if len(xs)
        ]
        helpers = self._sets.get()  # one set per stream: one is free for every forward running
        try:
            others = [h.submit(part, xs, rows) for h, (xs, rows) in zip(helpers, pieces[1:], strict=False)]
            caller_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                first = part(*pieces[0])
            finally:
                torch.set_num_threads(caller_threads)
                # every part ended before any error leaves: the caller unpins the slots they read
                wait(others)
        finally:
            self._sets.put(helpers)
        return first + [chunk for future in others for chunk in future.result()]


def _streams(device: torch.device, configured: int) -> tuple[int, int]:
    """(forwards run at once, intra-op threads of each): `configured` streams (0: one per core torch may
    use on the CPU, one on CUDA), sharing torch's threads between them."""
    threads = torch.get_num_threads()
    streams = configured or (threads if device.type == "cpu" else 1)
    return streams, max(1, threads // streams)


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
