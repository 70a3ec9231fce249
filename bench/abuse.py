"""Abuse: well-behaved clients' latency, errors and throughput while attackers try to stall the server.

The multi-process server (`multidomain serve`'s supervisor, on 127.0.0.1) is measured twice in one run,
the same well-behaved load each time (`--clients` closed-loop clients from 127.0.0.1, each sending a
small PNG to one of `--domains` domains): first alone, then while four attackers run beside it, each
from its own loopback address, bounded in count (below) and in time (the phase's `--duration`), all in
a process of their own (their work must not slow the well-behaved clients' event loop):

| attacker | from | what it does |
| --- | --- | --- |
| idle-socket | 127.0.0.2 | `--idle-sockets` connections that send a classify request's headers and 10 bytes of its body, then wait; reconnect when closed |
| slow-body | 127.0.0.3 | `--slow-bodies` connections that send 15 MiB of a 16 MiB body, then wait; reconnect when closed |
| scan-bomb | 127.0.0.4 | `--bomb-clients` clients posting a progressive JPEG whose last scan is repeated `--scan-repeats` times |
| pixel-flood | 127.0.0.5 | `--flood-clients` clients posting a 16-bit grayscale PNG just under the server's pixel limit |

Reported for the well-behaved clients, attack-free and under attack: p50/p99 latency, the share of
answers other than 200 (429 counted), throughput; for the server: the peak PSS of all its processes in
each phase (sampled every 0.25 s), against the attack-free peak plus the configured body buffer
(`MD_BODY_BUFFER_BYTES`); for each attacker, what it got (statuses, connections closed on it).

    python -m bench.abuse                          # about 2 x 30 s of load, plus start-up
    python -m bench.abuse --duration 60 --workers 2
    python -m bench.abuse --attacks idle_socket,slow_body    # the connection attackers only

The last line is one JSON summary with the bar's verdicts (issue 14): under attack p99 <= 3x the
attack-free p99, <= 1% of answers other than 200, throughput >= 70% of the attack-free run, peak PSS <=
attack-free peak + the body buffer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import multiprocessing
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from adapters_store.limits import MiB
from bench.harness import SupervisorProcess, build_store, cpu_seconds, pct, random_images
from domain_format.preprocess import DEFAULT_MAX_PIXELS
from server.settings import Settings

IDLE_FROM, SLOW_FROM, BOMB_FROM, FLOOD_FROM = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
ATTACKS = ("idle_socket", "slow_body", "scan_bomb", "pixel_flood")
_RECONNECT_PAUSE_S = 1.0
"""An attacker whose connection was closed or refused connects again after this (what Retry-After says;
a bounded rate: the bench measures stalling, not a connection flood)."""


# -- hostile payloads ----------------------------------------------------------------------------------
def scan_bomb(repeats: int, side: int = 2048) -> bytes:
    """A progressive JPEG whose last scan is repeated `repeats` times before EOI. Each repeat is decoded
    again over the whole image, so the work grows with repeats x pixels while the bytes barely grow: a flat
    image (a noisy corner) keeps each scan small (about 650 KB for 1000 repeats at 2048 px, 1.8 s to
    decode here against 0.2 s without them)."""
    pixels = np.full((side, side, 3), 120, dtype=np.uint8)
    pixels[:64, :64] = np.random.default_rng(1).integers(0, 256, (64, 64, 3))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", progressive=True, quality=90)
    data = out.getvalue()
    last_scan, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    return data[:end] + data[last_scan:end] * repeats + data[end:]


def pixel_flood(max_pixels: int) -> bytes:
    """A 16-bit grayscale PNG of nearly `max_pixels` pixels (zeros: a few hundred KB on the wire)."""
    side = math.isqrt(int(max_pixels * 0.99))
    out = io.BytesIO()
    Image.fromarray(np.zeros((side, side), dtype=np.uint16)).save(out, format="PNG")
    return out.getvalue()


def request_head(host: str, port: int, length: int, domain: str) -> bytes:
    return (
        f"POST /v1/domains/{domain}/classify HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def status_of(data: bytes) -> str:
    """The status of the first response in `data`, or what happened instead."""
    if data.startswith(b"HTTP/1.1 "):
        return data[9:12].decode()
    return "closed" if not data else "garbled"


# -- the load ------------------------------------------------------------------------------------------
@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    peak_pss: int = 0
    server_cpu_s: float = 0.0
    """CPU seconds of all server processes over the phase (its well-behaved load and its attackers)."""

    def p99_ms(self) -> float:
        return pct(self.latencies, 99) * 1e3

    def non_200_share(self) -> float:
        answers = sum(self.statuses.values())
        return (answers - self.statuses.get("200", 0)) / answers if answers else 1.0

    def throughput(self) -> float:
        return self.statuses.get("200", 0) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "requests": sum(self.statuses.values()),
            "statuses": dict(self.statuses),
            "p50_ms": round(pct(self.latencies, 50) * 1e3, 1),
            "p99_ms": round(self.p99_ms(), 1),
            "non_200_share": round(self.non_200_share(), 4),
            "throughput_per_s": round(self.throughput(), 2),
            "peak_pss_mib": round(self.peak_pss / MiB, 1),
            "server_cpu_s": round(self.server_cpu_s, 1),
        }


async def well_behaved(
    url: str, images: list[bytes], domains: list[str], clients: int, until: float, phase: Phase
) -> None:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(worker: int) -> None:
            i = worker
            while time.monotonic() < until:
                started = time.monotonic()
                try:
                    r = await client.post(
                        f"/v1/domains/{domains[i % len(domains)]}/classify",
                        content=images[i % len(images)],
                        headers={"Content-Type": "image/png"},
                    )
                    phase.statuses[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    phase.statuses[type(exc).__name__] += 1
                phase.latencies.append(time.monotonic() - started)
                i += clients

        await asyncio.gather(*(one(w) for w in range(clients)))


async def sample_memory(server: SupervisorProcess, phase: Phase, stop: asyncio.Event) -> None:
    while not stop.is_set():
        phase.peak_pss = max(phase.peak_pss, await asyncio.to_thread(server.pss_bytes))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


# -- attackers -----------------------------------------------------------------------------------------
async def holding_socket(
    host: str, port: int, source: str, payload: bytes, until: float, outcomes: Counter[str]
) -> None:
    """Connect from `source`, send `payload`, read until the server closes; again, until `until`."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        except OSError as exc:
            outcomes[f"connect_{type(exc).__name__}"] += 1
            await asyncio.sleep(_RECONNECT_PAUSE_S)
            continue
        try:
            writer.write(payload)
            await writer.drain()
            # The first answer (408, 429, 503...) or the close, then hold on until the server closes.
            first = await asyncio.wait_for(reader.read(65536), timeout=max(0.0, until - time.monotonic()))
            outcomes[status_of(first)] += 1
            if first:
                await asyncio.wait_for(reader.read(), timeout=max(0.0, until - time.monotonic()))
                outcomes["closed_by_server"] += 1
        except TimeoutError:
            outcomes["held_to_the_end"] += 1
        except OSError as exc:
            outcomes[type(exc).__name__] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await asyncio.sleep(_RECONNECT_PAUSE_S)


async def posting_client(
    url: str,
    source: str,
    body: bytes,
    media_type: str,
    domain: str,
    until: float,
    outcomes: Counter[str],
    seconds: list[float],
) -> None:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=300) as client:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                r = await client.post(
                    f"/v1/domains/{domain}/classify", content=body, headers={"Content-Type": media_type}
                )
                outcomes[str(r.status_code)] += 1
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
                await asyncio.sleep(_RECONNECT_PAUSE_S)
            seconds.append(time.monotonic() - started)


# -- the run -------------------------------------------------------------------------------------------
async def attack(
    args: argparse.Namespace, url: str, domain: str, until: float, payloads: dict[str, bytes]
) -> dict[str, object]:
    """Every attacker of `args.attacks` until `until` (time.monotonic, the same clock in every process)."""
    host, port = url.removeprefix("http://").split(":")
    outcomes: dict[str, Counter[str]] = {}
    seconds: dict[str, list[float]] = {}
    tasks = []
    for name, source, count in (
        ("idle_socket", IDLE_FROM, args.idle_sockets),
        ("slow_body", SLOW_FROM, args.slow_bodies),
    ):
        if name in args.attacks:
            outcomes[name] = Counter()
            tasks += [
                holding_socket(host, int(port), source, payloads[name], until, outcomes[name])
                for _ in range(count)
            ]
    for name, source, media_type, count in (
        ("scan_bomb", BOMB_FROM, "image/jpeg", args.bomb_clients),
        ("pixel_flood", FLOOD_FROM, "image/png", args.flood_clients),
    ):
        if name in args.attacks:
            outcomes[name], seconds[name] = Counter(), []
            tasks += [
                posting_client(
                    url, source, payloads[name], media_type, domain, until, outcomes[name], seconds[name]
                )
                for _ in range(count)
            ]
    await asyncio.gather(*tasks)
    report: dict[str, object] = {name: dict(c) for name, c in outcomes.items()}
    for name, values in seconds.items():
        report[f"{name}_p50_s"] = round(pct(values, 50), 2)
    report["bytes"] = {name: len(payloads[name]) for name in args.attacks}
    return report


def attacker_process(args: argparse.Namespace, url: str, domain: str, channel: Connection) -> None:
    """The attackers' own process, so that their work (720 MiB of slow bodies, reconnections) does not
    slow the well-behaved clients' event loop: builds the payloads, says it is ready, receives the end
    time, attacks, sends back what the attackers got."""
    host, port = url.removeprefix("http://").split(":")
    payloads = {
        "idle_socket": request_head(host, int(port), 1000, domain) + b"\x89PNG\r\n\x1a\n\0\0",
        "slow_body": request_head(host, int(port), 16 * MiB, domain) + bytes(15 * MiB),
        "scan_bomb": scan_bomb(args.scan_repeats),
        "pixel_flood": pixel_flood(args.max_pixels),
    }
    channel.send("ready")
    until = channel.recv()
    cpu = time.process_time()
    report = asyncio.run(attack(args, url, domain, until, payloads))
    report["attackers_cpu_s"] = round(time.process_time() - cpu, 1)
    channel.send(report)


async def run_phase(
    args: argparse.Namespace,
    server: SupervisorProcess,
    images: list[bytes],
    domains: list[str],
    attackers: bool,
) -> tuple[Phase, dict[str, object]]:
    phase, stop = Phase(), asyncio.Event()
    child = None
    if attackers:
        ours, theirs = multiprocessing.get_context("spawn").Pipe()
        child = multiprocessing.get_context("spawn").Process(
            target=attacker_process, args=(args, server.url, domains[0], theirs), daemon=True
        )
        child.start()
        assert await asyncio.to_thread(ours.recv) == "ready"
    sampler = asyncio.create_task(sample_memory(server, phase, stop))
    server_cpu = sum(cpu_seconds(pid) for pid in server.processes())
    start = time.monotonic()
    until = start + args.duration
    report: dict[str, object] = {}
    if child is not None:
        ours.send(until)
    await well_behaved(server.url, images, domains, args.clients, until, phase)
    phase.seconds = time.monotonic() - start
    phase.server_cpu_s = sum(cpu_seconds(pid) for pid in server.processes()) - server_cpu
    if child is not None:
        report = await asyncio.to_thread(ours.recv)
        child.join()
    stop.set()
    await sampler
    return phase, report


async def measure(args: argparse.Namespace, server: SupervisorProcess) -> dict[str, object]:
    images = random_images(16, args.size)
    domains = [f"d{i}" for i in range(args.domains)]
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        for d in domains:  # every domain resident before timing
            r = await client.post(
                f"/v1/domains/{d}/classify", content=images[0], headers={"Content-Type": "image/png"}
            )
            r.raise_for_status()
    calm, _ = await run_phase(args, server, images, domains, attackers=False)
    attacked, attackers = await run_phase(args, server, images, domains, attackers=True)
    budget = args.body_buffer_mib * MiB
    verdicts = {
        "p99_within_3x": attacked.p99_ms() <= 3 * calm.p99_ms(),
        "non_200_within_1pct": attacked.non_200_share() <= 0.01,
        "throughput_within_70pct": attacked.throughput() >= 0.7 * calm.throughput(),
        "memory_within_budget": attacked.peak_pss <= calm.peak_pss + budget,
    }
    return {
        "workers": args.workers,
        "clients": args.clients,
        "duration_s": args.duration,
        "body_buffer_mib": args.body_buffer_mib,
        "attacks": args.attacks,
        "attack_free": calm.summary(),
        "under_attack": attacked.summary(),
        "p99_ratio": round(attacked.p99_ms() / calm.p99_ms(), 2),
        "throughput_ratio": round(attacked.throughput() / max(calm.throughput(), 1e-9), 2),
        "pss_over_attack_free_mib": round((attacked.peak_pss - calm.peak_pss) / MiB, 1),
        "attackers": attackers,
        "bar": verdicts,
        "passed": all(verdicts.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of each phase")
    parser.add_argument("--clients", type=int, default=32, help="well-behaved closed-loop clients")
    parser.add_argument("--workers", type=int, default=None, help="front ends (default: the server's)")
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument(
        "--attacks",
        type=lambda v: [a.strip() for a in v.split(",") if a.strip()],
        default=list(ATTACKS),
        help=f"which attackers run, comma-separated (default all: {','.join(ATTACKS)})",
    )
    parser.add_argument("--idle-sockets", type=int, default=256)
    parser.add_argument("--slow-bodies", type=int, default=48)
    parser.add_argument("--bomb-clients", type=int, default=2)
    parser.add_argument("--scan-repeats", type=int, default=1000)
    parser.add_argument("--flood-clients", type=int, default=2)
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="the server's MD_MAX_IMAGE_PIXELS"
    )
    parser.add_argument(
        "--body-buffer-mib",
        type=int,
        default=Settings().body_buffer_bytes // MiB,
        help="the server's MD_BODY_BUFFER_BYTES, in MiB",
    )
    parser.add_argument("--size", type=int, default=32, help="domains' input side (and the PNGs')")
    parser.add_argument("--width", type=float, default=0.25, help="resnet26 width")
    args = parser.parse_args()
    if unknown := set(args.attacks) - set(ATTACKS):
        parser.error(f"unknown attacks {sorted(unknown)}: choose from {', '.join(ATTACKS)}")

    with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:
        store_dir = Path(tmp) / "store"
        build_store(store_dir, args.width, args.size, args.domains, 10)
        env = {
            "MD_DEVICE": "cpu",
            "MD_BANK_SLOTS": str(args.domains),
            "MD_MAX_IMAGE_PIXELS": str(args.max_pixels),
            "MD_BODY_BUFFER_BYTES": str(args.body_buffer_mib * MiB),
        }
        workers = args.workers or Settings().frontends()
        args.workers = workers
        server = SupervisorProcess(store_dir, env, workers=workers)
        try:
            server.wait_ready()
            summary = asyncio.run(measure(args, server))
        finally:
            server.stop()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
