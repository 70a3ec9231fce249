"""The load generators' lean HTTP client (`bench.harness.KeepAliveConnection`) against a real socket server
on loopback: keep-alive reuse, both body framings, a server's close, and a response cut short."""

from __future__ import annotations

import asyncio

import pytest

from bench.harness import KeepAliveConnection, http_request

REPLIES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
    b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nsec\r\n3\r\nond\r\n0\r\n\r\n",
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy",
    b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\ncut short",  # then the server closes
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast",
]


async def _scenario() -> tuple[list[object], list[bytes], int]:
    requests: list[bytes] = []
    connections = 0
    replies = iter(REPLIES)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.startswith(b"Content-Length")
                )
                requests.append(head + await reader.readexactly(length))
                reply = next(replies)
                writer.write(reply)
                await writer.drain()
                if b"close" in reply or b"cut short" in reply:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = KeepAliveConnection("127.0.0.1", port, timeout=30)
    outcomes: list[object] = []
    async with server:
        for i in range(len(REPLIES)):
            try:
                outcomes.append(await client.send(http_request("POST", "/x", {"X-Domain": f"d{i}"}, b"body")))
            except ConnectionResetError as exc:
                outcomes.append(type(exc))
        client.close()
    return outcomes, requests, connections


def test_keep_alive_client_reuses_its_connection_and_survives_closes() -> None:
    outcomes, requests, connections = asyncio.run(_scenario())
    assert outcomes == [
        (200, b"first"),
        (201, b"second"),
        (429, b"busy"),
        ConnectionResetError,
        (200, b"last"),
    ]
    # one connection for the first three (kept alive), a new one after the server's close, another after
    # the cut-short response
    assert connections == 3
    assert requests[0] == (
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nX-Domain: d0\r\n\r\nbody"
    )
    assert [r.split(b"X-Domain: ")[1][:2] for r in requests] == [b"d0", b"d1", b"d2", b"d3", b"d4"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_http_request_frames_its_body(method: str) -> None:
    raw = http_request(method, "/v1/classify", {"Content-Type": "image/png"}, b"\x89PNG")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(f"{method} /v1/classify HTTP/1.1\r\n".encode()) and b"Content-Length: 4" in head
    assert body == b"\x89PNG"
