"""The hostile corpus against a live app: every case gets its exact 4xx (or a correct 200), the server keeps
answering correctly after each, refused uploads leave the store byte-for-byte unchanged, and no pickle
payload ever runs."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from httpx import Response
from PIL import Image

from tests.reliability.conftest import Corpus, Served, decode_like_server, store_snapshot
from tests.reliability.hostile_corpus import (
    ImageCase,
    MarkerPayload,
    Part,
    UploadCase,
    _npy_object,
    _torch_zip,
)
from tests.server.conftest import ADMIN, TOL

MIN_UPLOADS, MIN_IMAGES = 50, 30


def _files(parts: tuple[Part, ...]) -> list[tuple[str, tuple[str | None, bytes, str]]]:
    return [(p.field, (p.filename, p.data, p.content_type)) for p in parts]


def _check_error(r: Response, status: int, code: str, must_mention: str | None) -> str | None:
    """None when the answer is the expected JSON error, else what is wrong with it."""
    if r.status_code != status:
        return f"status {r.status_code} (want {status}): {r.text[:300]}"
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not a JSON error body: {r.text[:300]}"
    if error.get("code") != code:
        return f"code {error.get('code')!r} (want {code!r}): {error}"
    if not error.get("message"):
        return "an empty message"
    if code == "invalid_artifact" and not error.get("problems"):
        return "invalid_artifact without problems"
    if must_mention is not None and must_mention not in str(error):
        return f"the error does not mention {must_mention!r}: {error}"
    return None


def _post_upload(served: Served, case: UploadCase) -> Response:
    url = f"/v1/domains/{quote(case.path_domain, safe='')}/adapters?activate=true"
    headers = {"Authorization": f"Bearer {ADMIN}"} if case.auth else {}
    if case.parts:
        return served.client.post(url, files=_files(case.parts), headers=headers)
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    return served.client.post(url, content=case.body or b"", headers=headers)


def test_corpus_is_big_enough(corpus: Corpus) -> None:
    assert len(corpus.uploads) >= MIN_UPLOADS
    assert len(corpus.images) >= MIN_IMAGES
    names = [c.name for c in corpus.uploads] + [c.name for c in corpus.images]
    assert len(set(c.name for c in corpus.uploads)) == len(corpus.uploads)
    assert len(set(c.name for c in corpus.images)) == len(corpus.images), names


@pytest.mark.parametrize("container", ["pickle", "torch_zip", "npy"])
def test_the_pickle_payload_is_live(tmp_path: Path, container: str) -> None:
    """Without this, "the marker never appears" would prove nothing: each container does run it."""
    marker = tmp_path / "ran"
    if container == "pickle":
        pickle.loads(pickle.dumps(MarkerPayload(marker)))
    elif container == "torch_zip":
        torch.load(io.BytesIO(_torch_zip(marker)), weights_only=False)
    else:
        np.load(io.BytesIO(_npy_object(marker)), allow_pickle=True)
    assert marker.exists()


def test_hostile_uploads_are_refused_and_change_nothing(served: Served, corpus: Corpus) -> None:
    failures: list[str] = []
    before = store_snapshot(served.store)
    for case in corpus.uploads:
        r = _post_upload(served, case)
        problem = _check_error(r, case.expect, case.code or "", case.message_has)
        if problem:
            failures.append(f"{case.name}: {problem}")
        after = store_snapshot(served.store)
        if after != before:
            failures.append(f"{case.name}: the store changed (revision {before[0]} -> {after[0]})")
            before = after
        if corpus.marker.exists():
            failures.append(f"{case.name}: A PICKLE PAYLOAD RAN")
            corpus.marker.unlink()
        if broken := served.still_correct():
            failures.append(f"{case.name}: {broken}")
    assert not failures, "\n".join(failures)


def test_a_valid_upload_still_works_after_the_corpus(served: Served, corpus: Corpus) -> None:
    """The refusals were for the hostile bytes, not a broken upload path: the valid artifact goes in."""
    art = served.world.artifacts["birds_v2"]
    parts = (
        Part("manifest", art.manifest, "manifest.json"),
        Part("tensors", art.tensors, "adapter.safetensors"),
    )
    r = served.client.post(
        "/v1/domains/birds/adapters", files=_files(parts), headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert r.status_code == 201, r.text
    assert r.json() == {"domain": "birds", "version": 2, "active": False}
    served.assert_still_correct()  # not activated: v1 still serves
    assert not corpus.marker.exists()


def _expected_pixels(case: ImageCase) -> Image.Image:
    decoded = decode_like_server(case.body)
    if case.reference == "16bit":  # full 16-bit range mapped onto 8 bits (not clipped at 255)
        return Image.fromarray((np.asarray(decoded, dtype=np.uint16) >> 8).astype(np.uint8))
    return decoded


def _post_image(served: Served, case: ImageCase) -> Response:
    url = "/v1/domains/birds/classify?top_k=3"
    if case.multipart:
        return served.client.post(url, files=_files(case.multipart))
    return served.client.post(url, content=case.body, headers={"Content-Type": case.content_type})


def _check_answer(served: Served, case: ImageCase, r: Response) -> str | None:
    if r.status_code != 200:
        return f"status {r.status_code} (want 200): {r.text[:300]}"
    body = r.json()
    expected = served.world.reference("birds", _expected_pixels(case))
    got = {s["index"]: s["probability"] for s in body["results"][0]["top_k"]}
    want = {i: float(p) for i, p in enumerate(expected)}
    if body["version"] != 1 or len(body["results"]) != 1 or got != pytest.approx(want, abs=TOL):
        return f"wrong answer {got} (want {want}, v1)"
    return None


def test_hostile_images_get_clear_answers(served: Served, corpus: Corpus) -> None:
    failures: list[str] = []
    before = store_snapshot(served.store)
    for case in corpus.images:
        r = _post_image(served, case)
        problem = (
            _check_answer(served, case, r)
            if case.code is None
            else _check_error(r, case.expect, case.code, None)
        )
        if problem:
            failures.append(f"{case.name}: {problem}")
        if broken := served.still_correct():
            failures.append(f"{case.name}: {broken}")
    assert store_snapshot(served.store) == before
    assert not failures, "\n".join(failures)
