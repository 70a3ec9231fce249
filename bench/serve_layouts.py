"""What `make serve` serves, end to end, in both memory formats: the real MobileNetV2 ImageNet store (the
first run's bootstrap), the multi-process server with `--workers` front ends, closed-loop clients each
sending scikit-image's cat photo as a JPEG (the front ends decode and resize it to 224 px). Servers with
`MD_CHANNELS_LAST` true and false are started in turn, `--rounds` times, so both see the same machine.

    python -m bench.serve_layouts                 # ~2 minutes
The last line is one JSON summary: images/s and errors per layout and round, and the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.harness import KeepAliveConnection, SupervisorProcess, http_request
from multidomain.bootstrap import bootstrap_store


def cat_jpeg() -> bytes:
    from skimage import data  # the photo the real MobileNetV2 calls "Egyptian cat"

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG")
    return buf.getvalue()


async def closed_loop(
    url: str, request: bytes, clients: int, warmup: float, seconds: float
) -> tuple[float, int]:
    """(images/s over `seconds` after `warmup`, non-200 answers) from `clients` closed-loop clients."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    answered: list[float] = []
    errors = 0

    async def client(until: float) -> None:
        nonlocal errors
        connection = KeepAliveConnection(host, int(port))
        try:
            while time.perf_counter() < until:
                if (await connection.send(request))[0] == 200:
                    answered.append(time.perf_counter())
                else:
                    errors += 1
        finally:
            connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(start + warmup + seconds) for _ in range(clients)))
    steady = [t for t in answered if start + warmup <= t <= start + warmup + seconds]
    return len(steady) / seconds, errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="front-end processes (MD_WORKERS)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per server")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    store = Path(tempfile.mkdtemp()) / "store"
    bootstrap_store(store)
    request = http_request(
        "POST", "/v1/classify", {"X-Domain": "imagenet", "Content-Type": "image/jpeg"}, cat_jpeg()
    )
    runs: dict[str, list[dict[str, float]]] = {"channels_last": [], "contiguous": []}
    for _ in range(args.rounds):
        for layout, setting in (("channels_last", "true"), ("contiguous", "false")):
            env = {"MD_CHANNELS_LAST": setting, "MD_MAX_CONNECTIONS_PER_ADDRESS": str(args.clients + 8)}
            server = SupervisorProcess(store, env, workers=args.workers)
            try:
                server.wait_ready()
                ips, errors = asyncio.run(
                    closed_loop(server.url, request, args.clients, args.warmup, args.seconds)
                )
            finally:
                server.stop()
            runs[layout].append({"images_per_s": ips, "errors": errors})
            print(f"{layout}: {ips:.1f} images/s, {errors} errors", flush=True)
    ratios = [
        cl["images_per_s"] / max(c["images_per_s"], 1e-9)
        for cl, c in zip(runs["channels_last"], runs["contiguous"], strict=True)
    ]
    summary = {
        "bench": "serve_layouts",
        "model": "mobilenet_v2 (the bootstrap store), 224 px",
        "workers": args.workers,
        "clients": args.clients,
        "runs": runs,
        "channels_last_over_contiguous": statistics.median(ratios),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
