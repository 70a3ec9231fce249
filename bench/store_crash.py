"""SIGKILL a store writer in the middle of puts and check that the store survives (either backend).

Each trial puts a ~3 MB domain artifact from a child process and kills it with SIGKILL:

- ``--mode hook`` (default): at a random step of a put (a kind of step drawn uniformly: a 256 KiB
  chunk of the tensor file, the manifest, fsync+rename of the version directory, each phase of the
  index swap; then one of its occurrences); deterministic, via the store's fault hook
  (``adapters_store.crashtest``).
- ``--mode timed``: after a random delay drawn over a put's duration, wherever the child happens to
  be (inside a write, an fsync, a rename).

After every kill: ``verify()`` (every listed version loads and matches its checksum), the put either
landed entirely or not at all, the active version is the expected one and loads. The next trial's put
then has to get the dead writer's lock (``LocalStore``) or win the conditional index write
(``S3Store``). ``--backend s3`` runs against a real SeaweedFS started on loopback for the run
(``adapters_store.seaweedfs``) and finally collects the dead writers' unlisted objects. Last line: a
one-line JSON summary.

    .venv/bin/python -m bench.store_crash [--trials 100] [--mode hook|timed] [--size-mb 3] [--backend local|s3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from adapters_store import AdapterStore, LocalStore, StoreError, sha256_hex
from adapters_store.crashtest import check_store, run_put, run_put_killed_after
from adapters_store.testing import make_domain_artifact, validated

DOMAIN = "crashy"


def make_spec(size_mb: float) -> dict[str, tuple[tuple[int, ...], str]]:
    """A domain of about ``size_mb`` (a width-1 ResNet-26 domain is about 3 MB)."""
    elements = int(size_mb * 2**20 / 4)
    return {
        "body.adapter.weight": ((elements,), "float32"),
        "head.weight": ((4, 8), "float32"),
        "head.bias": ((4,), "float32"),
    }


def pick_step(steps: tuple[str, ...], rng: random.Random) -> int:
    """A 1-based step number: a kind of step uniformly (so the few index-swap steps are hit as often
    as the many chunk writes), then one of its occurrences uniformly."""
    kind = rng.choice(sorted(set(steps)))
    return rng.choice([i for i, step in enumerate(steps, start=1) if step == kind])


@contextmanager
def backend(name: str, tmp: Path, chunk: int) -> Iterator[Callable[[str], tuple[str, AdapterStore]]]:
    """``open_at(name) -> (location, store)`` for a fresh store of the chosen backend."""
    if name == "local":
        yield lambda sub: (str(tmp / sub), LocalStore(tmp / sub, chunk_bytes=chunk))
        return
    from adapters_store.s3 import S3Store
    from adapters_store.seaweedfs import seaweedfs

    with seaweedfs(tmp / "seaweedfs") as server:
        server.create_bucket("crash")
        os.environ.update(server.env)  # the put children inherit the endpoint and credentials
        yield lambda sub: (f"s3://crash/{sub}", S3Store.from_url(f"s3://crash/{sub}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--mode", choices=["hook", "timed"], default="hook")
    parser.add_argument("--size-mb", type=float, default=3.0)
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["local", "s3"], default="local")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    chunk = args.chunk_kib * 1024

    with (
        tempfile.TemporaryDirectory(prefix="store_crash_") as tmp_dir,
        backend(args.backend, Path(tmp_dir), chunk) as open_at,
    ):
        tmp = Path(tmp_dir)
        spec = make_spec(args.size_mb)
        files = [
            make_domain_artifact(spec, domain=DOMAIN, labels=["a", "b", "c", "d"], seed=seed)
            for seed in range(3)
        ]
        bundles = []
        for i, f in enumerate(files):
            bundles.append(tmp / f"a{i}.tar")
            bundles[-1].write_bytes(f.bundle())
        sha_of_file = [sha256_hex(f.tensor_bytes) for f in files]

        # Calibrate: the steps of one put (hook mode) and how long one takes (timed mode).
        calib = run_put(open_at("calibration")[0], bundles[0], 0, activate=True, chunk_bytes=chunk)
        steps = calib.steps
        first = validated(files[0], spec=spec)
        timing = open_at("timing")[1]
        timing.put(first, activate=True)  # the first put also makes directories / a client: not timed
        started = time.perf_counter()
        timing.put(first, activate=True)
        put_seconds = time.perf_counter() - started

        root, store = open_at("store")
        store.put(first, activate=True)
        sha_of = {1: sha_of_file[0]}
        next_version = 2
        corrupt = lost_active = landed = 0
        kill_steps: Counter[str] = Counter()
        began = time.perf_counter()
        for trial in range(args.trials):
            which = rng.randrange(len(files))
            activate = rng.random() < 0.5
            before = store.describe(DOMAIN)
            if args.mode == "hook":
                kill_at = pick_step(steps, rng)
                outcome = run_put(root, bundles[which], kill_at, activate=activate, chunk_bytes=chunk)
            else:
                delay = rng.uniform(0.0, put_seconds)
                outcome = run_put_killed_after(
                    root, bundles[which], delay, activate=activate, chunk_bytes=chunk
                )
            kill_steps[outcome.killed_at or "completed"] += 1

            reader = open_at("store")[1]  # a fresh reader, as a server replica would be
            problems = check_store(
                reader,
                DOMAIN,
                before=before,
                known_sha256=sha_of,
                new_version=next_version,
                new_sha256=sha_of_file[which],
                activate=activate,
            )
            info = reader.describe(DOMAIN)
            expected_active = next_version if next_version in info.versions and activate else before.active
            try:
                data = reader.get(DOMAIN).read_tensor_bytes(verify=True)
                active_ok = info.active == expected_active and sha256_hex(data) == sha_of.get(
                    info.active or 0, sha_of_file[which]
                )
            except StoreError:
                active_ok = False
            corrupt += bool(problems)
            lost_active += not active_ok
            if problems:
                print(f"trial {trial}: killed at {outcome.killed_at}: {problems}", file=sys.stderr)
            put_landed = next_version in info.versions
            if put_landed:
                landed += 1
                sha_of[next_version] = sha_of_file[which]
                next_version += 1
            verdict = "ok" if not problems and active_ok else "BROKEN"
            where = outcome.killed_at or "end (the put finished first)"
            print(
                f"trial {trial:3d}: killed at {where}: put {'landed' if put_landed else 'discarded'}, {verdict}"
            )
            # Keep the store small: drop inactive versions but the newest few (also exercises deletes).
            for old in info.versions[:-3]:
                if old != info.active:
                    store.delete_version(DOMAIN, old)

        # The store still takes writes after 100 dead writers, and verifies clean.
        final_version = store.put(first, activate=True)
        orphans = store.collect_garbage(min_age=timedelta(0))  # no writer is alive now
        final_ok = store.verify() == [] and store.get(DOMAIN).version == final_version
        summary = {
            "bench": "store_crash",
            "backend": args.backend,
            "mode": args.mode,
            "trials": args.trials,
            "corrupt_stores": corrupt,
            "lost_active_versions": lost_active,
            "puts_landed": landed,
            "puts_discarded": args.trials - landed,
            "store_usable_after": final_ok,
            "orphans_collected": len(orphans),
            "steps_per_put": len(steps),
            "kills_by_step": dict(sorted(kill_steps.items())),
            "artifact_mb": round(len(files[0].tensor_bytes) / 2**20, 2),
            "put_ms": round(put_seconds * 1e3, 1),
            "seconds": round(time.perf_counter() - began, 1),
        }
    print(json.dumps(summary))
    return 0 if corrupt == 0 and lost_active == 0 and final_ok else 1


if __name__ == "__main__":
    sys.exit(main())
