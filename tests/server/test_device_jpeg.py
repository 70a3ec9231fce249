"""JPEGs decoded by the engine (`server.device_jpeg`, `MD_ENGINE_JPEG_DECODE`): the front end's pixels within
one level, corrupt data refused with the image named, and the route through a multi-process server.

The bound, from the module's error model: both sides decode with libjpeg-turbo (identical pixels) and
convert to gray with the same integer formula; PIL then rounds to uint8 between its two bilinear passes
(at most 1/2 level, carried through the second pass's non-negative weights summing to 1), torch rounds
once, so the crops differ by at most one level, and not at all where no resize is needed."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from adapters_store import LocalStore
from domain_format.preprocess import CorruptImage, ImageSpec, prepare, read_header
from server import device_jpeg
from server.app import create_app
from server.device_jpeg import JpegDecoder, decode, engine_decodable
from server.engine_service import EngineService
from server.errors import BadRequest
from tests.server.conftest import (
    TOL,
    Processes,
    TinyWorld,
    encode,
    make_store,
    settings_for,
    start_processes,
)


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients and noise: JPEG's real work (chroma, edges), unlike pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / 7) * 80 + 128, xx * 255 / width, yy * 255 / height], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, mode: str = "RGB", **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="JPEG", **options)
    return out.getvalue()


CASES = {
    "downscaled, odd offsets": (_jpeg(_photo(417, 300)), "rgb"),
    "tall": (_jpeg(_photo(61, 203, 1)), "rgb"),
    "upscaled": (_jpeg(_photo(13, 9, 2)), "rgb"),
    "at the resize size": (_jpeg(_photo(72, 80, 3)), "rgb"),
    "progressive": (_jpeg(_photo(150, 111, 4), progressive=True), "rgb"),
    "grayscale JPEG, rgb domain": (_jpeg(_photo(99, 70, 5), "L"), "rgb"),
    "colour JPEG, grayscale domain": (_jpeg(_photo(120, 97, 6)), "grayscale"),
    "grayscale JPEG, grayscale domain": (_jpeg(_photo(90, 133, 7), "L"), "grayscale"),
}


@pytest.mark.parametrize("case", CASES)
def test_the_engine_makes_the_front_ends_pixels_within_one_level(case: str) -> None:
    data, channels = CASES[case]
    spec = ImageSpec(input_size=64, resize=72, channels=channels, interpolation="bilinear")
    assert engine_decodable(read_header(data, spec, max_pixels=10**8), spec)
    expected = prepare(data, spec, max_pixels=10**8).astype(int)  # [64, 64, C]
    [got] = decode([data], spec, torch.device("cpu")).numpy().astype(int)  # [64, 64, 3]
    assert got.shape == (64, 64, 3)
    difference = np.abs(got - expected)  # C = 1 broadcasts over the three channels
    assert difference.max() <= (0 if case == "at the resize size" else 1), case


def test_a_batch_decodes_as_its_images_do_alone() -> None:
    spec = ImageSpec(input_size=64, resize=72, channels="rgb", interpolation="bilinear")
    jpegs = [CASES["tall"][0], CASES["upscaled"][0], CASES["progressive"][0]]
    together = decode(jpegs, spec, torch.device("cpu"))
    for row, data in enumerate(jpegs):
        assert torch.equal(together[row], decode([data], spec, torch.device("cpu"))[0])


def test_what_the_engine_does_not_decode_stays_with_the_front_end() -> None:
    spec = ImageSpec(input_size=64, resize=72, channels="rgb", interpolation="bilinear")
    png = encode(Image.fromarray(_photo(80, 80)))
    cmyk = _jpeg(_photo(80, 80), "CMYK")
    for data in (png, cmyk):
        assert not engine_decodable(read_header(data, spec, max_pixels=10**8), spec)
    bicubic = ImageSpec(input_size=64, resize=72, channels="rgb", interpolation="bicubic")
    jpeg = CASES["tall"][0]
    assert not engine_decodable(read_header(jpeg, bicubic, max_pixels=10**8), bicubic)


def test_corrupt_jpeg_data_is_refused_naming_the_image() -> None:
    spec = ImageSpec(input_size=64, resize=72, channels="rgb", interpolation="bilinear")
    good = CASES["tall"][0]
    truncated = good[: len(good) // 2]
    with pytest.raises(CorruptImage, match=r"^image 1: the JPEG data is corrupt: \w"):
        decode([good, truncated], spec, torch.device("cpu"))


# -- across requests: JpegDecoder ------------------------------------------------------------------------
SPEC = ImageSpec(input_size=64, resize=72, channels="rgb", interpolation="bilinear")


Busy = tuple[JpegDecoder, threading.Event, list[int]]


@pytest.fixture
def busy_decoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Busy]:
    """A decoder whose first request holds its thread until the event is set (its spec is asked for on
    that thread), so the requests submitted meanwhile queue up; and the size of every decode_all call."""
    calls: list[int] = []
    real = device_jpeg.decode_all

    def counted(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(jpegs))
        return real(jpegs, device)

    monkeypatch.setattr(device_jpeg, "decode_all", counted)
    decoder = JpegDecoder(torch.device("cpu"))
    holding, release = threading.Event(), threading.Event()

    def held_spec() -> ImageSpec:
        holding.set()
        release.wait(30)
        return SPEC

    hold = decoder.submit([CASES["tall"][0]], held_spec)
    assert holding.wait(30)  # the decoder's thread is in the holding request's round
    yield decoder, release, calls
    release.set()
    hold.result(timeout=30)
    decoder.stop()


def test_requests_queued_meanwhile_share_one_decode_call(busy_decoder: Busy) -> None:
    decoder, release, calls = busy_decoder
    requests = [[CASES["tall"][0]], [CASES["upscaled"][0], CASES["progressive"][0]], [CASES["tall"][0]]]
    futures = [decoder.submit(jpegs, lambda: SPEC) for jpegs in requests]
    release.set()
    results = [f.result(timeout=30) for f in futures]
    assert calls == [1, 4]  # the holding request alone, then the three queued behind it together
    for jpegs, result in zip(requests, results, strict=True):
        assert torch.equal(result, decode(jpegs, SPEC, torch.device("cpu")))


def test_a_corrupt_image_fails_only_its_own_request(busy_decoder: Busy) -> None:
    decoder, release, _ = busy_decoder
    good = CASES["tall"][0]
    futures = [decoder.submit(j, lambda: SPEC) for j in ([good], [good, good[: len(good) // 2]], [good])]
    release.set()
    with pytest.raises(CorruptImage, match=r"^image 1: "):  # its index in its own request
        futures[1].result(timeout=30)
    for future in (futures[0], futures[2]):
        assert torch.equal(future.result(timeout=30), decode([good], SPEC, torch.device("cpu")))


def test_a_cancelled_request_is_not_decoded(busy_decoder: Busy) -> None:
    decoder, release, calls = busy_decoder
    gone = decoder.submit([CASES["tall"][0]], lambda: SPEC)
    kept = decoder.submit([CASES["upscaled"][0]], lambda: SPEC)
    assert gone.cancel()
    release.set()
    assert kept.result(timeout=30).shape == (1, 64, 64, 3)
    assert calls == [1, 1]  # the holding request, then only the one still wanted


def test_a_stopped_decoder_finishes_its_queue_and_takes_no_more() -> None:
    decoder = JpegDecoder(torch.device("cpu"))
    queued = [decoder.submit([CASES["tall"][0]], lambda: SPEC) for _ in range(3)]
    decoder.stop()
    assert all(f.done() and f.result().shape == (1, 64, 64, 3) for f in queued)
    with pytest.raises(RuntimeError, match="stopped"):
        decoder.submit([CASES["tall"][0]], lambda: SPEC)


# -- through the multi-process server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Processes:
    store = make_store(world, tmp_path_factory.mktemp("device_jpeg") / "store")
    running = start_processes(store, workers=1, engine_jpeg_decode=True)
    yield running
    assert running.stop() == 0


def _classify(served: Processes, domain: str, body: bytes, media: str = "image/jpeg") -> httpx.Response:
    return httpx.post(
        f"{served.url}/v1/classify", content=body, headers={"X-Domain": domain, "Content-Type": media},
        timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("domain", ["birds", "textures"])
def test_a_jpeg_the_engine_decodes_gets_the_reference_answer(
    served: Processes, world: TinyWorld, domain: str
) -> None:
    # 28 x 35: its shorter side is the domains' resize size already, so the pixels are the front end's
    # exactly and the answer is the reference forward's within the usual tolerance
    data = _jpeg(_photo(28, 35, 8))
    r = _classify(served, domain, data)
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    ref = world.reference(domain, Image.open(io.BytesIO(data)))
    top = ref.topk(len(result["top_k"]))
    assert [e["index"] for e in result["top_k"]] == top.indices.tolist()
    for e, p in zip(result["top_k"], top.values.tolist(), strict=True):
        assert e["probability"] == pytest.approx(p, abs=TOL)


def test_corrupt_jpeg_data_gets_422_from_the_engine_and_the_server_goes_on(served: Processes) -> None:
    good = _jpeg(_photo(60, 45, 9))
    r = _classify(served, "birds", good[: len(good) // 2])
    assert r.status_code == 422, r.text
    assert "the JPEG data is corrupt" in r.json()["error"]["message"]  # the engine's words, not PIL's
    assert _classify(served, "birds", good).status_code == 200


def test_a_png_and_a_mixed_request_still_decode_in_the_front_end(served: Processes, world: TinyWorld) -> None:
    png = encode(Image.fromarray(_photo(40, 32, 10)))
    r = _classify(served, "birds", png, "image/png")
    assert r.status_code == 200, r.text
    files = [
        ("file", ("a.jpg", _jpeg(_photo(60, 45, 11)), "image/jpeg")),
        ("file", ("b.png", png, "image/png")),
    ]
    r = httpx.post(f"{served.url}/v1/classify", files=files, headers={"X-Domain": "birds"}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 2


def test_the_in_process_server_hands_jpegs_to_its_engine_too(store: LocalStore, world: TinyWorld) -> None:
    data = _jpeg(_photo(28, 35, 12))
    with TestClient(create_app(settings_for(store, engine_jpeg_decode=True))) as client:
        headers = {"X-Domain": "digits", "Content-Type": "image/jpeg"}
        corrupt = _jpeg(_photo(60, 45, 9))
        r = client.post("/v1/classify", content=corrupt[: len(corrupt) // 2], headers=headers)
        assert r.status_code == 422 and "the JPEG data is corrupt" in r.json()["error"]["message"], r.text
        r = client.post("/v1/classify", content=data, headers=headers)
        assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    ref = world.reference("digits", Image.open(io.BytesIO(data)))
    assert [e["index"] for e in result["top_k"]] == ref.topk(len(result["top_k"])).indices.tolist()


def test_an_engine_with_the_setting_off_refuses_jpegs(store: LocalStore) -> None:
    # what a crafted classify message carrying JPEGs meets when the operator has not turned decoding on
    service = EngineService(settings_for(store, warmup=False))
    try:
        with pytest.raises(BadRequest, match="MD_ENGINE_JPEG_DECODE is off"):
            service.decode_jpegs("birds", 1, [CASES["tall"][0]]).result(timeout=30)
    finally:
        service.close()
