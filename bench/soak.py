"""Soak: adapter churn through the bank, with the process's RSS sampled, to catch leak-on-unload.

Drives `server.engine.Engine` directly (no HTTP, so thousands of loads fit in minutes): far more
domains than bank slots, visited round-robin so nearly every request loads one domain and evicts
another; every few hundred requests a new version of some domain is put into the store and activated
and its oldest version deleted, so version-keyed caches (transforms, staged fetches, merged weights)
churn too. RSS is sampled once a second; the slope over the run after a warm-up is fitted by least
squares and compared with the scatter of the samples around that line.

    python -m bench.soak --duration 600       # the 10-minute soak the issue asks for
    python -m bench.soak --duration 60        # a short one
The last line is one JSON summary.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapters_store import LocalStore, validate_domain_artifact
from adapters_store.limits import MiB
from bench.harness import build_store, random_images, rss_bytes, spread_domain_artifact
from domain_format.preprocess import DEFAULT_MAX_PIXELS
from model_artifacts import spec_for
from server.engine import Engine, EngineConfig
from server.preprocess import preprocess


def fit_slope(times: list[float], values: list[float]) -> tuple[float, float]:
    """Least-squares slope (units per second) and the residuals' standard deviation."""
    t = np.asarray(times)
    v = np.asarray(values)
    slope, intercept = np.polyfit(t, v, 1)
    residual = v - (slope * t + intercept)
    return float(slope), float(residual.std())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of churn")
    parser.add_argument("--warmup", type=float, default=0.15, help="fraction of the run left out of the fit")
    parser.add_argument("--domains", type=int, default=24)
    parser.add_argument("--bank-slots", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--version-every", type=int, default=200, help="requests between new versions")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        store_dir = Path(tmp) / "store"
        net = build_store(store_dir, args.width, args.size, args.domains, 10)
        store = LocalStore(store_dir)
        fingerprint = store.get_backbone().manifest.fingerprint
        net_spec = spec_for(net)
        engine = Engine(
            store, EngineConfig(device="cpu", bank_slots=args.bank_slots, merged_cache=2, revision_poll_s=0)
        )
        engine.warm_up()
        images = random_images(4, args.size)
        domains = store.list_domains()
        # One domain's tensors: what a leak-on-unload would add to RSS per load.
        artifact_bytes = len(store.get(domains[0]).read_tensor_bytes(verify=True))
        rng = random.Random(0)

        samples_t: list[float] = []
        samples_rss: list[float] = []
        requests = versions_put = versions_deleted = 0
        seed = 50_000
        start = time.monotonic()
        next_sample = start
        while (now := time.monotonic()) - start < args.duration:
            if now >= next_sample:
                samples_t.append(now - start)
                samples_rss.append(rss_bytes() / MiB)
                next_sample += 1.0
            domain = domains[requests % len(domains)]  # round-robin: every request misses the bank
            key = engine.resolve(domain)
            pre = engine.manifest(key).preprocessing
            x = preprocess(images[requests % len(images)], pre, max_pixels=DEFAULT_MAX_PIXELS)[None]
            engine.infer([key], x, top_k=3)
            requests += 1
            if requests % args.version_every == 0:
                seed += 1
                target = rng.choice(domains)
                manifest, tensors = spread_domain_artifact(
                    net, target, seed=seed, size=args.size, classes=10, fingerprint=fingerprint
                )
                validated = validate_domain_artifact(
                    manifest, tensors, spec_for=net_spec, fingerprint=fingerprint
                )
                store.put(validated, activate=True)
                versions_put += 1
                info = store.describe(target)
                for old in info.versions[:-2]:  # keep the active one and one to roll back to
                    store.delete_version(target, old)
                    engine.evict(target, old)
                    versions_deleted += 1
                engine.notice_store_change()
        elapsed = time.monotonic() - start

    cut = int(len(samples_t) * args.warmup)
    slope_s, noise = fit_slope(samples_t[cut:], samples_rss[cut:])
    half = len(samples_t) // 2
    late_slope_s, _ = fit_slope(samples_t[half:], samples_rss[half:])
    fitted_span = samples_t[-1] - samples_t[cut]
    drift = slope_s * fitted_span
    summary = {
        "seconds": round(elapsed, 1),
        "requests": requests,
        "bank_loads": engine.stats.loads,
        "bank_evictions": engine.stats.evictions,
        "versions_put": versions_put,
        "versions_deleted": versions_deleted,
        "rss_start_mib": round(samples_rss[0], 1),
        "rss_after_warmup_mib": round(samples_rss[cut], 1),
        "rss_end_mib": round(samples_rss[-1], 1),
        "rss_max_mib": round(max(samples_rss), 1),
        "rss_slope_mib_per_min": round(slope_s * 60, 3),
        "rss_late_half_slope_mib_per_min": round(late_slope_s * 60, 3),
        "rss_drift_over_fit_mib": round(drift, 2),
        "artifact_bytes": artifact_bytes,
        "drift_per_load_bytes": round(drift * MiB / max(1, engine.stats.loads)),
        "rss_noise_std_mib": round(noise, 2),
        "within_noise": abs(drift) <= max(3 * noise, 1.0),
        "samples": len(samples_t),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
