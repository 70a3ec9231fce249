"""Engine forwards of this tree against another checkout, in lock-step: a regression check on a noisy machine.

`bench.engine` compares its variants within one process, but two of its runs (before and after a change)
see different machine states: on 2 shared cores its `--quick` ratios move by more than 0.1 from run to run.
Here one worker process per tree builds the same network and variants (this file's `bench.engine`, loaded
by path, run against each tree's `residual_adapters`), and the workers take turns round by round (A B B A
...), each idle while the other runs, so both see the same drift. Ratios to each tree's own plain backbone.

    python -m bench.engine_ab /path/to/other/checkout --rounds 20
    git worktree add --detach /tmp/base c4f81ad && python -m bench.engine_ab /tmp/base

The last line is one JSON object: per model, each tree's `<variant>_vs_plain` and their difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
THIS_TREE = HERE.parents[1]


def worker(model: str, batch: int, domains: int) -> None:
    """One tree's side: build, warm up, then one timed round of every variant per line read from stdin."""
    import torch

    spec = importlib.util.spec_from_file_location("engine_bench", HERE.parent / "engine.py")
    assert spec is not None and spec.loader is not None
    engine_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine_bench)
    with torch.inference_mode():
        net = engine_bench.build(model, domains, "cpu", torch.float32)
        forwards = engine_bench.variants(
            net, engine_bench.MODELS[model], batch, domains, "cpu", torch.float32
        )
        for forward in forwards.values():
            forward()
        print("ready", flush=True)
        for _ in sys.stdin:
            seconds = {}
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward()
                seconds[name] = time.perf_counter() - start
            print(json.dumps(seconds), flush=True)


def compare(other: Path, model: str, batch: int, domains: int, rounds: int) -> dict[str, object]:
    trees = {"this": THIS_TREE, "other": other}
    workers = {
        side: subprocess.Popen(
            [sys.executable, str(HERE), "--worker", model, str(batch), str(domains)],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for side, tree in trees.items()
    }
    try:
        for side, process in workers.items():
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise SystemExit(f"the {side} tree's worker failed to start ({trees[side]})")
        rows: dict[str, list[dict[str, float]]] = {side: [] for side in trees}
        for r in range(rounds):
            for side in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                process = workers[side]
                assert process.stdin is not None and process.stdout is not None
                process.stdin.write("go\n")
                process.stdin.flush()
                rows[side].append(json.loads(process.stdout.readline()))
    finally:
        for process in workers.values():
            if process.stdin is not None:
                process.stdin.close()
            process.wait()
    result: dict[str, object] = {}
    for side, side_rows in rows.items():
        median = {k: statistics.median(row[k] for row in side_rows) for k in side_rows[0]}
        result[side] = {
            f"{k}_vs_plain": round(median["plain"] / median[k], 3) for k in median if k != "plain"
        }
        result[side]["plain_ips"] = round(batch / median["plain"], 1)  # type: ignore[index]
    this, that = result["this"], result["other"]
    assert isinstance(this, dict) and isinstance(that, dict)
    result["this_minus_other"] = {k: round(this[k] - that[k], 3) for k in this if k.endswith("_vs_plain")}
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (a git worktree of the base commit)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--domains", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["resnet26", "mobilenet_v2"])
    args = parser.parse_args()
    summary = {"rounds": args.rounds, "batch": args.batch, "domains": args.domains}
    for model in args.models:
        summary[model] = compare(args.other.resolve(), model, args.batch, args.domains, args.rounds)
        print(model, json.dumps(summary[model]), flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
