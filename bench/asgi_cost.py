"""The app's own CPU per answer: the ASGI stack (middleware, routing, dependencies, the error handlers)
called in this process, no sockets, no engine, for answers that need none.

Each kind of answer is timed over `--requests` calls in rounds taken in turn with the other kinds, and
reported (the median round) in microseconds of CPU and as a ratio to a `GET /healthz` in the same run:
the cheapest route, what the stack costs around any answer. Refusals matter most: under overload or
attack most answers are 429s and 4xx, and each one costs a front end CPU that its admitted requests
then lack.

    python -m bench.asgi_cost
The last line is one JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from types import SimpleNamespace
from typing import Any

from server.app import create_app
from server.settings import Settings

PNG = b"\x89PNG\r\n\x1a\n" + bytes(1000)  # the 429 is answered before the image is read

# (name, status, method, path, headers, body): answers the app gives without an engine
ANSWERS: list[tuple[str, int, str, str, dict[str, str], bytes]] = [
    ("healthz", 200, "GET", "/healthz", {}, b""),
    ("no domain", 400, "POST", "/v1/classify", {"content-type": "image/png"}, PNG),
    ("no route", 404, "GET", "/v1/nothing", {}, b""),
    ("method", 405, "POST", "/healthz", {}, b""),
    ("media type", 415, "POST", "/v1/classify", {"x-domain": "d0", "content-type": "text/plain"}, b"x"),
    ("queue full", 429, "POST", "/v1/classify", {"x-domain": "d0", "content-type": "image/png"}, PNG),
]


async def cpu_per_answer(
    app: Any, method: str, path: str, headers: dict[str, str], body: bytes, n: int
) -> tuple[float, int]:
    """CPU seconds per call of `app` for this request, and the status it answered."""
    raw = [(k.encode(), v.encode()) for k, v in {**headers, "content-length": str(len(body))}.items()]
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    def scope() -> dict[str, Any]:
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": raw, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "state": {},
        }  # fmt: skip

    for _ in range(max(1, n // 10)):  # warm-up: this answer's code paths and caches
        await app(scope(), receive, send)
    start = time.process_time()
    for _ in range(n):
        await app(scope(), receive, send)
    return (time.process_time() - start) / n, status


async def measure(n: int, rounds: int = 10) -> dict[str, dict[str, float]]:
    """Every kind of answer timed in each of `rounds` rounds of n / rounds calls, taken in turn (this
    machine's speed drifts within a run); per kind the median round."""
    settings = Settings()
    app = create_app(settings)
    # The routes timed here read only the settings and the in-flight count; 0 slots: every classify
    # that gets as far as admission is refused (429).
    app.state.frontend = SimpleNamespace(settings=settings, requests_in_flight=0, max_requests_in_flight=0)
    samples: dict[str, list[float]] = {name: [] for name, *_ in ANSWERS}
    for _ in range(rounds):
        for name, expected, method, path, headers, body in ANSWERS:
            seconds, status = await cpu_per_answer(app, method, path, headers, body, max(1, n // rounds))
            if status != expected:  # timing another answer than the one named would mislead
                raise RuntimeError(f"{name}: {method} {path} answered {status}, not {expected}")
            samples[name].append(seconds)
    results = {
        name: {"status": status, "cpu_us": statistics.median(samples[name]) * 1e6}
        for name, status, *_ in ANSWERS
    }
    base = results["healthz"]["cpu_us"]
    for row in results.values():
        row["over_healthz"] = row["cpu_us"] / base
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=5000, help="calls per kind of answer, in 10 rounds")
    args = p.parse_args()
    results = asyncio.run(measure(args.requests))
    for name, row in results.items():
        cost = f"{row['cpu_us']:6.0f} us of CPU  {row['over_healthz']:.2f}x healthz"
        print(f"{int(row['status'])} {name:12s} {cost}")
    print(json.dumps({"bench": "asgi_cost", "requests": args.requests, "answers": results}))


if __name__ == "__main__":
    main()
