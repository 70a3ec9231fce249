"""The server tests' probability tolerance follows from the error model (tests/numerics.py)."""

from __future__ import annotations

import torch

from server.preprocess import preprocess
from tests.server.conftest import DOMAINS, LOGIT_SCALE, MAX_CLASSES, TOL, TinyWorld, encode, image


@torch.no_grad()
def test_the_world_stays_within_the_logit_scale_the_tolerance_assumes(world: TinyWorld) -> None:
    for name in [*DOMAINS, "birds_v2"]:
        assert world.net.domains[name].num_classes <= MAX_CLASSES
        pre = DOMAINS[name.split("_")[0]][2]
        x = torch.stack(
            [
                preprocess(encode(image(seed, mode=mode)), pre, max_pixels=10**7)
                for seed in range(16)
                for mode in ("RGB", "L")
            ]
        )
        assert float(world.net.forward_domain(x, name).abs().max()) <= LOGIT_SCALE, name


def test_the_tolerance_still_tells_answers_apart(world: TinyWorld) -> None:
    """A wrong version, domain or preprocessing moves probabilities by far more than the rounding bound."""
    img = image(3)
    assert TOL < 1e-3
    assert float((world.reference("birds", img) - world.reference("birds_v2", img)).abs().max()) > 10 * TOL
