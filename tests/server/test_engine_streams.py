"""Engine streams: forwards running at once on one bank, and bank changes while they run.

A forward is held in the middle of the network (a pre-hook on a middle unit, per thread) so the tests
know it is running while they act; nothing waits on time. Outputs of concurrent forwards are compared
bit for bit with the same batches run alone: every run is one stream thread with the engine's per-stream
intra-op thread count (one here), the same single-thread arithmetic on the same shapes, so any
difference would be a forward reading another's slot or a slot changed under it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from adapters_store import DomainNotFound, LocalStore
from domain_format.preprocess import prepare
from server.batcher import Batcher
from server.engine import DomainKey, Engine, EngineConfig, Prediction
from server.preprocess import preprocess
from tests.server.conftest import DOMAINS, encode, image

WAIT = 60.0
"""Seconds after which a test fails instead of hanging (never a synchronisation)."""


def _x(name: str, seed: int) -> torch.Tensor:
    return preprocess(encode(image(seed)), DOMAINS[name][2], max_pixels=10**7)


def _batch(names: list[str], seed: int) -> torch.Tensor:
    return torch.stack([_x(n, seed + i) for i, n in enumerate(names)])


def _answers(preds: list[Prediction]) -> list[tuple[DomainKey, list[tuple[int, float]]]]:
    return [(p.key, [(s.index, s.probability) for s in p.top]) for p in preds]


class Gates:
    """Per-thread hold points in the middle of the network: a thread that armed a gate runs it once,
    when its forward reaches the middle unit."""

    def __init__(self, engine: Engine) -> None:
        self._local = threading.local()
        units = engine.net.units
        self._handle = units[len(units) // 2].register_forward_pre_hook(self._hook)

    def arm(self, gate: Callable[[], None]) -> None:
        self._local.gate = gate

    def _hook(self, module: Any, args: Any) -> None:
        gate = getattr(self._local, "gate", None)
        if gate is not None:
            self._local.gate = None
            gate()

    def close(self) -> None:
        self._handle.remove()


@contextmanager
def gates(engine: Engine) -> Iterator[Gates]:
    g = Gates(engine)
    try:
        yield g
    finally:
        g.close()


class Stream(threading.Thread):
    """One engine stream: `enter_stream`, then `work` (optionally with a gate armed), keeping its result."""

    def __init__(self, engine: Engine, work: Callable[[], Any], gates: Gates | None = None,
                 gate: Callable[[], None] | None = None) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.engine, self.work, self.gates, self.gate = engine, work, gates, gate
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        self.engine.enter_stream()
        if self.gates is not None and self.gate is not None:
            self.gates.arm(self.gate)
        try:
            self.result = self.work()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def outcome(self) -> Any:
        self.join(WAIT)
        assert self.done.is_set(), "the stream did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _alone(engine: Engine, work: Callable[[], Any]) -> Any:
    stream = Stream(engine, work)
    stream.start()
    return stream.outcome()


CASES = {
    "different domains, merged": (["birds"] * 3, ["digits"] * 4, 2),
    "same domain, merged": (["birds"] * 3, ["birds"] * 5, 2),
    "same domain, bank slot": (["textures"] * 3, ["textures"] * 2, 0),
    "mixed batches": (["birds", "digits", "textures", "birds"], ["textures", "birds", "digits"], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_concurrent_forwards_give_the_answers_each_gives_alone(store: LocalStore, case: str) -> None:
    names_a, names_b, merged_cache = CASES[case]
    engine = Engine(store, EngineConfig(bank_slots=4, merged_cache=merged_cache, engine_streams=2))
    keys_a, keys_b = [engine.resolve(n) for n in names_a], [engine.resolve(n) for n in names_b]
    xa, xb = _batch(names_a, 0), _batch(names_b, 10)
    run_a = lambda: _answers(engine.infer(keys_a, xa, top_k=3))  # noqa: E731
    run_b = lambda: _answers(engine.infer(keys_b, xb, top_k=3))  # noqa: E731
    alone_a, alone_b = _alone(engine, run_a), _alone(engine, run_b)
    both_inside = threading.Barrier(2, timeout=WAIT)  # each waits in the middle until both are there
    with gates(engine) as g:
        streams = [Stream(engine, run, g, both_inside.wait) for run in (run_a, run_b)]
        for s in streams:
            s.start()
        together_a, together_b = (s.outcome() for s in streams)
    assert together_a == alone_a and together_b == alone_b


def _held(
    engine: Engine, g: Gates, keys: list[DomainKey], x: torch.Tensor
) -> tuple[Stream, threading.Event, threading.Event]:
    """A stream running `keys` that stops in the middle of its forward until `release` is set."""
    inside, release = threading.Event(), threading.Event()

    def gate() -> None:
        inside.set()
        assert release.wait(WAIT)

    stream = Stream(engine, lambda: _answers(engine.infer(keys, x, top_k=3)), g, gate)
    stream.start()
    assert inside.wait(WAIT), "the held forward never started"
    return stream, inside, release


class WatchedCondition(threading.Condition):
    """The engine's bank lock, telling the test when a bank change starts waiting for a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_a_load_waits_while_every_slot_it_could_take_is_pinned(store: LocalStore) -> None:
    engine = Engine(store, EngineConfig(bank_slots=2, merged_cache=0, engine_streams=2))
    lock = engine._bank_lock = WatchedCondition()
    birds, digits, textures = (engine.resolve(n) for n in ("birds", "digits", "textures"))
    keys = [birds, digits, birds]
    x = _batch(["birds", "digits", "birds"], 0)
    alone = _alone(engine, lambda: _answers(engine.infer(keys, x, top_k=3)))
    assert sorted(engine.resident()) == sorted([birds, digits])  # the bank is full, both pinned below
    with gates(engine) as g:
        held, _, release = _held(engine, g, keys, x)
        loading = Stream(engine, lambda: engine.load(textures))
        loading.start()
        settled = lock.waiting.wait(WAIT) or loading.done.is_set()
        assert settled and not loading.done.is_set(), "the load took a slot a running forward uses"
        assert sorted(engine.resident()) == sorted([birds, digits])
        release.set()
        assert held.outcome() == alone  # its slots never changed under it
        slot = loading.outcome()
    assert textures in engine.resident() and len(engine.resident()) == 2
    assert slot in (0, 1)


def test_a_load_next_to_a_running_forward_takes_an_unpinned_slot(store: LocalStore) -> None:
    config = EngineConfig(bank_slots=2, merged_cache=2, engine_streams=2, bank_eviction="lru")
    engine = Engine(store, config)
    birds, digits, textures = (engine.resolve(n) for n in ("birds", "digits", "textures"))
    x = _batch(["birds"] * 3, 0)
    alone = _alone(engine, lambda: _answers(engine.infer([birds] * 3, x, top_k=3)))  # merged path
    birds_slot, digits_slot = engine.load(birds), engine.load(digits)
    with gates(engine) as g:
        held, _, release = _held(engine, g, [birds] * 3, x)
        try:
            engine.load(digits)  # used last: without the pin, birds would be the victim
            assert engine.load(textures) == digits_slot  # the one victim not in use: no waiting
            assert sorted(engine.resident()) == sorted([birds, textures])
        finally:
            release.set()
        assert held.outcome() == alone
    assert engine.load(birds) == birds_slot


def test_deleting_a_domain_while_its_forward_runs(store: LocalStore) -> None:
    """The delete returns at once; the running forward finishes on its slot, which nothing else can take
    until it ends; then the slot is cleared, and the domain cannot come back."""
    engine = Engine(store, EngineConfig(bank_slots=2, merged_cache=0, engine_streams=2))
    birds, digits, textures = (engine.resolve(n) for n in ("birds", "digits", "textures"))
    x = _batch(["birds"] * 2, 0)
    alone = _alone(engine, lambda: _answers(engine.infer([birds] * 2, x, top_k=3)))
    birds_slot = engine.load(birds)
    with gates(engine) as g:
        held, _, release = _held(engine, g, [birds] * 2, x)
        try:
            store.delete_domain("birds")
            assert engine.evict("birds") == 1
            assert birds not in engine.resident()
            digits_slot = engine.load(digits)
            assert digits_slot != birds_slot  # the deleted domain's slot is still in use
            assert engine.net.slots[birds_slot] is not None
        finally:
            release.set()
        assert held.outcome() == alone  # answered, by the version it started with
    assert engine.net.slots[birds_slot] is None  # cleared once its forward ended
    assert engine.load(textures) == birds_slot
    with pytest.raises(DomainNotFound):
        engine.resolve("birds")


def test_the_batcher_runs_a_batch_while_another_stream_is_busy(store: LocalStore) -> None:
    """Two streams: a batch queued while the first one's forward is held still runs and is answered."""
    engine = Engine(store, EngineConfig(bank_slots=4, engine_streams=2))
    batcher = Batcher(engine, max_domains_per_batch=2, max_batch_size=8, max_wait_ms=1)
    assert batcher.streams == 2
    birds, digits = engine.resolve("birds"), engine.resolve("digits")
    spec = DOMAINS["birds"][2].image_spec()
    pixels = prepare(encode(image(3)), spec, max_pixels=10**7)
    inside, release = threading.Event(), threading.Event()
    first_thread: list[threading.Thread] = []

    def hold() -> None:
        if not first_thread:
            first_thread.append(threading.current_thread())
            inside.set()
            assert release.wait(WAIT)

    units = engine.net.units
    handle = units[len(units) // 2].register_forward_pre_hook(lambda m, a: hold())
    batcher.start()
    try:
        [first] = batcher.submit(birds, [pixels])
        assert inside.wait(WAIT)
        [second] = batcher.submit(digits, [pixels])
        assert second.result(timeout=WAIT).key == digits  # while the first is still held
        assert not first.done()
        release.set()
        assert first.result(timeout=WAIT).key == birds
    finally:
        release.set()
        handle.remove()
        batcher.stop()


def test_with_every_stream_busy_the_next_batch_is_staged_ahead(store: LocalStore) -> None:
    """Two streams, both held in a forward: the third batch is formed and staged (normalised) meanwhile,
    so the first runner to free up starts it at once."""
    engine = Engine(store, EngineConfig(bank_slots=4, engine_streams=2))
    batcher = Batcher(engine, max_domains_per_batch=2, max_batch_size=8, max_wait_ms=1)
    birds, digits = engine.resolve("birds"), engine.resolve("digits")
    pixels = prepare(encode(image(4)), DOMAINS["birds"][2].image_spec(), max_pixels=10**7)
    entered = threading.Semaphore(0)  # released by each held forward
    release = threading.Event()
    held: set[threading.Thread] = set()
    staged_meanwhile = threading.Event()

    def hold() -> None:
        if len(held) < 2 and threading.current_thread() not in held:
            held.add(threading.current_thread())
            entered.release()
            assert release.wait(WAIT)

    real_input = engine.network_input

    def watched_input(keys: list[DomainKey], pixels: torch.Tensor) -> torch.Tensor:
        if len(held) == 2 and not release.is_set():
            staged_meanwhile.set()
        return real_input(keys, pixels)

    engine.network_input = watched_input  # type: ignore[method-assign]
    units = engine.net.units
    handle = units[len(units) // 2].register_forward_pre_hook(lambda m, a: hold())
    batcher.start()
    try:
        first = batcher.submit(birds, [pixels])
        assert entered.acquire(timeout=WAIT)
        second = batcher.submit(digits, [pixels])  # the second runner takes it while the first is held
        assert entered.acquire(timeout=WAIT)
        third = batcher.submit(birds, [pixels])
        staged = staged_meanwhile.wait(WAIT)
        release.set()
        assert [f.result(timeout=WAIT).key for f in first + second + third] == [birds, digits, birds]
    finally:
        release.set()
        handle.remove()
        batcher.stop()
    assert staged, "the third batch was staged only after a runner had freed up"
