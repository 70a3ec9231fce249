"""Split forwards (`forward_split`): a batch's parts run at once on threads of their own, and answer as
the whole batch run as one forward does.

The bound: each row goes through the same network on the same pixels; only the batch it runs in and the
intra-op threads differ, which can change a convolution's algorithm and so its rounding: the answers
agree within `TOL` (tests/numerics.py: two float32 paths through the world's network).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from adapters_store import LocalStore
from server.engine import Engine, EngineConfig
from server.preprocess import preprocess
from tests.server.conftest import DOMAINS, TOL, encode, image


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Two intra-op threads for the engine to split between its parts, whatever this machine has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _parts_seen(engine: Engine) -> tuple[list[tuple[str, int]], Any]:
    """(thread name, rows) of every forward through the first unit, and the hook's handle."""
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def hook(module: Any, args: Any) -> None:
        with lock:
            seen.append((threading.current_thread().name, args[0].shape[0]))

    return seen, engine.net.units[0].register_forward_pre_hook(hook)


MIXED = ["birds", "digits", "textures", "birds", "digits", "birds", "textures"]
CASES = {
    "mixed batch": (MIXED, 0),
    "mixed batch in micro-batches of 2": (MIXED, 2),
    "one domain, merged weights": (["birds"] * 5, 0),
    "one image": (["digits"], 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_split_forward_answers_as_one_forward(store: LocalStore, two_threads: None, case: str) -> None:
    names, micro = CASES[case]
    x = torch.stack(
        [preprocess(encode(image(i)), DOMAINS[n][2], max_pixels=10**7) for i, n in enumerate(names)]
    )
    whole = Engine(store, EngineConfig(bank_slots=4, forward_split=1, micro_batch=micro))
    split = Engine(store, EngineConfig(bank_slots=4, forward_split=2, micro_batch=micro))
    keys = [whole.resolve(n) for n in names]
    if len(set(names)) == 1:  # the merged path needs the domain's folded weights: a first forward makes them
        whole.infer(keys, x, top_k=3), split.infer(keys, x, top_k=3)
    seen, handle = _parts_seen(split)
    try:
        got = split.infer(keys, x, top_k=3)
    finally:
        handle.remove()
    expected = whole.infer(keys, x, top_k=3)
    for g, e in zip(got, expected, strict=True):
        assert g.key == e.key and [s.index for s in g.top] == [s.index for s in e.top]
        assert [s.probability for s in g.top] == pytest.approx([s.probability for s in e.top], abs=TOL)
    threads = {name for name, _ in seen}
    assert len(threads) == min(2, len(names)) and all(t.startswith("forward-part") for t in threads)
    step = micro or len(names)
    halves = [len(names) - len(names) // 2, len(names) // 2]  # torch.tensor_split's part sizes
    assert sorted(rows for _, rows in seen) == sorted(
        min(step, h - start) for h in halves if h for start in range(0, h, step)
    )


def test_with_one_thread_the_forward_is_not_split(store: LocalStore) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine(store, EngineConfig(bank_slots=4, forward_split=2))
    finally:
        torch.set_num_threads(before)
    seen, handle = _parts_seen(engine)
    try:
        engine.infer([engine.resolve("birds")] * 4, torch.zeros(4, 3, 24, 24), top_k=1)
    finally:
        handle.remove()
    assert seen == [(threading.current_thread().name, 4)]  # one forward, on the caller's thread
