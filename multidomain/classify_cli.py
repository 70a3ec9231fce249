"""``multidomain classify IMAGE... --domain D [--url U] [--top-k K] [--json]``: classify images from the shell.

It talks to a running server through the project's client (`multidomain_client`), so it needs neither
torch nor a store: one request for all the images, printed as a table per image (rank, label,
probability) under the domain version and time the server reports, or as the server's JSON. A server that
answers 429/503 (queue full, engine restarting) is retried after its Retry-After (`--retries`,
`--max-wait`). Exit 0 answered, 1 refused by the server or unreachable, 2 an image cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from multidomain_client import ClientError, MultidomainClient

EXIT_OK, EXIT_REFUSED, EXIT_BAD_INPUT = 0, 1, 2


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("classify", help="classify images with a running server", description=__doc__)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="JPEG, PNG or WebP files")
    p.add_argument("--domain", required=True, help="the domain to classify in")
    p.add_argument("--url", default=os.environ.get("MD_URL", "http://127.0.0.1:8000"), help="the server")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print the server's JSON answer")
    p.add_argument("--token", default=os.environ.get("MD_INFERENCE_TOKEN"), help="inference token, if any")
    p.add_argument("--retries", type=int, default=3, help="retries after 429/503 (default 3)")
    p.add_argument("--max-wait", type=float, default=30.0, help="most seconds waited for retries (30)")
    p.set_defaults(func=classify_command)


def format_answer(names: list[str], answer: dict[str, Any]) -> str:
    """A readable table per image: rank, label and probability, under the version and time used."""
    timing = answer.get("timing", {}).get("total_ms")
    took = f", {timing:.0f} ms" if timing is not None else ""
    lines = []
    for name, result in zip(names, answer["results"], strict=True):
        lines.append(f"{name}  ({answer['domain']} version {answer['version']}{took})")
        width = max((len(s["label"]) for s in result["top_k"]), default=0)
        for rank, score in enumerate(result["top_k"], 1):
            lines.append(f"  {rank:>2}  {score['label']:<{width}}  {100 * score['probability']:6.2f}%")
    return "\n".join(lines)


def classify_command(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        images = [path.read_bytes() for path in args.images]
    except OSError as exc:
        print(f"cannot read {exc.filename}: {exc.strerror}", file=err)
        return EXIT_BAD_INPUT
    try:
        with MultidomainClient(
            args.url, args.token, retries=args.retries, max_wait_s=args.max_wait
        ) as client:
            answer = client.classify(args.domain, images if len(images) > 1 else images[0], top_k=args.top_k)
    except ClientError as exc:
        print(f"multidomain classify: {exc}", file=err)
        return EXIT_REFUSED
    print(
        json.dumps(answer, indent=2) if args.json else format_answer([str(p) for p in args.images], answer),
        file=out,
    )
    return EXIT_OK
