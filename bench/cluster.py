"""Domain-affine load balancing against round robin: 3 replicas behind HAProxy, 100 domains (Zipf), 16 bank
slots per replica, measured side by side in one run on the same store, clients and images.

For each policy (`affine`: consistent hashing on the domain with bounded load; `roundrobin`), a fresh
cluster of three `multidomain serve` replicas on one shared store (`deploy/cluster.py`):
  1. warm-up: closed-loop clients through the balancer until the banks have settled;
  2. measurement: the same load; each replica's bank miss rate from its own /metrics (md_bank_misses /
     (hits + misses), the difference over this phase: one lookup per distinct domain in a batch, as the
     engine counts) and misses per image, the share of images served away from their domain's main
     replica (spill-over), aggregate images/s and p95 latency;
  3. fault: one replica SIGKILLed while the load runs on; requests lost (no 200) are counted, each in
     the phase its failure came in.
Every answer of every phase is checked against an offline recomputation with the model library (as
bench/chaos.py does): its version must be the stored one, its probabilities those of that version.
Beside the measured figures, `model`: the same mix simulated with the engine's eviction policies (LRU and
LFU) and the static bound no policy can beat (each replica keeping its most asked-for domains). The last
line is one JSON summary.

    python -m bench.cluster                       # about 5 minutes on 2 CPU cores
    python -m bench.cluster --eviction lru --balance-factor 150 --work-dir /tmp/run   # logs kept there
    python -m bench.cluster --warmup 10 --measure 20 --after-kill 10
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adapters_store import LocalStore, manifest_to_json
from bench.chaos import CLASSES, Answer, Record, recompute
from bench.harness import build_store, pct, random_images, zipf_weights
from deploy.cluster import REPLICAS, Cluster, ClusterConfig
from server.engine_config import EngineConfig
from server.eviction import EvictionPolicy, eviction_policy


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    images: int = 0
    lost: int = 0
    lost_detail: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Run:
    phase: str = "warmup"
    phases: dict[str, Phase] = field(
        default_factory=lambda: {p: Phase() for p in ("warmup", "measure", "fault")}
    )
    answers: list[Answer] = field(default_factory=list)
    stop: bool = False
    started: float = field(default_factory=time.perf_counter)


async def client_loop(
    cluster: Cluster, run: Run, wid: int, domains: list[str], weights: list[float], images: list[bytes]
) -> None:
    rng = random.Random(wid)
    # Idle connections expire before the balancer's keep-alive timeout (the usual keep-alive race aside).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=cluster.lb_url, timeout=60, limits=limits) as client:
        while not run.stop:
            domain = rng.choices(domains, weights)[0]
            index = rng.randrange(len(images))
            started = time.perf_counter()
            r: httpx.Response | None = None
            try:
                r = await client.post(
                    f"/v1/classify?top_k={CLASSES}",
                    content=images[index],
                    headers={"X-Domain": domain, "Content-Type": "image/png"},
                )
                failure = "" if r.status_code == 200 else f"{r.status_code} {r.text[:100]}"
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            # The phase in which the answer (or its failure) came: a request in flight when the replica is
            # killed fails in the fault phase, though it started before.
            phase = run.phases[run.phase]
            if r is None or failure:
                phase.lost += 1
                phase.lost_detail.append(
                    f"{run.phase} +{time.perf_counter() - run.started:.2f} s {domain}: {failure}"
                )
                continue
            phase.latencies.append(time.perf_counter() - started)
            phase.images += 1
            body = r.json()
            probs = {s["index"]: s["probability"] for s in body["results"][0]["top_k"]}
            run.answers.append(Answer(body["domain"], body["version"], index, probs))


@dataclass
class BankCounts:
    """A replica's counters from its Prometheus exposition."""

    hits: float
    misses: float
    loads: float
    images: dict[str, float]
    """Images classified, by domain."""

    @classmethod
    def read(cls, url: str) -> BankCounts:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        values: dict[str, float] = {}
        images: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "md_images_total":
                    images[sample.labels["domain"]] = sample.value
                else:
                    values[sample.name] = sample.value
        return cls(
            values.get("md_bank_hits_total", 0.0),
            values.get("md_bank_misses_total", 0.0),
            values.get("md_bank_loads_total", 0.0),
            images,
        )


async def run_policy(policy: str, store_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = ClusterConfig(
        store=store_dir,
        work_dir=work / policy,
        inference_backend=policy,
        balance_factor=args.balance_factor,
        lb_log_level=args.lb_log_level,
        bootstrap=False,
        replica_env={
            "MD_BANK_SLOTS": str(args.bank_slots),
            "MD_BANK_EVICTION": args.eviction,
            "MD_MERGED_CACHE": "2",
            "MD_DEVICE": "cpu",
            "MD_TORCH_THREADS": "1",
            "MD_DECODE_THREADS": "1",
            "MD_MAX_BATCH_SIZE": "32",
            "MD_MAX_WAIT_MS": "5",
        },
    )
    domains = [f"d{i}" for i in range(args.domains)]
    weights = zipf_weights(args.domains, args.zipf)
    images = random_images(16, args.size)
    run = Run()
    with Cluster(config) as cluster:
        tasks = [
            asyncio.create_task(client_loop(cluster, run, w, domains, weights, images))
            for w in range(args.clients)
        ]
        await asyncio.sleep(args.warmup)  # a benchmark may run for a set time; tests never do
        # Read off the event loop: blocking it would stall every client's connection meanwhile.
        before = [await asyncio.to_thread(BankCounts.read, cluster.replica_url(i)) for i in range(REPLICAS)]
        run.phase, started = "measure", time.perf_counter()
        await asyncio.sleep(args.measure)
        run.phases["measure"].seconds = time.perf_counter() - started
        after = [await asyncio.to_thread(BankCounts.read, cluster.replica_url(i)) for i in range(REPLICAS)]
        run.phase, started = "fault", time.perf_counter()
        cluster.kill_replica(args.kill)
        await asyncio.sleep(args.after_kill)
        run.stop = True
        await asyncio.gather(*tasks)
        run.phases["fault"].seconds = time.perf_counter() - started
        states_after_kill = cluster.server_states()

    miss_rates, loads_per_image, domains_served, images_by_replica = [], [], [], []
    hits_total = misses_total = images_total = 0.0
    for b, a in zip(before, after, strict=True):
        hits, misses = a.hits - b.hits, a.misses - b.misses
        hits_total += hits
        misses_total += misses
        miss_rates.append(misses / (hits + misses) if hits + misses else float("nan"))
        by_domain = {d: n - b.images.get(d, 0.0) for d, n in a.images.items()}
        served = sum(by_domain.values())
        images_total += served
        images_by_replica.append(by_domain)
        loads_per_image.append((a.loads - b.loads) / served if served else float("nan"))
        domains_served.append(sum(1 for n in by_domain.values() if n > 0))
    # Images served away from their domain's main replica (the one that served it most): spill-over.
    away = sum(
        sum(r.get(d, 0.0) for r in images_by_replica) - max(r.get(d, 0.0) for r in images_by_replica)
        for d in set().union(*images_by_replica)
    )
    measure = run.phases["measure"]
    return {
        "policy": policy,
        "miss_rate_per_replica": [round(x, 4) for x in miss_rates],
        "miss_rate": misses_total / (hits_total + misses_total),
        "misses_per_image": misses_total / images_total,
        "loads_per_image_per_replica": [round(x, 4) for x in loads_per_image],
        "domains_served_per_replica": domains_served,
        "images_away_from_main_replica": round(away / images_total, 4),
        "images_per_s": measure.images / measure.seconds,
        "p95_ms": pct(measure.latencies, 95) * 1e3,
        "p50_ms": pct(measure.latencies, 50) * 1e3,
        "answers": {p: v.images for p, v in run.phases.items()},
        "lost": {p: v.lost for p, v in run.phases.items()},
        "lost_detail": [d for v in run.phases.values() for d in v.lost_detail][:10],
        "states_after_kill": states_after_kill,
        "_answers": run.answers,
    }


def check_answers(
    store_dir: Path, answers: list[Answer], images: list[bytes], tolerance: float
) -> dict[str, Any]:
    """Every answer against the model library's forward with the stored active version (bench/chaos.py's
    recomputation): an answer naming any other version counts as a wrong-version answer."""
    record = Record(answers=answers)
    store = LocalStore(store_dir)
    for domain in store.list_domains():
        stored = store.get(domain)
        record.artifacts[(domain, stored.version)] = (
            manifest_to_json(stored.manifest),
            stored.read_tensor_bytes(verify=True),
        )
    checks = recompute(store_dir, record, images, tolerance)
    return {
        "wrong_version": checks["unknown_version_answers"],
        "wrong_probabilities": checks["wrong_answers"],
        "max_abs_diff": checks["max_abs_diff"],
    }


@dataclass
class ModelRates:
    miss_rate: float
    """Misses per lookup (one lookup per distinct domain in a batch, as the engine counts)."""
    misses_per_image: float


def bank_model(
    args: argparse.Namespace, routing: str, eviction: str, batch: int = 8, images: int = 300_000
) -> ModelRates:
    """The bank miss rates the mix allows, simulated with the engine's own eviction policies
    (server/eviction.py): domains on a random partition (`affine`, no spill-over; the mean of three
    partitions) or dealt round robin, batches of `batch` images per replica (about what each batches
    here), after a warm-up of a third of the images."""
    runs = [_simulate(args, routing, eviction, batch, images, seed) for seed in range(3)]
    return ModelRates(*(sum(values) / len(runs) for values in zip(*runs, strict=True)))


def _simulate(
    args: argparse.Namespace, routing: str, eviction: str, batch: int, images: int, seed: int
) -> tuple[float, float]:
    rng = random.Random(seed)
    weights = zipf_weights(args.domains, args.zipf)
    owner = [rng.randrange(REPLICAS) for _ in range(args.domains)]
    policies: list[EvictionPolicy[int]] = [
        eviction_policy(eviction, args.bank_slots)  # type: ignore[arg-type]
        for _ in range(REPLICAS)
    ]
    banks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(REPLICAS)]  # oldest use first
    pending: list[list[int]] = [[] for _ in range(REPLICAS)]
    lookups = misses = counted = 0
    for n, domain in enumerate(rng.choices(range(args.domains), weights, k=images)):
        replica = owner[domain] if routing == "affine" else n % REPLICAS
        pending[replica].append(domain)
        if len(pending[replica]) < batch:
            continue
        bank, policy = banks[replica], policies[replica]
        in_batch = Counter(pending[replica])
        for d, requests in in_batch.items():  # as Engine._ensure_resident
            policy.record(d, requests)
            hit = d in bank
            if hit:
                bank.move_to_end(d)
            else:
                if len(bank) >= args.bank_slots:
                    del bank[policy.victim([k for k in bank if k not in in_batch])]
                bank[d] = None
            if n > images // 3:
                lookups += 1
                misses += not hit
        if n > images // 3:
            counted += len(pending[replica])
        pending[replica] = []
    return misses / lookups, misses / counted


def static_bound(args: argparse.Namespace, routing: str) -> float:
    """Misses per image of the best any policy can do in steady state: each replica keeps the
    `bank_slots` domains it is asked for most (the mean over the same three random partitions)."""
    weights = zipf_weights(args.domains, args.zipf)
    if routing != "affine":
        return 1 - sum(sorted(weights, reverse=True)[: args.bank_slots])
    bounds = []
    for seed in range(3):
        rng = random.Random(seed)
        owner = [rng.randrange(REPLICAS) for _ in range(args.domains)]
        kept = sum(
            sum(
                sorted((w for w, o in zip(weights, owner, strict=True) if o == r), reverse=True)[
                    : args.bank_slots
                ]
            )
            for r in range(REPLICAS)
        )
        bounds.append(1 - kept)
    return sum(bounds) / len(bounds)


def model_figures(args: argparse.Namespace) -> dict[str, Any]:
    """The model's rates and hashing / round robin ratios, per eviction policy, beside the static bound."""
    out: dict[str, Any] = {}
    for eviction in ("lru", "lfu"):
        affine, rr = bank_model(args, "affine", eviction), bank_model(args, "roundrobin", eviction)
        out[eviction] = {
            "affine_miss_rate": round(affine.miss_rate, 4),
            "round_robin_miss_rate": round(rr.miss_rate, 4),
            "miss_rate_ratio": round(ratio(affine.miss_rate, rr.miss_rate), 3),
            "affine_misses_per_image": round(affine.misses_per_image, 4),
            "round_robin_misses_per_image": round(rr.misses_per_image, 4),
            "misses_per_image_ratio": round(ratio(affine.misses_per_image, rr.misses_per_image), 3),
        }
    affine_bound, rr_bound = static_bound(args, "affine"), static_bound(args, "roundrobin")
    out["static_bound"] = {
        "affine_misses_per_image": round(affine_bound, 4),
        "round_robin_misses_per_image": round(rr_bound, 4),
        "ratio": round(ratio(affine_bound, rr_bound), 3),
    }
    return out


def ratio(a: float, b: float) -> float:
    """a / b; NaN where b is 0 (no misses at all: fewer domains than slots)."""
    return float(a) / float(b) if b else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument(
        "--zipf", type=float, default=1.1, help="Zipf exponent of the domain mix (as bench/chaos.py)"
    )
    parser.add_argument("--bank-slots", type=int, default=16)
    parser.add_argument(
        "--eviction",
        choices=("lru", "lfu"),
        default=EngineConfig.model_fields["bank_eviction"].default,
        help="the replicas' bank eviction policy (MD_BANK_EVICTION; default: the server's)",
    )
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--warmup", type=float, default=25.0)
    parser.add_argument("--measure", type=float, default=45.0)
    parser.add_argument("--after-kill", type=float, default=15.0)
    parser.add_argument("--kill", type=int, default=1, help="index of the replica SIGKILLed mid-run")
    parser.add_argument(
        "--balance-factor",
        type=int,
        default=ClusterConfig.balance_factor,
        help="HAProxy hash-balance-factor (%%; default: the shipped one)",
    )
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--lb-log-level", default="warning", help="HAProxy's log level (info: every request)")
    parser.add_argument(
        "--work-dir", help="keep the store and every process's log here (default: a temporary directory)"
    )
    args = parser.parse_args()

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as scratch:
        tmp = args.work_dir or scratch
        store_dir = Path(tmp) / "store"
        build_store(store_dir, args.width, args.size, args.domains, CLASSES)
        results: dict[str, dict[str, Any]] = {}
        for policy in ("affine", "roundrobin"):
            result = asyncio.run(run_policy(policy, store_dir, Path(tmp), args))
            answers = result.pop("_answers")
            result.update(check_answers(store_dir, answers, random_images(16, args.size), args.tolerance))
            results[policy] = result
            print(json.dumps(result), flush=True)
    affine, rr = results["affine"], results["roundrobin"]
    miss_ratio = ratio(affine["miss_rate"], rr["miss_rate"])
    throughput_ratio = ratio(affine["images_per_s"], rr["images_per_s"])
    bad = sum(int(r[k]) for r in results.values() for k in ("wrong_version", "wrong_probabilities"))
    lost = sum(sum(r["lost"].values()) for r in results.values())
    summary = {
        "seconds": round(time.monotonic() - t0, 1),
        "replicas": REPLICAS,
        "domains": args.domains,
        "zipf": args.zipf,
        "bank_slots": args.bank_slots,
        "eviction": args.eviction,
        "balance_factor": args.balance_factor,
        "clients": args.clients,
        "affine_miss_rate": round(float(affine["miss_rate"]), 4),
        "round_robin_miss_rate": round(float(rr["miss_rate"]), 4),
        "miss_rate_ratio": round(miss_ratio, 3),
        "affine_miss_rate_per_replica": affine["miss_rate_per_replica"],
        "round_robin_miss_rate_per_replica": rr["miss_rate_per_replica"],
        "affine_images_per_s": round(float(affine["images_per_s"]), 1),
        "round_robin_images_per_s": round(float(rr["images_per_s"]), 1),
        "throughput_ratio": round(throughput_ratio, 3),
        "affine_p95_ms": round(float(affine["p95_ms"]), 1),
        "round_robin_p95_ms": round(float(rr["p95_ms"]), 1),
        "answers_checked": sum(sum(r["answers"].values()) for r in results.values()),
        "wrong_answers": bad,
        "lost_answers": lost,
        "affine_misses_per_image": round(float(affine["misses_per_image"]), 4),
        "round_robin_misses_per_image": round(float(rr["misses_per_image"]), 4),
        "misses_per_image_ratio": round(ratio(affine["misses_per_image"], rr["misses_per_image"]), 3),
        "affine_images_away_from_main_replica": affine["images_away_from_main_replica"],
        "model": model_figures(args),
        "ok": miss_ratio <= 1 / 3 and throughput_ratio >= 1.0 and bad == 0 and lost == 0,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
