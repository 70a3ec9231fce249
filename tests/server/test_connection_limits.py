"""No client can stall the server: read deadlines, connection limits per address (trusted proxies'
X-Forwarded-For), the body buffer, and in-flight slots taken only once a body has arrived; and each
answer written in one piece (the protocol holds its head for its body).

Real uvicorn on loopback (`ServerThread`, the app with its engine process; two tests against the
multi-process server). Attackers connect from other loopback addresses (127.0.0.2 and up: the socket's
source address is bound) than the well-behaved client (127.0.0.1). Nothing sleeps to synchronise: the
deadlines are made small and the tests wait for what the server does (an answer read, a socket closed,
a `100 Continue` that says the app is reading the body, a log record). Socket timeouts only bound a
failing test.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.connection_limits import ConnectionGuard, ConnectionLimits
from server.serving import ServerThread
from server.settings import Settings
from tests.server.conftest import TinyWorld, encode, image, make_store, settings_for, start_processes

WAIT_S = 60.0
"""Bounds every wait of a failing test; a passing one waits only for the server's own deadline."""
SHORT_S = 0.3
PNG = encode(image(seed=7))


# -- raw HTTP from a chosen source address ---------------------------------------------------------------
def connect_from(address: str, url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.bind((address, 0))
    sock.connect((host, int(port)))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection."""
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and its Content-Length of body), the connection left open."""
    head = read_head(sock)
    length = parse(head)[1].get("content-length", "0")
    body = b""
    while len(body) < int(length):
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head + body


def parse(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body) if body.strip() else {}


def request_head(length: int, *, extra: str = "", path: str = "/v1/domains/birds/classify") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def reading_body(address: str, url: str, length: int = 1000, *, extra: str = "") -> socket.socket:
    """A request whose body the app has begun to read (its `100 Continue` came), 10 bytes of it sent."""
    sock = connect_from(address, url)
    sock.sendall(request_head(length, extra=extra + "Expect: 100-continue\r\n"))
    assert read_head(sock).startswith(b"HTTP/1.1 100"), "the app did not start reading the body"
    sock.sendall(b"\x89PNG\r\n\x1a\n\0\0")
    return sock


def classify(url: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/domains/birds/classify", content=PNG, headers={"Content-Type": "image/png"}, timeout=WAIT_S
    )


def metric(url: str, route: str, status: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=WAIT_S).text
    prefix = "md_requests_total{"
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix) and f'route="{route}"' in line and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def store_root(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(world, tmp_path_factory.mktemp("limits") / "store").root


def _serve(store_root: Path, **overrides: object) -> Iterator[str]:
    from adapters_store import LocalStore

    app = create_app(settings_for(LocalStore(store_root), **overrides))
    with ServerThread(app) as server:
        assert httpx.get(f"{server.url}/readyz", timeout=120).status_code == 200  # waits for start-up
        yield server.url


@pytest.fixture(scope="module")
def short_deadlines(store_root: Path) -> Iterator[str]:
    yield from _serve(store_root, header_timeout_s=SHORT_S, body_timeout_s=SHORT_S, keep_alive_s=SHORT_S)


@pytest.fixture(scope="module")
def capped(store_root: Path) -> Iterator[str]:
    """Long deadlines, 4 connections per address, a proxy at 127.0.0.3, a body buffer of 16 KiB a client."""
    yield from _serve(
        store_root,
        max_connections_per_address=4,
        trusted_proxies="127.0.0.3",
        max_body_bytes=16384,
        body_buffer_per_address_bytes=16384,
        body_buffer_bytes=1 << 20,
    )


# -- deadlines -------------------------------------------------------------------------------------------
def test_partial_headers_get_408_after_the_header_deadline(short_deadlines: str) -> None:
    sock = connect_from("127.0.0.2", short_deadlines)
    sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-Ty")
    status, headers, body = parse(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close"
    assert body["error"]["code"] == "header_timeout"  # type: ignore[index]
    assert metric(short_deadlines, "connection", "408") >= 1


def test_a_silent_connection_is_closed_after_the_keep_alive_timeout(short_deadlines: str) -> None:
    sock = connect_from("127.0.0.2", short_deadlines)
    assert read_until_closed(sock) == b""  # no request began: closed without an answer


def test_a_partial_body_gets_408_after_the_body_deadline(short_deadlines: str) -> None:
    before = metric(short_deadlines, "/v1/domains/{domain}/classify", "408")
    sock = connect_from("127.0.0.2", short_deadlines)
    sock.sendall(request_head(1000) + b"\x89PNG\r\n\x1a\n\0\0")
    status, headers, body = parse(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close"
    assert body["error"]["code"] == "body_timeout"  # type: ignore[index]
    assert metric(short_deadlines, "/v1/domains/{domain}/classify", "408") == before + 1


def test_a_well_behaved_request_is_answered_under_short_deadlines(short_deadlines: str) -> None:
    assert classify(short_deadlines).status_code == 200


# -- answers in one write ---------------------------------------------------------------------------------
def test_a_head_request_is_answered_and_the_connection_goes_on(capped: str) -> None:
    """A HEAD answer has no body to join its head: the held head is written at the end of the event
    loop's turn, and the connection carries the next request."""
    sock = connect_from("127.0.0.1", capped)
    sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 405"), head  # FastAPI's GET routes do not take HEAD
    assert int(parse(head)[1]["content-length"]) > 0  # the length of a body HEAD does not send
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    status, _, body = parse(read_response(sock))
    assert status == 200 and body["status"] == "ok", body
    sock.close()


# -- slots, connection caps, proxies ---------------------------------------------------------------------
def test_idle_sockets_mid_body_leave_classification_and_readiness_alone(capped: str) -> None:
    """256 sockets whose bodies the app is reading (the default 256 in-flight slots, were they taken
    before the body arrived) from 64 attacker addresses, 4 each: 127.0.0.1 is still served."""
    with ExitStack() as stack:
        for i in range(256):
            address = f"127.0.0.{10 + i // 4}"
            stack.callback(reading_body(address, capped).close)
        answer = classify(capped)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{capped}/readyz", timeout=WAIT_S).status_code == 200


def test_the_per_address_cap_refuses_a_flood_from_one_address_only(capped: str) -> None:
    with ExitStack() as stack:
        for _ in range(4):
            stack.callback(connect_from("127.0.0.2", capped).close)
        refused = connect_from("127.0.0.2", capped)
        stack.callback(refused.close)
        status, headers, body = parse(read_until_closed(refused))
        assert status == 429 and "retry-after" in headers
        assert body["error"]["code"] == "too_many_connections"  # type: ignore[index]
        # the limit that refused it, by the name an operator sets it with
        assert "4 connections" in body["error"]["message"]  # type: ignore[index]
        assert "MD_MAX_CONNECTIONS_PER_ADDRESS" in body["error"]["message"]  # type: ignore[index]
        assert classify(capped).status_code == 200  # 127.0.0.1 is not refused


def test_x_forwarded_for_names_the_client_only_from_a_trusted_proxy(capped: str) -> None:
    with ExitStack() as stack:
        # Through the proxy: 4 requests in progress for 10.0.0.5 on 4 of the proxy's connections
        # (the proxy's own connections are never capped).
        for _ in range(4):
            stack.callback(reading_body("127.0.0.3", capped, extra="X-Forwarded-For: 10.0.0.5\r\n").close)
        fifth = connect_from("127.0.0.3", capped)
        stack.callback(fifth.close)
        fifth.sendall(request_head(1000, extra="X-Forwarded-For: 10.9.9.9, 10.0.0.5\r\n"))
        status, _, body = parse(read_until_closed(fifth))
        assert status == 429, body
        assert "10.0.0.5" in body["error"]["message"]  # type: ignore[index]
        other = connect_from("127.0.0.3", capped)  # another client behind the same proxy is served
        stack.callback(other.close)
        other.sendall(request_head(len(PNG), extra="X-Forwarded-For: 10.0.0.6\r\n") + PNG)
        assert parse(read_response(other))[0] == 200

        # Not from a proxy: the header is ignored, the peer address is capped however it claims to vary.
        for i in range(4):
            sock = connect_from("127.0.0.4", capped)
            stack.callback(sock.close)
            sock.sendall(request_head(1000, extra=f"X-Forwarded-For: 10.1.0.{i}\r\n"))
        flood = connect_from("127.0.0.4", capped)
        stack.callback(flood.close)
        flood.sendall(request_head(1000, extra="X-Forwarded-For: 10.1.0.99\r\n"))
        assert parse(read_until_closed(flood))[0] == 429


def test_one_clients_bodies_cannot_take_the_body_buffer(capped: str) -> None:
    with ExitStack() as stack:
        stack.callback(reading_body("127.0.0.5", capped, length=16384).close)  # its whole share
        second = connect_from("127.0.0.5", capped)
        stack.callback(second.close)
        second.sendall(request_head(100, extra="Expect: 100-continue\r\n"))
        status, headers, body = parse(read_response(second))
        assert status == 503 and headers["retry-after"] == "1", body
        assert body["error"]["code"] == "body_buffer_full"  # type: ignore[index]
        assert classify(capped).status_code == 200  # other clients' bodies still fit


def test_a_client_gone_mid_body_is_counted_as_a_disconnect(capped: str) -> None:
    # Our request's own ID picks its line out: under load another test's socket can close meanwhile.
    request_id = uuid.uuid4().hex
    records: list[logging.LogRecord] = []
    logged = threading.Event()

    def ours(record: logging.LogRecord) -> bool:
        return record.name == "server.requests" and getattr(record, "request_id", None) == request_id

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            if ours(record) and "disconnect" in record.getMessage():
                logged.set()

    handler = Capture(logging.DEBUG)
    requests_log = logging.getLogger("server.requests")
    level = requests_log.level
    requests_log.setLevel(logging.DEBUG)
    # uvicorn's loggers do not propagate to the root: its "Exception in ASGI application" is on its own.
    loggers = [logging.getLogger(), logging.getLogger("uvicorn.error"), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        before = metric(capped, "/v1/domains/{domain}/classify", "disconnect")
        reading_body("127.0.0.6", capped, extra=f"X-Request-Id: {request_id}\r\n").close()
        assert logged.wait(WAIT_S), "no request line logged for the disconnect"
        # The app's task ends after its request line; a later request's line proves it has ended.
        assert metric(capped, "/v1/domains/{domain}/classify", "disconnect") >= before + 1
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        requests_log.setLevel(level)
    lines = [r for r in records if ours(r)]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG and "disconnect" in lines[0].getMessage()
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert metric(capped, "/v1/domains/{domain}/classify", "500") == 0


# -- the multi-process server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frontend_process(store_root: Path) -> Iterator[str]:
    """The supervisor with one front end, short header deadline."""
    from adapters_store import LocalStore

    running = start_processes(LocalStore(store_root), workers=1, header_timeout_s=SHORT_S)
    yield running.url
    assert running.stop() == 0


def test_front_end_processes_apply_the_header_deadline(frontend_process: str) -> None:
    sock = connect_from("127.0.0.2", frontend_process)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: te")
    status, _, body = parse(read_until_closed(sock))
    assert status == 408 and body["error"]["code"] == "header_timeout"  # type: ignore[index]
    assert classify(frontend_process).status_code == 200


def test_an_answer_arrives_in_one_piece(frontend_process: str) -> None:
    """Head and body in one write (`server.http_protocol._HeadHoldingTransport`): a reader waiting on the
    socket gets the whole answer from one recv(), every time. With the head written apart (uvicorn's
    own way) the first recv() returns the head alone about once in ten or twenty answers here."""
    sock = connect_from("127.0.0.1", frontend_process)
    for _ in range(50):  # keep-alive: each answer on its own
        sock.sendall(request_head(len(PNG)) + PNG)
        first = sock.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), first
        assert len(body) == int(parse(head)[1]["content-length"]), f"the first recv() held {first!r}"
        assert json.loads(body)["results"]
    sock.close()


# -- the arithmetic ------------------------------------------------------------------------------------------
def test_global_limits_are_split_over_the_front_ends() -> None:
    settings = Settings(workers=3, max_connections=100, body_buffer_bytes=3 * 16 * 2**20 + 1)
    limits = ConnectionLimits.for_frontend(settings)
    assert limits.max_connections == 34  # ceil(100 / 3)
    assert limits.body_buffer_bytes == 16 * 2**20 + 1
    assert limits.max_connections_per_address == settings.max_connections_per_address  # per front end
    with pytest.raises(ValueError, match="at least MD_MAX_BODY_BYTES"):
        ConnectionLimits.for_frontend(Settings(workers=4, body_buffer_bytes=32 * 2**20))


def test_the_guard_refuses_what_passes_its_limits_and_counts_nothing_for_it() -> None:
    limits = ConnectionLimits.for_frontend(
        Settings(workers=1, max_connections=3, max_connections_per_address=2, max_body_bytes=10,
                 body_buffer_bytes=25, body_buffer_per_address_bytes=15, trusted_proxies="10.1.0.0/16,10.4.0.0/16")
    )  # fmt: skip
    guard = ConnectionGuard(limits)
    assert guard.open_connection("a", proxy=False) is None
    assert guard.open_connection("a", proxy=False) is None
    refusal = guard.open_connection("a", proxy=False)
    assert refusal is not None and refusal.status == 429
    assert guard.open_connection("b", proxy=False) is None
    full = guard.open_connection("c", proxy=False)
    assert full is not None and full.status == 503
    assert guard.open_connection("10.1.2.3", proxy=True) is None  # a proxy is never refused
    guard.close_connection("a", proxy=False)
    assert guard.connections == 3  # a, b and the proxy's, which counts in the total
    assert guard.open_connection("d", proxy=False) is not None
    guard.close_connection("10.1.2.3", proxy=True)
    assert guard.open_connection("a", proxy=False) is None
    assert guard.by_address == {"a": 2, "b": 1}
    # Bodies: 15 per address, 25 in all.
    assert guard.reserve_body("a", 15) is None
    over = guard.reserve_body("a", 1)
    assert over is not None and over.status == 503 and "share" in over.message
    assert guard.reserve_body("b", 10) is None
    whole = guard.reserve_body("c", 1)
    assert whole is not None and "fill the body buffer" in whole.message
    guard.release_body("a", 15)
    assert guard.reserve_body("c", 1) is None and guard.body_bytes == 11
    # X-Forwarded-For: the last address that is not a trusted proxy.
    assert guard.is_trusted_proxy("10.1.2.3") and not guard.is_trusted_proxy("127.0.0.1")
    assert guard.forwarded_client("10.1.2.3", "192.0.2.7, 10.4.4.4") == "192.0.2.7"
    assert guard.forwarded_client("10.1.2.3", "") == "10.1.2.3"
