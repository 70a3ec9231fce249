"""The engine's memory format (`channels_last`, the default on every device): answers as the contiguous
layout's, on every path a batch can take.

The bound: both layouts run the same network on the same pixels; only the order in which a convolution
reads its inputs differs, which can change its algorithm and so its rounding. The tiny world's answers
agree within `TOL` (tests/numerics.py: two float32 paths through the world's network); the real
MobileNetV2's logits within `difference_bound` of that network, relative to their largest magnitude.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from adapters_store import LocalStore
from server.engine import Engine, EngineConfig
from server.preprocess import preprocess
from tests.numerics import difference_bound, relative_error
from tests.server.conftest import DOMAINS, TOL, chelsea_jpeg, encode, image

CASES = {
    "mixed batch": (["birds", "digits", "textures", "birds", "digits"], 0),
    "mixed batch in micro-batches of 2": (["birds", "digits", "textures", "birds", "digits"], 2),
    "one domain, merged weights": (["birds"] * 3, 0),
    "one domain, its bank slot": (["textures"] * 3, 0),  # merged_cache 0 below: never merged
}


def _layouts(store: LocalStore, **config: object) -> dict[bool, Engine]:
    return {cl: Engine(store, EngineConfig(channels_last=cl, **config)) for cl in (True, False)}  # type: ignore[arg-type]


def test_the_layout_is_the_engines_own(store: LocalStore) -> None:
    """The setting reaches the network: a test below comparing two layouts compares two."""
    engines = _layouts(store)
    conv = next(
        m for m in engines[True].net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1
    )
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    conv = next(
        m for m in engines[False].net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1
    )
    assert conv.weight.is_contiguous()
    assert EngineConfig().channels_last is True


@pytest.mark.parametrize("case", list(CASES))
def test_channels_last_answers_as_contiguous(store: LocalStore, case: str) -> None:
    names, micro = CASES[case]
    x = torch.stack(
        [preprocess(encode(image(i)), DOMAINS[n][2], max_pixels=10**7) for i, n in enumerate(names)]
    )
    merged = 4 if case.endswith("merged weights") else 0
    engines = _layouts(store, bank_slots=4, micro_batch=micro, merged_cache=merged)
    keys = [engines[False].resolve(n) for n in names]
    if merged:  # the merged path needs the domain's folded weights: a first forward makes them
        for engine in engines.values():
            engine.infer(keys, x, top_k=3)
    got, expected = (engines[cl].infer(keys, x, top_k=3) for cl in (True, False))
    for g, e in zip(got, expected, strict=True):
        assert g.key == e.key and [s.index for s in g.top] == [s.index for s in e.top]
        assert [s.probability for s in g.top] == pytest.approx([s.probability for s in e.top], abs=TOL)


def test_channels_last_on_the_real_mobilenet(imagenet_store: LocalStore) -> None:
    """MobileNetV2, what `make serve` serves: depthwise convolutions, real weights, a real photo."""
    engines = _layouts(imagenet_store, bank_slots=2)
    photo = np.asarray(Image.open(io.BytesIO(chelsea_jpeg())).convert("RGB").resize((224, 224)))
    pixels = torch.from_numpy(photo.copy())[None]
    logits = {}
    for cl, engine in engines.items():
        key = engine.resolve("imagenet")
        slot = engine.load(key)
        x = engine.network_input([key], pixels).contiguous(memory_format=engine.memory_format)
        with torch.inference_mode():
            logits[cl] = engine.net.forward_slot(x, slot).float()
    assert relative_error(logits[True], logits[False]) <= difference_bound(engines[False].net)
    answers = {
        cl: engine.infer_pixels([engine.resolve("imagenet")], pixels)[0] for cl, engine in engines.items()
    }
    assert [s.index for s in answers[True].top] == [s.index for s in answers[False].top]
    assert answers[True].top[0].label == "Egyptian cat"
