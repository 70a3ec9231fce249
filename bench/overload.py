"""Overload: offered load at 10x capacity against a real uvicorn (a subprocess on 127.0.0.1).

First the capacity is measured with closed-loop clients (each sends its next request when the last one
is answered). Then requests are offered open-loop at `--factor` times that rate (a new request every
1/rate seconds whatever the answers) for `--duration` seconds. Each request carries `--images` images so
that the server, not this Python client, is the bottleneck. Reported: admitted (200) and refused (429,
with Retry-After) counts, any other status, the p50/p99 latency of admitted requests, the server's
queue depth (sampled from /metrics) against its limit, and its RSS at idle and at peak.

    python -m bench.overload                      # ~1 minute
    python -m bench.overload --factor 10 --duration 30
The last line is one JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from adapters_store.limits import MiB
from bench.harness import ServerProcess, build_store, pct, random_images


def queue_depth(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("md_queue_depth "):
            return float(line.split()[1])
    return float("nan")


async def run(args: argparse.Namespace, server: ServerProcess) -> dict[str, object]:
    url = server.url
    images = [base64.b64encode(b).decode() for b in random_images(args.images, args.size)]
    body = json.dumps({"images": images, "top_k": 3}).encode()
    domains = [f"d{i}" for i in range(args.domains)]
    headers = {"Content-Type": "application/json"}
    # Idle connections expire before uvicorn's 5 s keep-alive timeout (else the keep-alive race: ReadErrors).
    limits = httpx.Limits(
        max_connections=args.connections, max_keepalive_connections=args.connections, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        for d in domains:  # every domain resident before timing
            (
                await client.post("/v1/classify", content=body, headers={**headers, "X-Domain": d})
            ).raise_for_status()

        # Capacity: closed loop.
        done = 0
        until = time.monotonic() + args.capacity_seconds

        async def closed(wid: int) -> None:
            nonlocal done
            while time.monotonic() < until:
                r = await client.post(
                    "/v1/classify", content=body, headers={**headers, "X-Domain": domains[wid % len(domains)]}
                )
                if r.status_code == 200:
                    done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(closed(w) for w in range(args.capacity_clients)))
        capacity = done / (time.monotonic() - t0)
        idle_rss = server.rss_bytes() / MiB

        # Overload: open loop at factor x capacity.
        rate = capacity * args.factor
        statuses: Counter[str] = Counter()
        admitted: list[float] = []
        refused_latency: list[float] = []
        missing_retry_after = 0
        peak_rss = idle_rss
        peak_queue = 0.0
        sampling = True

        async def sample() -> None:
            nonlocal peak_rss, peak_queue
            async with httpx.AsyncClient(base_url=url, timeout=10) as side:
                while sampling:
                    peak_rss = max(peak_rss, server.rss_bytes() / MiB)
                    with contextlib.suppress(httpx.TransportError):
                        peak_queue = max(peak_queue, queue_depth((await side.get("/metrics")).text))
                    await asyncio.sleep(0.25)

        async def one(i: int) -> None:
            nonlocal missing_retry_after
            started = time.monotonic()
            try:
                r = await client.post(
                    "/v1/classify", content=body, headers={**headers, "X-Domain": domains[i % len(domains)]}
                )
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                return
            latency = time.monotonic() - started
            statuses[str(r.status_code)] += 1
            if r.status_code == 200:
                admitted.append(latency)
            elif r.status_code == 429:
                refused_latency.append(latency)
                if "retry-after" not in r.headers:
                    missing_retry_after += 1

        sampler = asyncio.create_task(sample())
        tasks = []
        start = time.monotonic()
        i = 0
        while (now := time.monotonic()) - start < args.duration:
            due = start + i / rate
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(i)))
            i += 1
        offered_seconds = time.monotonic() - start
        await asyncio.gather(*tasks)
        sampling = False
        await sampler

    def ms(values: list[float], q: float) -> float:
        return round(pct(values, q) * 1e3, 1)

    return {
        "capacity_requests_per_s": round(capacity, 1),
        "capacity_images_per_s": round(capacity * args.images, 1),
        "factor": args.factor,
        "offered_requests_per_s": round(i / offered_seconds, 1),
        "offered_ratio_to_capacity": round(i / offered_seconds / capacity, 2),
        "requests": i,
        "statuses": dict(statuses),
        "admitted": len(admitted),
        "refused_429": statuses.get("429", 0),
        "refused_without_retry_after": missing_retry_after,
        "five_xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "admitted_p50_ms": ms(admitted, 50),
        "admitted_p99_ms": ms(admitted, 99),
        "refused_p99_ms": ms(refused_latency, 99),
        "max_queue": args.max_queue,
        "peak_queue_depth": peak_queue,
        "queue_bounded": peak_queue <= args.max_queue,
        "rss_idle_mib": round(idle_rss, 1),
        "rss_peak_mib": round(peak_rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factor", type=float, default=10.0, help="offered load / measured capacity")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of overload")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--capacity-clients", type=int, default=8)
    parser.add_argument("--images", type=int, default=32, help="images per request")
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=128, help="the server's MD_MAX_QUEUE (images)")
    parser.add_argument("--connections", type=int, default=512)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=float, default=0.25)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        store_dir = Path(tmp) / "store"
        build_store(store_dir, args.width, args.size, args.domains, 10)
        env = {
            "MD_MAX_QUEUE": str(args.max_queue),
            "MD_MAX_BATCH_SIZE": "32",
            "MD_BANK_SLOTS": str(args.domains),
            "MD_DEVICE": "cpu",
        }
        server = ServerProcess(store_dir, env, log_level="error")
        try:
            asyncio.run(server.wait_ready_async())
            summary = asyncio.run(run(args, server))
        finally:
            server.stop()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
