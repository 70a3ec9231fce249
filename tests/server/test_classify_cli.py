"""`multidomain classify` against a real uvicorn on the tiny world: a readable table (or the JSON), the
server's refusals and unreadable files as exit codes with a message."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_store import LocalStore
from multidomain.cli import build_parser
from server.app import create_app
from server.serving import ServerThread
from tests.server.conftest import TOL, TinyWorld, encode, image, settings_for


@pytest.fixture
def server(store: LocalStore) -> Iterator[ServerThread]:
    with ServerThread(create_app(settings_for(store))) as running:
        yield running


def _run(*argv: str) -> tuple[int, str, str]:
    args = build_parser("classify").parse_args(["classify", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_table_and_json(server: ServerThread, world: TinyWorld, tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.jpg"
    first.write_bytes(encode(image(1)))
    second.write_bytes(encode(image(2), "JPEG"))
    code, out, err = _run(str(first), str(second), "--domain", "birds", "--url", server.url, "--top-k", "2")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"{first}  (birds version 1, ") and lines[0].endswith(" ms)")
    assert lines[3].startswith(f"{second}  (birds version 1")
    want = world.reference("birds", image(1))
    top = int(want.argmax())
    assert lines[1].split()[:2] == ["1", f"birds_{top}"]
    shown = float(lines[1].split()[-1].rstrip("%"))
    assert shown == pytest.approx(100 * float(want[top]), abs=0.005 + 100 * TOL)
    assert len(lines) == 6

    code, out, _ = _run(str(first), "--domain", "birds", "--url", server.url, "--json")
    answer = json.loads(out)
    assert code == 0 and answer["version"] == 1 and len(answer["results"][0]["top_k"]) == 3


def test_refusals_and_unreadable_files(server: ServerThread, tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(image(1)))
    code, out, err = _run(str(photo), "--domain", "nope", "--url", server.url)
    assert code == 1 and out == "" and "404 domain_not_found" in err
    code, _, err = _run(str(tmp_path / "missing.png"), "--domain", "birds", "--url", server.url)
    assert code == 2 and "missing.png" in err
    (tmp_path / "text.png").write_bytes(b"not an image")
    code, _, err = _run(str(tmp_path / "text.png"), "--domain", "birds", "--url", server.url)
    assert code == 1 and "415" in err
    code, _, err = _run(str(photo), "--domain", "birds", "--url", "http://127.0.0.1:9")
    assert code == 1 and "POST /v1/classify" in err  # unreachable: the client names what it tried
