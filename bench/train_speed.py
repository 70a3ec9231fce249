"""Training throughput: adapter training (shared weights frozen) vs fine-tuning (every weight), side by side.

Same backbone, same data, same batches, one process; the two are interleaved round by round so that
load from other work on a shared machine hits both alike, and the ratio of the medians is reported.
Why adapters are cheaper: the frozen convs need input gradients but never weight gradients.

    .venv/bin/python -m bench.train_speed                                 # the paper's ResNet-26, 64 px, digits
    .venv/bin/python -m bench.train_speed --backbone mobilenet_v2         # ImageNet MobileNetV2 (the mini preset's)

One torch thread by default: on a shared 2-core machine two OpenMP threads spin against other work.

Last line: a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from residual_adapters import AdapterConfig, MultiDomainNet
from training.backbones import load_backbone
from training.data import BatchMaker, load_domain_data
from training.trainer import finetune_copy, trainable_parameters


def _steps_per_s(
    net: MultiDomainNet, name: str, params: list[torch.nn.Parameter], batches: list[tuple[Tensor, Tensor]]
) -> float:
    optimiser = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    net.train()
    t0 = time.perf_counter()
    images = 0
    for x, y in batches:
        loss = F.cross_entropy(net.forward_domain(x, name), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        images += len(y)
    return images / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbone", default="resnet26", help="resnet26[:width] (the paper's) or mobilenet_v2 (ImageNet)"
    )
    parser.add_argument("--kind", default="parallel")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--nchw", action="store_true", help="NCHW tensors instead of the trainer's default channels-last"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_domain_data("digits", input_size=args.input_size, train_per_class=40, val_per_class=5)
    maker = BatchMaker(data.preprocessing, data.flip)
    g = torch.Generator().manual_seed(0)
    memory_format = torch.contiguous_format if args.nchw else torch.channels_last  # as the trainer does
    batches = [
        (x.contiguous(memory_format=memory_format), y)
        for x, y in list(maker.train_batches(data.train, args.batch_size, g))[: args.steps]
    ]

    net = load_backbone(args.backbone)
    tuned = finetune_copy(net, "d", data.num_classes)
    net.add_domain("d", AdapterConfig(kind=args.kind), data.num_classes)  # type: ignore[arg-type]
    net.to(memory_format=memory_format)
    tuned.to(memory_format=memory_format)
    adapter_params = list(trainable_parameters(net, "d", "domain").values())
    all_params = list(trainable_parameters(tuned, "d", "all").values())

    # Warm-up (allocator, kernels), not measured.
    _steps_per_s(net, "d", adapter_params, batches[:1])
    _steps_per_s(tuned, "d", all_params, batches[:1])
    adapter: list[float] = []
    finetune: list[float] = []
    for r in range(args.rounds):
        order = [("adapter", net, adapter_params, adapter), ("finetune", tuned, all_params, finetune)]
        if r % 2:
            order.reverse()
        for _, model, params, out in order:
            out.append(_steps_per_s(model, "d", params, batches))
        print(
            f"round {r + 1}: adapter {adapter[-1]:.1f} img/s, finetune {finetune[-1]:.1f} img/s", flush=True
        )

    a, f = statistics.median(adapter), statistics.median(finetune)
    summary = {
        "bench": "train_speed",
        "backbone": args.backbone,
        "kind": args.kind,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "memory_format": "nchw" if args.nchw else "channels_last",
        "adapter_images_per_s": round(a, 2),
        "finetune_images_per_s": round(f, 2),
        "adapter_over_finetune": round(a / f, 3),
        "adapter_trainable_parameters": sum(p.numel() for p in adapter_params),
        "finetune_trainable_parameters": sum(p.numel() for p in all_params),
        "rounds": args.rounds,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
