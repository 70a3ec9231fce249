"""One uploaded image → the tensor the engine is given, by the domain manifest's ``Preprocessing``.

Runs in the thread pool, never on the event loop. The pixels come from ``domain_format.preprocess`` (the
same code the trainer evaluates with: decode JPEG/PNG/WebP with the pixel limits checked from the header,
8-bit, channels, resize, centre crop) and the normalisation from ``residual_adapters.inputs``. Refused
images raise ``domain_format.preprocess.ImageRejected``; ``server.http_errors`` maps it to 413/415/422.
"""

from __future__ import annotations

import numpy as np
import torch

from adapters_store.manifest import Preprocessing
from domain_format.preprocess import prepare
from residual_adapters.inputs import normalise


def preprocess(data: bytes, pre: Preprocessing, *, max_pixels: int) -> torch.Tensor:
    """Encoded image bytes → float32 [3, input_size, input_size], contiguous."""
    return network_input(prepare(data, pre.image_spec(), max_pixels=max_pixels), pre)


def network_input(pixels: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """The domain's uint8 pixels [input_size, input_size, C] → float32 [3, input_size, input_size]."""
    x = normalise(torch.from_numpy(pixels)[None], pre.mean, pre.std, layout="nhwc")
    return x[0].contiguous()
