"""The engine without HTTP: bank residency, single-flight loads, LRU and LFU eviction, version pinning,
batching."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

import server.residency
from adapters_store import LocalStore
from domain_format.preprocess import prepare
from model_artifacts import validate_domain
from server.batcher import Batcher
from server.engine import DomainKey, Engine, EngineConfig
from server.preprocess import preprocess
from tests.server.conftest import DOMAINS, TOL, TinyWorld, encode, image, make_store


def _x(name: str, seed: int) -> torch.Tensor:
    return preprocess(encode(image(seed)), DOMAINS[name][2], max_pixels=10**7)


def _ref(world: TinyWorld, name: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(world.net.forward_domain(x[None], name), dim=1)[0]


def test_mixed_batch_rows_equal_each_domain_alone(world: TinyWorld, store: LocalStore) -> None:
    engine = Engine(store, EngineConfig(bank_slots=4, merged_cache=2))
    names = ["birds", "digits", "textures", "birds", "digits"]
    keys = [engine.resolve(n) for n in names]
    xs = torch.stack([_x(n, i) for i, n in enumerate(names)])
    mixed = engine.infer(keys, xs, top_k=3)
    for i, (name, pred) in enumerate(zip(names, mixed, strict=True)):
        alone = engine.infer([keys[i]], xs[i : i + 1], top_k=3)[0]  # merged single-domain path
        ref = _ref(world, name, xs[i])
        assert [s.index for s in pred.top] == ref.topk(3).indices.tolist() == [s.index for s in alone.top]
        assert [s.probability for s in pred.top] == pytest.approx(ref.topk(3).values.tolist(), abs=TOL)
        assert [s.probability for s in alone.top] == pytest.approx(ref.topk(3).values.tolist(), abs=TOL)
    assert engine.merged_bytes() > 0


def test_lru_eviction_keeps_answers_right(world: TinyWorld, store: LocalStore) -> None:
    engine = Engine(store, EngineConfig(bank_slots=2, merged_cache=1, bank_eviction="lru"))
    order = ["birds", "digits", "textures", "birds", "textures", "digits"]
    for i, name in enumerate(order):
        x = _x(name, i)
        [pred] = engine.infer([engine.resolve(name)], x[None], top_k=1)
        assert pred.top[0].probability == pytest.approx(float(_ref(world, name, x).max()), abs=TOL)
        assert len(engine.resident()) <= 2
    assert engine.stats.loads == 6 - 1  # only the second "textures" found its domain resident
    assert engine.stats.evictions == engine.stats.loads - 2
    # one merged domain at most: a merged domain is a folded copy of the shared convs, never more
    shared = sum(v.numel() * v.element_size() for v in engine.net.shared_state_dict().values())
    assert 0 < engine.merged_bytes() <= shared


@pytest.mark.parametrize(("policy", "loads"), [("lru", 4), ("lfu", 3)])
def test_frequency_aware_eviction_keeps_a_hot_domain_through_cold_ones(
    world: TinyWorld, store: LocalStore, policy: str, loads: int
) -> None:
    """Two slots; birds asked for by three images, then one-off digits and textures, then birds again. LRU
    evicts birds for textures (the least recently used) and loads it again; LFU evicts digits (one
    request against three) and birds is still resident."""
    engine = Engine(store, EngineConfig(bank_slots=2, merged_cache=1, bank_eviction=policy))
    steps = [["birds"] * 3, ["digits"], ["textures"], ["birds"]]
    for i, names in enumerate(steps):
        keys = [engine.resolve(n) for n in names]
        xs = torch.stack([_x(n, 10 * i + j) for j, n in enumerate(names)])
        for name, x, pred in zip(names, xs, engine.infer(keys, xs, top_k=1), strict=True):
            assert pred.key.domain == name
            assert pred.top[0].probability == pytest.approx(float(_ref(world, name, x).max()), abs=TOL)
    assert engine.stats.loads == loads and engine.stats.evictions == loads - 2
    assert {k.domain for k in engine.resident()} == {"birds", "textures"}
    assert engine.stats.hits == (1 if policy == "lfu" else 0)


def test_a_miss_loads_once_however_many_wait(store: LocalStore) -> None:
    engine = Engine(store, EngineConfig(bank_slots=4))
    key = engine.resolve("birds")
    n = 8
    barrier = threading.Barrier(n)
    slots: list[int] = []

    def load() -> None:
        barrier.wait()
        slots.append(engine.load(key))

    threads = [threading.Thread(target=load) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(slots)) == 1 and engine.stats.loads == 1 and engine.stats.hits == n - 1


def test_single_flight_fetch_shares_one_store_read(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(store, EngineConfig(bank_slots=4))
    key = engine.resolve("digits")
    reads = 0
    inside_read, release = threading.Event(), threading.Event()
    waiting = threading.Semaphore(0)
    original = store.get

    def slow_get(domain: str, version: int | None = None):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        inside_read.set()
        release.wait()  # hold the read open until every other caller waits on it
        return original(domain, version)

    class CountingFuture(Future):  # type: ignore[type-arg]
        def result(self, timeout: float | None = None):  # type: ignore[no-untyped-def]
            waiting.release()
            return super().result(timeout)

    monkeypatch.setattr(store, "get", slow_get)
    monkeypatch.setattr(server.residency, "Future", CountingFuture)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(engine.residency.fetch(key))) for _ in range(5)]
    threads[0].start()
    inside_read.wait()
    for t in threads[1:]:
        t.start()
    for _ in threads[1:]:
        waiting.acquire()  # each of the four others is now waiting on the owner's read
    release.set()
    for t in threads:
        t.join()
    assert reads == 1 and len(results) == 5 and len({id(r) for r in results}) == 1


def test_a_resolved_key_keeps_its_version_after_activation(world: TinyWorld, tmp_path: Path) -> None:
    store = make_store(world, tmp_path / "s")
    engine = Engine(store, EngineConfig(bank_slots=4, revision_poll_s=0.0))
    old = engine.resolve("birds")
    art = world.artifacts["birds_v2"]
    store.put(validate_domain(art.manifest, art.tensors, world.net), activate=True)
    new = engine.resolve("birds")
    assert (old, new) == (DomainKey("birds", 1), DomainKey("birds", 2))
    x = _x("birds", 3)
    p_old, p_new = engine.infer([old, new], torch.stack([x, x]), top_k=3)
    assert p_old.key == old and p_new.key == new
    assert [s.probability for s in p_old.top] == pytest.approx(
        _ref(world, "birds", x).topk(3).values.tolist(), abs=TOL
    )
    assert [s.probability for s in p_new.top] == pytest.approx(
        _ref(world, "birds_v2", x).topk(3).values.tolist(), abs=TOL
    )


def test_batcher_mixes_domains_and_answers_each_request(world: TinyWorld, store: LocalStore) -> None:
    engine = Engine(store, EngineConfig(bank_slots=2))
    sizes: list[int] = []

    class Events:
        def batch_run(self, size: int, domains: int, seconds: float) -> None:
            sizes.append(size)

        def queue_wait(self, seconds: float) -> None: ...
        def queue_depth(self, images: int) -> None: ...

    batcher = Batcher(
        engine, max_domains_per_batch=2, max_batch_size=4, max_wait_ms=50, max_queue=64, events=Events()
    )  # type: ignore[arg-type]
    names = ["birds", "digits", "textures"] * 4
    xs = [_x(n, i) for i, n in enumerate(names)]
    # uint8, as front ends send them (grayscale domains: one channel, batched apart by shape)
    pixels = [
        prepare(encode(image(i)), DOMAINS[n][2].image_spec(), max_pixels=10**7) for i, n in enumerate(names)
    ]
    futures = [batcher.submit(engine.resolve(n), [p], top_k=1)[0] for n, p in zip(names, pixels, strict=True)]
    batcher.start()  # everything is queued before the worker starts: batches fill up
    try:
        preds = [f.result(timeout=60) for f in futures]
    finally:
        batcher.stop()
    for name, x, pred in zip(names, xs, preds, strict=True):
        assert pred.key.domain == name
        assert pred.top[0].probability == pytest.approx(float(_ref(world, name, x).max()), abs=TOL)
    assert sum(sizes) == 12 and max(sizes) == 4
    # at most two domain versions per batch (the bank's slots), so no batch holds all three
    assert len(sizes) >= 3


def test_prefetch_reads_ahead_and_the_load_uses_it(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(store, EngineConfig(bank_slots=2))
    key = engine.resolve("textures")
    engine.prefetch(key)
    engine.prefetch(key)  # already staged: no second read

    def no_reads(*_: object, **__: object) -> None:
        raise AssertionError("the load must use the prefetched artifact")

    monkeypatch.setattr(store, "get", no_reads)
    assert engine.load(key) in (0, 1)
    assert engine.stats.loads == 1 and engine.residency._staged == {}
    engine.prefetch(key)  # resident: nothing to do, nothing read


def test_batches_split_into_micro_batches_give_the_same_answers(world: TinyWorld, store: LocalStore) -> None:
    whole = Engine(store, EngineConfig(bank_slots=4))
    split = Engine(store, EngineConfig(bank_slots=4, micro_batch=2))
    names = ["birds", "digits", "textures", "birds", "digits"]
    crops = [
        prepare(encode(image(i)), DOMAINS[n][2].image_spec(), max_pixels=10**7) for i, n in enumerate(names)
    ]
    # one batch holds 3-channel rows: a grayscale crop is sent as its channel three times (what the
    # front ends put in shared memory)
    pixels = torch.from_numpy(np.stack([np.broadcast_to(c, (*c.shape[:2], 3)) for c in crops]))
    for batch in (names, ["birds"] * 5):  # the mixed and the merged single-domain paths
        a = whole.infer_pixels([whole.resolve(n) for n in batch], pixels, top_k=3)
        b = split.infer_pixels([split.resolve(n) for n in batch], pixels, top_k=3)
        for pa, pb in zip(a, b, strict=True):
            assert [s.index for s in pa.top] == [s.index for s in pb.top]
            assert [s.probability for s in pa.top] == pytest.approx([s.probability for s in pb.top], abs=TOL)
    measured = whole.measure_micro_batch(24, largest=8)
    assert measured in (4, 8) and whole.micro_batch(24) == measured and whole.micro_batch(32) is None


def test_the_next_batch_is_staged_while_the_current_one_runs(store: LocalStore) -> None:
    """A saturated engine must not idle between batches: while one runs, the next is formed and staged
    (stacked, normalised) once the running one is expected to end, not only after it has ended."""
    running, release, staged_meanwhile = threading.Event(), threading.Event(), threading.Event()

    class HeldEngine(Engine):
        batches = 0

        def infer(self, keys, images, top_k=5):  # type: ignore[no-untyped-def]
            self.batches += 1
            if self.batches == 1:
                running.set()
                release.wait(60)  # the first batch runs until the test lets it end
            return super().infer(keys, images, top_k)

        def network_input(self, keys, pixels):  # type: ignore[no-untyped-def]
            if running.is_set() and not release.is_set():
                staged_meanwhile.set()
            return super().network_input(keys, pixels)

    engine = HeldEngine(store, EngineConfig(bank_slots=2))
    # one stream: its only runner is busy, so the next batch is staged ahead (tests/server/
    # test_engine_streams.py holds every runner of two)
    batcher = Batcher(engine, max_domains_per_batch=2, max_batch_size=8, max_wait_ms=1, streams=1)
    pixels = prepare(encode(image(3)), DOMAINS["birds"][2].image_spec(), max_pixels=10**7)
    key = engine.resolve("birds")
    batcher.start()
    try:
        [first] = batcher.submit(key, [pixels])
        assert running.wait(60)
        [second] = batcher.submit(key, [pixels])  # a partial batch, queued while the first runs
        staged = staged_meanwhile.wait(30)
        release.set()
        assert first.result(timeout=60).key == key and second.result(timeout=60).key == key
    finally:
        release.set()
        batcher.stop()
    assert staged, "the second batch was staged only after the first had ended"


def test_a_runner_freed_early_takes_the_queue_without_a_wait_window(store: LocalStore) -> None:
    """The next batch is staged just before the running one is expected to end; when it ends earlier, what
    is queued runs at once (staging ahead would have taken just that), not after `max_wait_ms`."""
    running, release = threading.Event(), threading.Event()

    class HeldEngine(Engine):
        def infer(self, keys, images, top_k=5):  # type: ignore[no-untyped-def]
            if not running.is_set():
                running.set()
                release.wait(60)  # the first batch runs until the test lets it end
            return super().infer(keys, images, top_k)

    engine = HeldEngine(store, EngineConfig(bank_slots=2))
    # a ten-minute window: waiting through it would fail the result's timeout below
    batcher = Batcher(engine, max_domains_per_batch=2, max_batch_size=2, max_wait_ms=600_000, streams=1)
    pixels = prepare(encode(image(3)), DOMAINS["birds"][2].image_spec(), max_pixels=10**7)
    key = engine.resolve("birds")
    with batcher._cond:  # batches are expected to take an hour per image: the first ends "early"
        batcher._seconds_per_image = 3600.0
    batcher.start()
    try:
        first = batcher.submit(key, [pixels, pixels])  # a full batch: it runs at once
        assert running.wait(60)
        [second] = batcher.submit(key, [pixels])  # queued while the first runs, long before its end
        release.set()
        assert all(f.result(timeout=60).key == key for f in first)
        assert second.result(timeout=60).key == key
    finally:
        release.set()
        batcher.stop()


def test_a_bank_forward_leaves_every_units_input_as_it_was(store: LocalStore) -> None:
    """Units write their folded BN over their own conv's fresh output; one without a conv (ResNet-26's
    end_bn) must not write over its input, which belongs to the layer before it."""
    engine = Engine(store, EngineConfig(bank_slots=2, merged_cache=0))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        unit.register_forward_pre_hook(lambda _, args: seen.append((args[0], args[0].clone())))
        for unit in engine.net.units
    ]
    keys = [engine.resolve("birds"), engine.resolve("digits")]
    spec = DOMAINS["birds"][2].image_spec()
    pixels = np.stack([prepare(encode(image(seed)), spec, max_pixels=10**7) for seed in (1, 2)])
    try:
        engine.infer_pixels(keys, torch.from_numpy(pixels))  # a mixed batch: the bank's path
    finally:
        for hook in hooks:
            hook.remove()
    assert any(unit.conv is None for unit in engine.net.units)
    assert len(seen) == len(engine.net.units)
    assert all(torch.equal(x, before) for x, before in seen)
