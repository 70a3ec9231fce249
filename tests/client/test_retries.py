"""The client retries classify and reads answered 429/503 after their Retry-After, within its bounds,
and never repeats uploads. The server is a scripted transport here: the point is what the client sends
and how long it waits (recorded, not slept), given answers of the server's exact form."""

from __future__ import annotations

import httpx
import pytest
from multidomain_client import MultidomainClient, Overloaded

OK = {"domain": "birds", "version": 1, "results": [], "timing": {"total_ms": 1.0}}


def _overloaded(status: int, retry_after: str | None) -> httpx.Response:
    code = "queue_full" if status == 429 else "engine_unavailable"
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"error": {"code": code, "message": "busy"}}, headers=headers)


def _client(
    answers: list[httpx.Response], waits: list[float], **options: object
) -> tuple[MultidomainClient, list[str]]:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        return answers.pop(0)

    client = MultidomainClient(
        "http://server",
        transport=httpx.MockTransport(answer),
        sleep=waits.append,
        **options,  # type: ignore[arg-type]
    )
    return client, seen


def test_classify_waits_retry_after_then_succeeds() -> None:
    waits: list[float] = []
    client, seen = _client(
        [_overloaded(429, "2"), _overloaded(503, None), httpx.Response(200, json=OK)], waits
    )
    assert client.classify("birds", b"img") == OK
    assert waits == [2.0, 1.0] and seen == ["POST /v1/classify"] * 3


def test_retries_are_bounded_by_count_and_by_total_wait() -> None:
    waits: list[float] = []
    client, seen = _client([_overloaded(429, "1")] * 3, waits, retries=2)
    with pytest.raises(Overloaded) as raised:
        client.classify("birds", b"img")
    assert raised.value.status == 429 and raised.value.retry_after == 1.0
    assert waits == [1.0, 1.0] and len(seen) == 3

    waits = []
    client, seen = _client([_overloaded(429, "20"), _overloaded(429, "20")], waits, max_wait_s=30)
    with pytest.raises(Overloaded):
        client.list_domains()
    assert waits == [20.0] and len(seen) == 2  # a second 20 s wait would pass 30 s

    waits = []
    client, seen = _client([_overloaded(503, "1")], waits, retries=0)
    with pytest.raises(Overloaded):
        client.classify("birds", [b"a", b"b"])
    assert waits == [] and len(seen) == 1


def test_uploads_and_store_changes_are_never_repeated() -> None:
    waits: list[float] = []
    client, seen = _client([_overloaded(503, "1")], waits)
    with pytest.raises(Overloaded):
        client.upload_bundle("birds", b"tar")
    client, seen2 = _client([_overloaded(503, "1")], waits)
    with pytest.raises(Overloaded):
        client.activate("birds", 1)
    assert waits == [] and len(seen) == len(seen2) == 1


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        MultidomainClient("http://server", retries=-1)
