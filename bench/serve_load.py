"""Load benchmark of the multi-process server (`server.supervisor`: K front ends, one engine) on 127.0.0.1.

Measures, side by side in one run on the same model, resolution and batch size:
  1. the store -> bank load latency of a cold domain (the engine's own timing);
  2. for each K in --workers (front-end processes), --rounds times in turn: engine-only images/s (mixed-
     domain batches drawn from the same Zipf mix, no HTTP, in this process while the server idles; one
     thread per engine stream, as the server runs it), then end to end: N concurrent clients (asyncio,
     one keep-alive connection each, requests built once: `bench.harness.KeepAliveConnection`) over M
     domains with a Zipf mix, sending raw PNGs; each load slice counts from --settle-seconds after its
     start to its end (not the ramp, not the drain). Taking the two in turn makes their ratio compare
     one machine state (a VM with CPU steal drifts by 15% or more within minutes). Reported: both
     throughputs and their ratio, p50/p95/p99 latency, errors, the engine's busy fraction (of all its
     streams), front-end CPU ms per image, the load generator's own CPU share, RSS and PSS of every
     process; then cold-domain first-request latency against warm;
  3. resident memory (RSS of all the server's processes) with 1, 10 and 100 registered domains, 1 and 10
     resident.
The last line is one JSON summary.

    python -m bench.serve_load --quick          # a few minutes on 2 CPU cores
    python -m bench.serve_load --clients 32 --domains 10 --size 64 --width 1.0 --duration 60
"""

from __future__ import annotations

import os

# The server's OpenMP policy (server/__init__.py) for this process's engine-only figures too, set before
# torch loads: both sides of the ratio run the same way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httptools
import httpx
import torch

from adapters_store import LocalStore
from bench.harness import (
    KeepAliveConnection,
    SupervisorProcess,
    add_domains,
    build_store,
    cpu_seconds,
    http_request,
    pct,
    pss_bytes,
    random_images,
    rss_bytes,
    zipf_weights,
)
from server.engine import Engine, EngineConfig
from server.settings import Settings


# -- engine only -----------------------------------------------------------------------------------
class EngineOnly:
    """The engine as the server drives it, in this process, timed in slices: `engine.streams` threads,
    each one stream (`enter_stream`: its share of the intra-op threads) running mixed batches of --batch
    drawn from the Zipf mix back to back, on uint8 pixels the engine normalises (the server's work per
    batch). The load phase takes a slice beside each of its own (`--rounds`): on a VM with CPU steal the
    machine's speed drifts by 15% or more within minutes, so an engine-only figure taken minutes before
    the end-to-end one compares two machines."""

    def __init__(self, store_dir: Path, args: argparse.Namespace, weights: list[float]) -> None:
        config = EngineConfig(
            device=args.device, bank_slots=args.bank_slots, merged_cache=4, engine_streams=args.engine_streams,
            forward_split=args.forward_split, dtype=args.dtype, channels_last=args.channels_last,
        )  # fmt: skip
        self.engine = Engine(LocalStore(store_dir), config)
        self.keys = [self.engine.resolve(f"d{i}") for i in range(args.domains)]
        self.weights = weights
        self.batch = args.batch
        self.x = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8)
        for k in self.keys:
            self.engine.load(k)
        self.images = 0
        self.seconds = self.cpu_seconds = 0.0
        self.run(0.0)  # warm-up: every stream's first forwards (and every domain resident)
        self.images, self.seconds, self.cpu_seconds = 0, 0.0, 0.0

    def run(self, seconds: float) -> float:
        """Run every stream for `seconds` (at least three batches each); add to the totals; images/s."""
        streams = self.engine.streams
        batches = [0] * streams
        window: list[float] = []  # [start, stop, CPU seconds]: set once every stream is ready

        def open_window() -> None:
            now = time.perf_counter()
            # this process's CPU time: the streams' (the load generator is idle meanwhile)
            window[:] = [now, now + seconds, time.process_time()]

        start_together = threading.Barrier(streams, action=open_window)

        def stream(index: int) -> None:
            self.engine.enter_stream()
            rng = random.Random(1 + index + self.images)
            # one batch untimed, as each load slice's start is (--settle-seconds): threads that slept
            # through the load slice wake up and the caches refill
            self.engine.infer_pixels(rng.choices(self.keys, self.weights, k=self.batch), self.x, 5)
            start_together.wait()
            while time.perf_counter() < window[1] or batches[index] < 3:
                self.engine.infer_pixels(rng.choices(self.keys, self.weights, k=self.batch), self.x, 5)
                batches[index] += 1

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - window[0]
        self.cpu_seconds += time.process_time() - window[2]
        images = sum(batches) * self.batch
        self.images += images
        self.seconds += elapsed
        return images / elapsed


def bank_loads(store_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Store -> bank load latency of a cold domain (the engine's own timing): a 2-slot bank cycling over
    the domains evicts on every load."""
    cold = Engine(LocalStore(store_dir), EngineConfig(device=args.device, bank_slots=2, merged_cache=0))
    cold_keys = [cold.resolve(f"d{i}") for i in range(args.domains)]
    for k in cold_keys * 2:
        cold.load(k)
    loads = cold.stats.load_seconds[2:]  # skip the first two (cold caches)
    return {
        "bank_load_p50_ms": pct(loads, 50) * 1e3,
        "bank_load_p95_ms": pct(loads, 95) * 1e3,
        "bank_loads_measured": len(loads),
        "bank_bytes_per_slot": cold.bank_bytes() / 2,
    }


# -- the server ------------------------------------------------------------------------------------
_PER_ADDRESS_DEFAULT: int = Settings.model_fields["max_connections_per_address"].default


def start_server(
    store_dir: Path, args: argparse.Namespace, workers: int = 1, **env: str
) -> SupervisorProcess:
    return SupervisorProcess(
        store_dir,
        {
            "MD_BANK_SLOTS": str(args.bank_slots),
            "MD_MAX_BATCH_SIZE": str(args.batch),
            "MD_MAX_WAIT_MS": str(args.max_wait_ms),
            "MD_DEVICE": args.device,
            "MD_ENGINE_STREAMS": str(args.engine_streams),
            "MD_FORWARD_SPLIT": str(args.forward_split),
            "MD_DTYPE": args.dtype,
            "MD_CHANNELS_LAST": str(args.channels_last).lower(),
            "MD_ENGINE_JPEG_DECODE": str(args.engine_jpeg_decode).lower(),
            # every client, and the bench's metrics client, connects from 127.0.0.1: one address
            "MD_MAX_CONNECTIONS_PER_ADDRESS": str(max(_PER_ADDRESS_DEFAULT, args.clients + 8)),
            **env,
        },
        workers=workers,
    )


def _engine_busy_seconds(metrics_text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("md_engine_busy_seconds_total")
    )


async def load_phase(
    server: SupervisorProcess, args: argparse.Namespace, weights: list[float], engine: EngineOnly
) -> dict[str, object]:
    """--rounds load slices of the server, each after a slice of `engine` (engine only, in this process,
    the server idle), so the ratio of the two compares one machine state; then cold domains."""
    streams = engine.engine.streams  # the engine's busy fraction is of all of them (stream-seconds / S)
    url = server.url
    images = random_images(64, args.size, args.image_format.upper())
    names = [f"d{i}" for i in range(args.domains)]
    media = f"image/{args.image_format}"
    # every request the clients send, built once (the lean client: `bench.harness.KeepAliveConnection`)
    requests = {
        (name, i): http_request("POST", "/v1/classify", {"X-Domain": name, "Content-Type": media}, body)
        for name in names
        for i, body in enumerate(images)
    }
    host, port = url.removeprefix("http://").rsplit(":", 1)
    answers: list[tuple[float, float]] = []  # (when, latency) of every 200
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:  # metrics, cold domains

        async def one(connection: KeepAliveConnection, domain: str, image: int) -> None:
            t0 = time.perf_counter()
            try:
                status = str((await connection.send(requests[domain, image]))[0])
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                status = type(exc).__name__
            if status == "200":
                now = time.perf_counter()
                answers.append((now, now - t0))
            else:
                errors[status] = errors.get(status, 0) + 1

        async def worker(wid: int, until: float) -> None:
            rng = random.Random(wid)
            connection = KeepAliveConnection(host, int(port))
            try:
                while time.perf_counter() < until:
                    await one(connection, rng.choices(names, weights)[0], rng.randrange(len(images)))
            finally:
                connection.close()

        # warm-up: every domain once, then a short burst
        first = KeepAliveConnection(host, int(port))
        for name in names:
            await one(first, name, 0)
        first.close()
        warm_until = time.perf_counter() + args.warmup_seconds
        await asyncio.gather(*(worker(1000 + w, warm_until) for w in range(args.clients)))
        answers.clear()
        errors.clear()
        latencies: list[float] = []  # of the answers in the slices' steady windows
        procs = server.processes()
        cpu = dict.fromkeys(procs, 0.0)
        busy = elapsed = own_cpu = window_seconds = batched_images = batches = 0.0
        answered = 0  # every image answered in the slices, for CPU per image
        rounds: list[dict[str, float]] = []
        engine_before = engine.images, engine.seconds, engine.cpu_seconds
        slice_seconds = args.duration / args.rounds
        for round_ in range(args.rounds):  # an engine-only slice, then a load slice (server idle meanwhile)
            engine_round = engine.run(args.engine_seconds / args.rounds)
            before = (await client.get("/metrics")).text
            busy_before, (images_before, batches_before) = _engine_busy_seconds(before), _batches(before)
            cpu_before = {pid: cpu_seconds(pid) for pid in procs}
            own_before = time.process_time()
            start = time.perf_counter()
            until = start + slice_seconds
            await asyncio.gather(*(worker(w + 1000 * round_, until) for w in range(args.clients)))
            elapsed += time.perf_counter() - start
            # throughput and latency from the steady part: not the ramp (clients connect, the pipeline
            # fills) nor the answers after the slice's end (the drain)
            steady = start + args.settle_seconds
            steady_answers = [latency for when, latency in answers if steady <= when <= until]
            answered += len(answers)
            answers.clear()
            latencies += steady_answers
            window_seconds += until - steady
            e2e_round = len(steady_answers) / (until - steady)
            rounds.append({"engine_images_per_s": engine_round, "e2e_images_per_s": e2e_round})
            own_cpu += time.process_time() - own_before
            for pid in procs:
                cpu[pid] += cpu_seconds(pid) - cpu_before[pid]
            after = (await client.get("/metrics")).text
            busy += _engine_busy_seconds(after) - busy_before
            images_after, batches_after = _batches(after)
            batched_images += images_after - images_before
            batches += batches_after - batches_before
        engine_images = engine.images - engine_before[0]
        engine_ips = engine_images / (engine.seconds - engine_before[1])
        engine_only_cpu_ms = 1e3 * (engine.cpu_seconds - engine_before[2]) / engine_images
        memory = {pid: (rss_bytes(pid) / 2**20, pss_bytes(pid) / 2**20) for pid in procs}

        # cold domains: first request vs the next one, sequential, idle server
        cold: list[float] = []
        warm: list[float] = []
        for i in range(args.cold_domains):
            for bucket in (cold, warm):
                t0 = time.perf_counter()
                r = await client.post(
                    "/v1/classify",
                    content=images[0],
                    headers={"X-Domain": f"cold{i}", "Content-Type": "image/png"},
                )
                r.raise_for_status()
                bucket.append(time.perf_counter() - t0)
    return {
        "e2e_images_per_s": len(latencies) / window_seconds,
        "engine_images_per_s": engine_ips,
        "e2e_over_engine": len(latencies) / window_seconds / engine_ips,
        "requests": answered,
        "rounds": rounds,  # type: ignore[dict-item]
        "errors": sum(errors.values()),
        "error_kinds": errors,  # type: ignore[dict-item]
        "p50_ms": pct(latencies, 50) * 1e3,
        "p95_ms": pct(latencies, 95) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
        "cold_first_request_p50_ms": statistics.median(cold) * 1e3,
        "warm_request_p50_ms": statistics.median(warm) * 1e3,
        "mean_batch_size": batched_images / max(1.0, batches),  # the load slices' batches only
        "engine_busy_fraction": busy / elapsed / streams,
        "frontend_cpu_ms_per_image": 1e3
        * sum(c for p, c in cpu.items() if procs[p] == "frontend")
        / max(1, answered),
        "engine_cpu_cores": sum(c for p, c in cpu.items() if procs[p] == "engine") / elapsed,
        # CPU time, unlike wall time, hardly moves with the machine's load: comparable between runs
        "engine_cpu_ms_per_image": 1e3
        * sum(c for p, c in cpu.items() if procs[p] == "engine")
        / max(1, answered),
        "engine_only_cpu_ms_per_image": engine_only_cpu_ms,
        "loadgen_cpu_cores": own_cpu / elapsed,
        "loadgen_cpu_share": own_cpu / elapsed / (os.cpu_count() or 1),
        "processes": [
            {"pid": p, "kind": procs[p], "rss_mb": memory[p][0], "pss_mb": memory[p][1]} for p in procs
        ],
        "pss_total_mb": sum(m[1] for m in memory.values()),
        "rss_total_mb": sum(m[0] for m in memory.values()),
    }


def _batches(metrics_text: str) -> tuple[float, float]:
    """(images, batches) the engines have run: `md_batch_size`'s sum and count, summed over engines."""
    values = {"md_batch_size_sum": 0.0, "md_batch_size_count": 0.0}
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:  # summed over engines (label `engine`)
            values[name] += float(line.rsplit(" ", 1)[1])
    return values["md_batch_size_sum"], values["md_batch_size_count"]


def memory_phase(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Server RSS with 1, 10, 100 registered domains; 1 resident, then 10 resident (merged cache off)."""
    out: dict[str, float] = {}
    image = random_images(1, args.size)[0]
    store_dir = tmp / "memstore"
    net = build_store(store_dir, args.width, args.size, 0, args.classes)  # the domains come in steps below
    store = LocalStore(store_dir)
    registered = 0
    artifact_bytes = 0
    for n in (1, 10, 100):
        artifact_bytes = add_domains(store, net, args.size, range(registered, n), args.classes)
        registered = n
        server = start_server(store_dir, args, MD_MERGED_CACHE="0", MD_BANK_SLOTS="16")
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for _rep in range(3):  # repeat so allocator pools settle before reading RSS
                    client.post(
                        "/v1/classify", content=image, headers={"X-Domain": "d0", "Content-Type": "image/png"}
                    )
                out[f"rss_mb_{n}_registered_1_resident"] = server.rss_bytes() / 2**20
                if n >= 10:
                    for _rep in range(3):
                        for i in range(10):
                            client.post(
                                "/v1/classify",
                                content=image,
                                headers={"X-Domain": f"d{i}", "Content-Type": "image/png"},
                            )
                    out[f"rss_mb_{n}_registered_10_resident"] = server.rss_bytes() / 2**20
        finally:
            server.stop()
    out["artifact_mb"] = artifact_bytes / 2**20
    per_resident = (out["rss_mb_10_registered_10_resident"] - out["rss_mb_10_registered_1_resident"]) / 9
    per_registered = (out["rss_mb_100_registered_1_resident"] - out["rss_mb_10_registered_1_resident"]) / 90
    out["rss_growth_per_resident_domain_mb"] = per_resident
    out["rss_growth_per_resident_over_artifact"] = per_resident / out["artifact_mb"]
    out["rss_growth_per_registered_domain_mb"] = per_registered
    return out


def _timed_ips(engine: Engine, keys: list, x: torch.Tensor, seconds: float) -> float:
    engine.infer(keys, x, 5)  # warm-up (loads, merges, cuDNN autotune)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        engine.infer(keys, x, 5)  # returns host values: each call is synchronised
        n += 1
    return n * x.shape[0] / (time.perf_counter() - start)


def device_check(args: argparse.Namespace, store_dir: Path, weights: list[float]) -> dict[str, object]:
    """The GPU options (dtype, channels_last) against the CPU float32 engine: agreement and images/s."""
    if not torch.cuda.is_available():
        return {"device_check": "skipped: no CUDA device"}
    rng = random.Random(2)
    cpu = Engine(LocalStore(store_dir), EngineConfig(device="cpu", bank_slots=args.bank_slots))
    keys = [cpu.resolve(f"d{i}") for i in range(args.domains)]
    mixed = rng.choices(keys, weights, k=args.batch)
    single = [keys[0]] * args.batch
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1

    def probs(engine: Engine, ks: list) -> torch.Tensor:
        out = torch.zeros(len(ks), args.classes)
        for row, pred in enumerate(engine.infer(ks, x, args.classes)):
            for s in pred.top:
                out[row, s.index] = s.probability
        return out

    ref = {"mixed": probs(cpu, mixed), "single": probs(cpu, single)}
    results: dict[str, object] = {"gpu": torch.cuda.get_device_name()}
    big = torch.rand(256, 3, args.size, args.size)
    for dtype in ("float32", "float16", "bfloat16"):
        for channels_last in (False, True):
            cfg = EngineConfig(device="cuda", dtype=dtype, channels_last=channels_last,  # type: ignore[arg-type]
                               bank_slots=args.bank_slots, merged_cache=4)  # fmt: skip
            eng = Engine(LocalStore(store_dir), cfg)
            eng.warm_up()
            name = f"{dtype}{'_cl' if channels_last else ''}"
            row: dict[str, float] = {}
            for kind, ks in (("mixed", mixed), ("single", single)):
                row[f"{kind}_max_abs_prob_diff"] = float((probs(eng, ks) - ref[kind]).abs().max())
                row[f"{kind}_top1_agree"] = float(
                    (probs(eng, ks).argmax(1) == ref[kind].argmax(1)).float().mean()
                )
            row["mixed_b32_ips"] = _timed_ips(eng, mixed, x, 2.0)
            row["single_b32_ips"] = _timed_ips(eng, single, x, 2.0)
            row["mixed_b256_ips"] = _timed_ips(eng, rng.choices(keys, weights, k=256), big, 2.0)
            row["single_b256_ips"] = _timed_ips(eng, [keys[0]] * 256, big, 2.0)
            row["gpu_memory_mb"] = eng.device_memory_bytes() / 2**20
            results[name] = row
            print(f"device check {name}: {json.dumps(row)}", flush=True)
            del eng
            torch.cuda.empty_cache()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="short phases (a few minutes in all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="engine-only and server device")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="compute dtype on CUDA, both sides (the CPU always runs float32)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=EngineConfig.model_fields["channels_last"].default,
        help="channels_last memory format, both sides (MD_CHANNELS_LAST; default: the engine's)",
    )
    p.add_argument(
        "--image-format", choices=["png", "jpeg"], default="png", help="the load's images (--size square)"
    )
    p.add_argument(
        "--engine-jpeg-decode",
        action="store_true",
        help="the engine decodes the JPEGs on its device (MD_ENGINE_JPEG_DECODE; with --image-format jpeg)",
    )
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--domains", type=int, default=10)
    p.add_argument("--cold-domains", type=int, default=5)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="max batch size (server) = engine-only batch size")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--bank-slots", type=int, default=16)
    p.add_argument(
        "--engine-streams",
        type=int,
        default=EngineConfig.model_fields["engine_streams"].default,
        help="the engine's streams, both sides (default: the server's; 0: one per CPU thread)",
    )
    p.add_argument(
        "--forward-split",
        type=int,
        default=EngineConfig.model_fields["forward_split"].default,
        help="parts each forward runs in at once, both sides (default: the server's)",
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per K, in --rounds slices")
    p.add_argument("--warmup-seconds", type=float, default=5.0)
    p.add_argument(
        "--engine-seconds", type=float, default=20.0, help="engine-only seconds per K, in --rounds slices"
    )
    p.add_argument("--rounds", type=int, default=4, help="engine-only and load slices taken in turn, per K")
    p.add_argument(
        "--settle-seconds",
        type=float,
        default=1.0,
        help="the start of each load slice not counted (clients connect, the pipeline fills)",
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument(
        "--workers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 2],
        help="front-end process counts to measure, e.g. 1,2,4,8 (one server each)",
    )
    p.add_argument(
        "--device-check", action="store_true", help="also check the CUDA dtype/channels_last options"
    )
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup_seconds, args.engine_seconds = 20.0, 3.0, 10.0
    if args.duration / args.rounds <= args.settle_seconds:
        p.error(f"each load slice ({args.duration / args.rounds:g} s) must outlast --settle-seconds")

    weights = zipf_weights(args.domains, args.zipf)
    summary: dict[str, object] = {
        "bench": "serve_load",
        "device": args.device,
        "dtype": args.dtype if args.device == "cuda" else "float32",
        "channels_last": args.channels_last,
        "forward_split": args.forward_split,
        "image_format": args.image_format,
        "engine_jpeg_decode": args.engine_jpeg_decode,
        "model": f"resnet26 width {args.width}",
        "size": args.size,
        "clients": args.clients,
        "domains": args.domains,
        "zipf_s": args.zipf,
        "batch": args.batch,
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        store_dir = tmp / "store"
        net = build_store(store_dir, args.width, args.size, args.domains, args.classes)
        add_domains(
            LocalStore(store_dir), net, args.size, range(args.cold_domains), args.classes, prefix="cold"
        )
        print(f"store ready: {args.domains} domains + {args.cold_domains} cold ones", flush=True)

        if args.device_check:
            summary["device_check"] = device_check(args, store_dir, weights)
        engine = EngineOnly(store_dir, args, weights)
        loads = bank_loads(store_dir, args)
        print(
            f"store->bank load p50 {loads['bank_load_p50_ms']:.1f} ms, p95 {loads['bank_load_p95_ms']:.1f} ms",
            flush=True,
        )
        summary.update(loads, engine_streams=engine.engine.streams)

        per_workers: dict[str, dict[str, object]] = {}
        for workers in args.workers:
            server = start_server(store_dir, args, workers=workers)
            try:
                server.wait_ready()
                e2e = asyncio.run(load_phase(server, args, weights, engine))
            finally:
                server.stop()
            per_workers[str(workers)] = e2e
            print(
                f"end to end, {workers} front end(s): {e2e['e2e_images_per_s']:.1f} images/s, engine only "
                f"beside it {e2e['engine_images_per_s']:.1f} (mixed batches of {args.batch}): "
                f"{e2e['e2e_over_engine']:.2f}x; p50 {e2e['p50_ms']:.0f} ms, "
                f"p95 {e2e['p95_ms']:.0f} ms, p99 {e2e['p99_ms']:.0f} ms, {e2e['errors']} errors, "
                f"mean batch {e2e['mean_batch_size']:.1f}, engine busy {e2e['engine_busy_fraction']:.2f}, "
                f"front-end CPU {e2e['frontend_cpu_ms_per_image']:.2f} ms/image, engine CPU "
                f"{e2e['engine_cpu_ms_per_image']:.1f} ms/image (engine only "
                f"{e2e['engine_only_cpu_ms_per_image']:.1f}), load generator "
                f"{e2e['loadgen_cpu_share']:.2f} of the cores, PSS {e2e['pss_total_mb']:.0f} MB",
                flush=True,
            )
            rounds: list[dict[str, float]] = e2e["rounds"]  # type: ignore[assignment]
            pairs = ", ".join(f"{r['engine_images_per_s']:.1f} / {r['e2e_images_per_s']:.1f}" for r in rounds)
            print(f"  rounds, engine only / end to end images/s: {pairs}")
            for proc in e2e["processes"]:  # type: ignore[attr-defined]
                print(
                    f"  {proc['kind']:>16} pid {proc['pid']}: RSS {proc['rss_mb']:.0f} MB, PSS {proc['pss_mb']:.0f} MB"
                )
        summary["by_frontends"] = per_workers
        last = per_workers[str(args.workers[-1])]
        summary.update(last)
        print(
            f"cold domain first request p50 {last['cold_first_request_p50_ms']:.1f} ms, "
            f"warm {last['warm_request_p50_ms']:.1f} ms",
            flush=True,
        )
        if not args.skip_memory:
            mem = memory_phase(args, tmp)
            summary.update(mem)
            for k, v in mem.items():
                print(f"memory: {k} = {v:.2f}", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
