"""X-Request-Id: taken from the request (validated) or generated, echoed, and on every log line of the
request, the engine's included: in-process (log records) and across processes (MD_LOG_JSON=1 lines)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapters_store import LocalStore
from server.app import create_app
from server.logs import JsonLines
from tests.server.conftest import encode, image, settings_for, start_processes


def _classify(client: httpx.Client, **headers: str) -> httpx.Response:
    return client.post(
        "/v1/domains/birds/classify",
        content=encode(image(1)),
        headers={"Content-Type": "image/png", **headers},
    )


def test_given_ids_are_echoed_and_missing_ones_generated(client: httpx.Client) -> None:
    r = _classify(client, **{"X-Request-Id": "trace-0af7651916cd43dd8448eb211c80319c"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-0af7651916cd43dd8448eb211c80319c"
    generated = {_classify(client).headers["x-request-id"] for _ in range(2)}
    assert len(generated) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", g) for g in generated)
    # Errors carry it too.
    assert client.get("/v1/domains/nope", headers={"X-Request-Id": "e-1"}).headers["x-request-id"] == "e-1"


@pytest.mark.parametrize("bad", ["x" * 129, "has space", 'quote"s', "new\\nline", "ünï"])
def test_bad_ids_are_refused_naming_the_header(client: httpx.Client, bad: str) -> None:
    r = client.get("/v1/domains", headers=[("X-Request-Id", bad.encode("utf-8"))])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request_id" and "X-Request-Id" in r.json()["error"]["message"]
    v2 = client.get("/v2/models/birds", headers=[("X-Request-Id", bad.encode("utf-8"))])
    assert v2.status_code == 400 and "X-Request-Id" in v2.json()["error"]


def test_every_log_record_of_a_request_names_it(store: LocalStore, caplog: pytest.LogCaptureFixture) -> None:
    with TestClient(create_app(settings_for(store))) as client:
        caplog.set_level(logging.DEBUG)  # the per-request lines are DEBUG
        caplog.clear()
        assert _classify(client, **{"X-Request-Id": "req-42"}).status_code == 200
        assert client.get("/v1/domains/nope", headers={"X-Request-Id": "req-43"}).status_code == 404
    by_id: dict[str, set[str]] = {}
    for record in caplog.records:
        by_id.setdefault(record.request_id, set()).add(record.name)  # type: ignore[attr-defined]
    assert {"server.requests", "server.local_engine"} <= by_id["req-42"]  # the front end's and engine's
    assert "server.requests" in by_id["req-43"]


def test_json_lines_format() -> None:
    record = logging.LogRecord("server.x", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    record.request_id = "abc"
    line = json.loads(JsonLines("frontend-1").format(record))
    assert line["message"] == "hello world" and line["request_id"] == "abc" and line["level"] == "WARNING"
    assert line["component"] == "frontend-1" and line["logger"] == "server.x"


def test_json_logs_of_front_end_and_engine_processes(store: LocalStore, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        running = start_processes(store, workers=1, stderr=log_file, log_level="debug", log_json=True)
        try:
            with httpx.Client(base_url=running.url, timeout=60) as client:
                assert _classify(client, **{"X-Request-Id": "multi-7"}).status_code == 200
        finally:
            assert running.stop() == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert lines, log_path.read_text()[-2000:]
    mine = [line for line in lines if line["request_id"] == "multi-7"]
    components = {line["component"].split("-")[0] for line in mine}
    assert components == {"frontend", "engine"}, mine
    assert any("classified 1 images in birds version 1" in line["message"] for line in mine)
