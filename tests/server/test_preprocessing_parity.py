"""One preprocessing: an image file gives bit-identical tensors in training's evaluation and in the server.

Training side: the files as an ImageFolder, loaded by `training.data.load_domain_data` and batched by
its evaluation path (`BatchMaker.eval_batches`). Server side: the same bytes posted to the classify route,
and the tensor the engine is handed, captured at `Engine.infer`. Every file is its own class, stored
twice, so the validation split holds each file exactly once and its class says which file it is.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from adapters_store import LocalStore, Preprocessing
from server.app import create_app
from tests.server.conftest import DOMAINS, settings_for
from training.data import BatchMaker, load_domain_data

MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


def _files() -> dict[str, bytes]:
    """RGB and grayscale PNG and JPEG, a 16-bit PNG, a palette PNG with alpha and a WebP, in sizes whose
    crops have odd offsets, a square one exactly at the resize size and ones needing upscaling."""
    rng = np.random.default_rng(7)

    def rgb(w: int, h: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
        out = io.BytesIO()
        image.save(out, format=fmt, **options)
        return out.getvalue()

    deep = rng.integers(0, 65536, (37, 52), dtype=np.uint16)
    return {
        "a_rgb.png": encode(rgb(41, 33), "PNG"),
        "b_rgb.jpg": encode(rgb(64, 47), "JPEG", quality=85),
        "c_gray.png": encode(rgb(33, 58).convert("L"), "PNG"),
        "d_gray.jpg": encode(rgb(29, 30).convert("L"), "JPEG", quality=90),
        "e_16bit.png": encode(Image.fromarray(deep), "PNG"),
        "f_palette.png": encode(rgb(50, 31).convert("RGBA").convert("P"), "PNG"),
        "g_square.png": encode(rgb(28, 28), "PNG"),
        "h_small.jpg": encode(rgb(13, 9), "JPEG"),
        "i_rgb.webp": encode(rgb(45, 40), "WEBP", quality=80),
    }


def _image_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        folder = root / Path(name).stem
        folder.mkdir(parents=True)
        suffix = Path(name).suffix
        (folder / f"0{suffix}").write_bytes(data)
        (folder / f"1{suffix}").write_bytes(data)
    return root


def _served_tensors(client: TestClient, domain: str, files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    engine = client.app.state.frontend.engines.service.engine  # type: ignore[attr-defined]
    given: list[torch.Tensor] = []
    infer = engine.infer

    def recording_infer(keys: object, images: torch.Tensor, *args: object, **kwargs: object) -> object:
        given.append(images.clone())
        return infer(keys, images, *args, **kwargs)

    engine.infer = recording_infer
    out = {}
    try:
        for name, data in files.items():
            given.clear()
            r = client.post(
                f"/v1/domains/{domain}/classify",
                content=data,
                headers={"Content-Type": MEDIA[Path(name).suffix]},
            )
            assert r.status_code == 200, r.text
            [batch] = given  # one request of one image: one forward of one row
            assert batch.shape[0] == 1
            out[Path(name).stem] = batch[0]
    finally:
        engine.infer = infer
    return out


@pytest.mark.parametrize("domain", ["birds", "textures"])  # an RGB and a grayscale domain
def test_training_evaluation_and_server_give_identical_tensors(
    store: LocalStore, tmp_path: Path, domain: str
) -> None:
    pre: Preprocessing = DOMAINS[domain][2]
    files = _files()
    data = load_domain_data(
        str(_image_folder(tmp_path / "parity", files)),
        input_size=pre.input_size,
        resize=pre.resize,
        val_fraction=0.5,
        grayscale=pre.channels == "grayscale",
        normalisation=(pre.mean, pre.std),
    )
    assert not data.skipped
    assert data.preprocessing == pre  # what training would write in the manifest is what the server runs
    batches = BatchMaker(data.preprocessing, flip=False)
    evaluated = torch.cat([x for x, _ in batches.eval_batches(data.val, batch_size=4)])
    assert sorted(data.val.targets.tolist()) == list(range(len(files)))

    # in-process: the engine's input is captured in this process (the front end's uint8 pixels cross to
    # the engine the same way in both transports)
    with TestClient(create_app(settings_for(store))) as client:
        served = _served_tensors(client, domain, files)
    for row, target in enumerate(data.val.targets.tolist()):
        name = data.labels[target]
        assert served[name].shape == evaluated[row].shape == (3, pre.input_size, pre.input_size)
        assert torch.equal(served[name], evaluated[row]), f"{name}: training and serving differ"
    # The check can fail: the files are different images, so a mixed-up row would be caught.
    assert not torch.equal(served["a_rgb"], served["b_rgb"])
