"""Fuzzing the server with schemathesis from its own OpenAPI schema: no 5xx, no answer outside the schema.

A bounded number of examples per operation and generation mode (data that fits the schema, and data
that does not), against the multi-process server (front ends and an engine) serving the tiny
resnet26 on a temp store. Admin calls carry the token, so uploads,
activations and deletes really run. Hypothesis drives each operation's strategy directly: schemathesis's
lazy pytest fixture loader does not work with pytest 9 (`'Function' object has no attribute '_nodeid'`).

What is checked: every answer is below 500 and passes schemathesis's status-code (documented for that
operation), content-type, header and body-schema checks; every 4xx is also the server's JSON error
envelope with a status the README lists (a 429 with Retry-After).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.conftest import ADMIN, TinyWorld, make_store, start_processes

EXAMPLES = {GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 8}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
README_ERRORS = {400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 503}
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def api_schema(
    world: TinyWorld, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[schemathesis.BaseSchema]:
    store = make_store(world, Path(tmp_path_factory.mktemp("fuzz")) / "store")
    running = start_processes(store, workers=2, max_body_bytes=256 * 1024)  # the serving path as deployed
    try:
        yield schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    finally:
        assert running.stop() == 0


def _error_envelope_problem(response: schemathesis.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return f"a {response.status_code} without a JSON body: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if urlsplit(str(response.request.url)).path.startswith("/v2"):
        # the Open Inference Protocol's own form: one string
        if not (isinstance(error, str) and error):
            return f"a {response.status_code} outside the protocol's error form: {response.text[:200]!r}"
    elif not (isinstance(error, dict) and isinstance(error.get("code"), str) and error.get("message")):
        return f"a {response.status_code} outside the error envelope: {response.text[:200]!r}"
    if response.status_code == 429 and "retry-after" not in {k.lower() for k in response.headers}:
        return "a 429 without Retry-After"
    return None


class FuzzLog:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.statuses: dict[int, int] = {}
        self._seen: set[str] = set()

    def fail(self, case: schemathesis.Case, text: str) -> None:
        key = f"{case.operation.label}: {text.splitlines()[0] if text else ''}"
        if key not in self._seen:  # one line per distinct failure, not one per example
            self._seen.add(key)
            self.failures.append(f"{case.operation.label}: {' | '.join(text.strip().splitlines()[:14])}")


def _aimed(strategy: st.SearchStrategy[schemathesis.Case]) -> st.SearchStrategy[schemathesis.Case]:
    """Half the cases name a domain that exists, so the fuzzer reaches past the 404 into the real work."""

    def aim(pair: tuple[schemathesis.Case, str | None]) -> schemathesis.Case:
        case, domain = pair
        if domain is not None:
            if case.path_parameters and "domain" in case.path_parameters:
                case.path_parameters["domain"] = domain
            if case.operation.path == "/v1/classify":
                case.headers = {**(case.headers or {}), "X-Domain": domain}
        return case

    return st.tuples(strategy, st.sampled_from([None, "birds", "digits", "textures"])).map(aim)


def _runner(
    strategy: st.SearchStrategy[schemathesis.Case], examples: int, log: FuzzLog
) -> Callable[[], None]:
    @given(strategy)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        response = case.call(headers=AUTH)
        status = response.status_code
        log.statuses[status] = log.statuses.get(status, 0) + 1
        if status >= 500:
            log.fail(case, f"{status}: {response.text[:300]}")
            return
        if status >= 400:
            problem = _error_envelope_problem(response)
            if problem:
                log.fail(case, problem)
            if status not in README_ERRORS:
                log.fail(case, f"status {status} is not one the README documents")
        try:
            case.validate_response(response, checks=CHECKS, headers=AUTH)
        except Exception as exc:  # schemathesis raises a group of every failed check
            log.fail(case, str(exc))

    return run


@pytest.fixture(scope="module")
def fuzz_log(api_schema: schemathesis.BaseSchema) -> FuzzLog:
    log = FuzzLog()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9  # classify x2, list/describe/upload/activate/delete x2, health, metrics
    ran = 0
    operations.sort(key=lambda op: op.method.upper() == "DELETE")  # deletes last: they empty the store
    for operation in operations:
        for mode, examples in EXAMPLES.items():
            try:
                _runner(_aimed(operation.as_strategy(generation_mode=mode)), examples, log)()
                ran += 1
            except Unsatisfiable:  # no negative data exists for an operation without inputs
                assert mode is GenerationMode.NEGATIVE
    assert ran > len(operations)
    return log


def test_no_5xx_and_every_answer_conforms(fuzz_log: FuzzLog) -> None:
    assert sum(fuzz_log.statuses.values()) > 100
    assert any(200 <= s < 300 for s in fuzz_log.statuses)  # the fuzzer got past validation too
    assert not fuzz_log.failures, "\n".join(fuzz_log.failures)
