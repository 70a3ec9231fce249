"""Split forwards (`forward_split`): a batch's parts run at once on threads of their own, and answer as
the whole batch run as one forward does.

The bound: each row goes through the same network on the same pixels; only the batch it runs in and the
intra-op threads differ, which can change a convolution's algorithm and so its rounding: the answers
agree within `TOL` (tests/numerics.py: two float32 paths through the world's network).
"""

from __future__ import annotations

import sys
import threading
import time
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
    threads = {name for name, _ in seen}  # the first part on the caller's thread, the second on a helper
    assert len(threads) == min(2, len(names))
    assert sum(t.startswith("forward-part") for t in threads) == len(threads) - 1
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


def _in_wait(thread: threading.Thread) -> bool:
    """Whether `thread` is inside concurrent.futures.wait now."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "wait" and "concurrent" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_a_failing_part_leaves_only_once_the_other_part_has_ended(
    store: LocalStore, two_threads: None
) -> None:
    # The caller unpins the batch's slots when the forward leaves: a part still running then would read
    # slots a load may overwrite. The caller's own part fails; the helper's holds until the caller is
    # waiting for it (or, were it not waiting, has left), then looks at the pins.
    engine = Engine(store, EngineConfig(bank_slots=4, merged_cache=0, forward_split=2))
    names = ["birds", "digits", "textures", "birds"]
    keys = [engine.resolve(n) for n in names]
    x = torch.stack(
        [preprocess(encode(image(i)), DOMAINS[n][2], max_pixels=10**7) for i, n in enumerate(names)]
    )
    slots = {engine.load(k) for k in keys}  # resident: the forward below only reads these
    holding, release, looked = threading.Event(), threading.Event(), threading.Event()
    pins_seen: list[dict[int, int]] = []

    def hook(module: Any, args: Any) -> None:
        if not threading.current_thread().name.startswith("forward-part"):  # the caller's part
            raise RuntimeError("this part fails")
        holding.set()
        assert release.wait(60)
        pins_seen.append(dict(engine._pins))
        looked.set()

    outcome: list[BaseException] = []

    def call() -> None:
        try:
            engine.infer(keys, x, top_k=1)
        except BaseException as exc:
            outcome.append(exc)

    handle = engine.net.units[0].register_forward_pre_hook(hook)
    caller = threading.Thread(target=call)
    try:
        caller.start()
        assert holding.wait(60)
        deadline = time.monotonic() + 60  # a bound on the wait, not a timing assertion
        while caller.is_alive() and not _in_wait(caller) and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        assert looked.wait(60)
        caller.join(60)
    finally:
        release.set()
        handle.remove()
    assert len(outcome) == 1 and "this part fails" in str(outcome[0])
    assert pins_seen and all(pins_seen[0].get(slot, 0) > 0 for slot in slots)
    assert not any(engine._pins.values())  # and unpinned once it left


def test_the_part_threads_leave_the_default_thread_count_as_it_was(
    store: LocalStore, two_threads: None
) -> None:
    # torch's count is per thread, and also a process default that threads starting later adopt: setting
    # the part threads' one count must not leave every later thread (a stager, a pool) on it
    later: list[int] = []

    def a_later_thread() -> None:
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()

    engine = Engine(store, EngineConfig(bank_slots=4, forward_split=2))  # the part threads started
    a_later_thread()
    engine.infer([engine.resolve("birds")] * 4, torch.zeros(4, 3, 24, 24), top_k=1)  # and a split forward
    a_later_thread()
    assert later == [2, 2] and torch.get_num_threads() == 2
