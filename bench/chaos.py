"""Load with faults against a real uvicorn (a subprocess on 127.0.0.1), then SIGKILL mid-upload and restart.

32 classify clients over 12 domains (Zipf mix) while an admin client uploads new versions, activates,
rolls back, deletes versions and whole domains; the bank holds fewer domains than exist, so it evicts
all the time. Then the server is SIGKILLed while an upload body is half sent (other uploads and the
classify load keep running) and restarted on the same store and port; the load runs on.

Checked and reported:
  - 5xx answers, outside and inside the restart window;
  - answers naming a (domain, version) that was never uploaded;
  - answers whose probabilities differ from an offline recomputation with the model library from that
    exact version's artifact (no mixed-version or stale-slot answers);
  - the store after the restart (`LocalStore.verify()`), and whether the killed upload is all or nothing;
  - requests lost: in flight at the kill, refused while the server was down, failed after it was back.
The last line is one JSON summary.

    python -m bench.chaos                     # ~90 s of load on 2 CPU cores
    python -m bench.chaos --duration 30 --after-restart 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import safetensors.torch
import torch

from adapters_store import (
    DomainManifest,
    LocalStore,
    manifest_to_json,
    pack_bundle,
    sha256_hex,
)
from bench.harness import (
    ServerProcess,
    build_store,
    free_port,
    random_images,
    spread_domain_artifact,
    zipf_weights,
)
from domain_format.preprocess import DEFAULT_MAX_PIXELS
from model_artifacts import adapter_config, backbone_network
from residual_adapters import MultiDomainNet
from server.preprocess import preprocess

TOKEN = "chaos-admin"
CLASSES = 10


# -- the server process -----------------------------------------------------------------------------
def start_server(store_dir: Path, port: int, args: argparse.Namespace) -> ServerProcess:
    env = {
        "MD_BANK_SLOTS": str(args.bank_slots),
        "MD_MERGED_CACHE": "2",
        "MD_ADMIN_TOKEN": TOKEN,
        "MD_REVISION_POLL_S": "0.2",
        "MD_DEVICE": "cpu",
        "MD_TORCH_THREADS": "1",
    }
    return ServerProcess(store_dir, env, port=port, log_level="error")


# -- what the run records ---------------------------------------------------------------------------
@dataclass
class Answer:
    domain: str
    version: int
    image: int
    probs: dict[int, float]


@dataclass
class Record:
    answers: list[Answer] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    five_xx_outside: int = 0
    five_xx_inside: int = 0
    lost_in_flight_at_kill: int = 0
    refused_while_down: int = 0
    failed_after_ready: int = 0
    failed_before_kill: int = 0
    admin_ops: Counter[str] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    artifacts: dict[tuple[str, int], tuple[bytes, bytes]] = field(default_factory=dict)
    attempted: dict[str, tuple[str, bytes, bytes]] = field(default_factory=dict)
    """sha256 of tensors -> (domain, manifest, tensors) of every upload attempted (to name lost responses)."""
    version_reused: int = 0
    kill_at: float = float("inf")
    ready_again_at: float = float("inf")


class Chaos:
    def __init__(
        self, args: argparse.Namespace, store_dir: Path, net: MultiDomainNet, fingerprint: str
    ) -> None:
        self.args = args
        self.store_dir = store_dir
        self.net = net
        self.fingerprint = fingerprint
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.domains = [f"d{i}" for i in range(args.domains)]
        self.weights = zipf_weights(args.domains, 1.1)
        self.images = random_images(16, args.size)
        self.record = Record()
        self.seed = 10_000
        self.stop_at = 0.0
        self.client: httpx.AsyncClient
        self.killed_sha = ""

    def _window(self, t: float) -> bool:
        return self.record.kill_at <= t <= self.record.ready_again_at

    async def classify_worker(self, wid: int) -> None:
        rng = random.Random(wid)
        rec = self.record
        while time.monotonic() < self.stop_at:
            domain = rng.choices(self.domains, self.weights)[0]
            index = rng.randrange(len(self.images))
            started = time.monotonic()
            client = self.client  # a fresh client (new connections) after the restart
            try:
                r = await client.post(
                    f"/v1/classify?top_k={CLASSES}",
                    content=self.images[index],
                    headers={"X-Domain": domain, "Content-Type": "image/png"},
                )
            except httpx.TransportError as exc:
                ended = time.monotonic()
                rec.transport_errors[type(exc).__name__] += 1
                if started < rec.kill_at <= ended:
                    rec.lost_in_flight_at_kill += 1
                elif self._window(started):
                    rec.refused_while_down += 1
                    await asyncio.sleep(0.05)  # a client backs off while the server restarts
                elif started > rec.ready_again_at:
                    rec.failed_after_ready += 1
                else:
                    rec.failed_before_kill += 1
                    print(f"failed before the kill: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            rec.statuses[str(r.status_code)] += 1
            if r.status_code >= 500:
                if self._window(started) or self._window(time.monotonic()):
                    rec.five_xx_inside += 1
                else:
                    rec.five_xx_outside += 1
            if r.status_code == 200:
                body = r.json()
                probs = {s["index"]: s["probability"] for s in body["results"][0]["top_k"]}
                rec.answers.append(Answer(body["domain"], body["version"], index, probs))

    async def upload(
        self, client: httpx.AsyncClient, domain: str, activate: bool, slow: bool = False
    ) -> None:
        self.seed += 1
        manifest, tensors = spread_domain_artifact(
            self.net,
            domain,
            seed=self.seed,
            size=self.args.size,
            classes=CLASSES,
            fingerprint=self.fingerprint,
        )
        self.record.attempted[sha256_hex(tensors)] = (domain, manifest, tensors)
        if slow:
            self.killed_sha = sha256_hex(tensors)
        body = pack_bundle(manifest, tensors)
        url = f"/v1/domains/{domain}/adapters?activate={'true' if activate else 'false'}"
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-tar"}
        content: bytes | object = body
        if slow:  # streamed in 16 chunks so the kill lands while the body is half sent

            async def chunks() -> object:
                step = len(body) // 16 + 1
                for i in range(0, len(body), step):
                    if i >= len(body) // 2:
                        self.half_sent.set()
                    yield body[i : i + step]
                    await asyncio.sleep(0.05)

            content = chunks()
        r = await client.post(url, content=content, headers=headers)  # type: ignore[arg-type]
        if r.status_code == 201:
            key = (domain, r.json()["version"])
            if key in self.record.artifacts and self.record.artifacts[key][1] != tensors:
                self.record.version_reused += 1
            self.record.artifacts[key] = (manifest, tensors)
        self.record.admin_ops[f"upload:{r.status_code}"] += 1

    async def admin_worker(self) -> None:
        rng = random.Random(99)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        while time.monotonic() < self.stop_at:
            await asyncio.sleep(self.args.admin_interval)
            domain = rng.choice(self.domains)
            client = self.client
            op = rng.choices(
                ["upload", "activate", "rollback", "delete_version", "delete_domain"], [5, 2, 2, 2, 1]
            )[0]
            try:
                if op == "upload":
                    await self.upload(client, domain, activate=rng.random() < 0.7)
                    continue
                info = await client.get(f"/v1/domains/{domain}")
                if info.status_code == 404:  # deleted earlier: bring it back as new versions
                    await self.upload(client, domain, activate=True)
                    continue
                detail = info.json()
                versions, active = detail["versions"], detail["active"]
                if op == "activate" and versions:
                    r = await client.put(
                        f"/v1/domains/{domain}/active", json={"version": rng.choice(versions)}, headers=auth
                    )
                elif op == "rollback":
                    r = await client.put(
                        f"/v1/domains/{domain}/active", json={"rollback": True}, headers=auth
                    )
                elif op == "delete_version" and len(versions) > 1:
                    victim = rng.choice([v for v in versions if v != active] or versions)
                    r = await client.delete(f"/v1/domains/{domain}/versions/{victim}", headers=auth)
                elif op == "delete_domain" and domain not in self.domains[:3]:  # keep the hottest alive
                    r = await client.delete(f"/v1/domains/{domain}", headers=auth)
                else:
                    continue
                self.record.admin_ops[f"{op}:{r.status_code}"] += 1
                if r.status_code >= 500:
                    self.record.five_xx_outside += 0 if self._window(time.monotonic()) else 1
            except httpx.TransportError:
                self.record.admin_ops[f"{op}:transport_error"] += 1

    async def run(self) -> None:
        args = self.args
        server = start_server(self.store_dir, self.port, args)
        await server.wait_ready_async()
        # Idle connections expire before uvicorn's 5 s keep-alive timeout: otherwise the server may close one
        # just as the client reuses it (the usual keep-alive race, a client-side ReadError, not a lost request).
        limits = httpx.Limits(
            max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8, keepalive_expiry=2.0
        )
        self.half_sent = asyncio.Event()
        start = time.monotonic()
        self.stop_at = start + args.duration + args.after_restart + 60  # bounded even if restart is slow
        self.client = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=60)
        clients = [self.client]
        try:
            client = self.client
            workers = [asyncio.create_task(self.classify_worker(w)) for w in range(args.clients)]
            admin = asyncio.create_task(self.admin_worker())
            await asyncio.sleep(args.duration)
            # The kill: a slow upload is half sent (other uploads and the load keep going).
            slow = asyncio.create_task(self.upload(client, "d1", activate=True, slow=True))
            await self.half_sent.wait()
            self.record.kill_at = time.monotonic()
            server.kill()
            try:
                await slow
            except httpx.TransportError:
                self.record.admin_ops["upload:killed"] += 1
            server = start_server(self.store_dir, self.port, args)
            await server.wait_ready_async()
            self.record.ready_again_at = time.monotonic()
            # Clients reconnect: connections to the killed process are dead, a real client opens new ones.
            self.client = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=60)
            clients.append(self.client)
            self.stop_at = time.monotonic() + args.after_restart
            await asyncio.gather(*workers, admin)
        finally:
            for c in clients:
                await c.aclose()
        server.stop()
        self.restart_seconds = self.record.ready_again_at - self.record.kill_at


# -- offline recomputation --------------------------------------------------------------------------
def recompute(store_dir: Path, record: Record, images: list[bytes], tolerance: float) -> dict[str, int]:
    """Every answer against the model library's own forward with the named version's artifact."""
    stored = LocalStore(store_dir)
    # Versions the server stored but whose upload response was lost to the kill: name them by content.
    for domain in stored.list_domains():
        for version in stored.describe(domain).versions:
            if (domain, version) not in record.artifacts:
                data = stored.get(domain, version).read_tensor_bytes(verify=True)
                found = record.attempted.get(sha256_hex(data))
                if found is not None and found[0] == domain:
                    record.artifacts[(domain, version)] = (found[1], found[2])
    backbone = stored.get_backbone()
    net = backbone_network(backbone.manifest, safetensors.torch.load(backbone.read_tensor_bytes(verify=True)))
    net.eval()
    table: dict[tuple[str, int], np.ndarray] = {}
    unknown = wrong = 0
    worst = 0.0
    for answer in record.answers:
        key = (answer.domain, answer.version)
        if key not in record.artifacts:
            unknown += 1
            continue
        if key not in table:
            manifest_bytes, tensor_bytes = record.artifacts[key]
            manifest = DomainManifest.model_validate_json(manifest_bytes)
            name = f"{key[0]}_v{key[1]}"
            net.load_domain(name, adapter_config(manifest.adapter), safetensors.torch.load(tensor_bytes))
            pre = manifest.preprocessing
            with torch.no_grad():
                x = torch.stack([preprocess(b, pre, max_pixels=DEFAULT_MAX_PIXELS) for b in images])
                table[key] = torch.softmax(net.forward_domain(x, name), dim=1).numpy()
            net.remove_domain(name)
        expected = table[key][answer.image]
        diff = max(abs(float(expected[i]) - p) for i, p in answer.probs.items())
        worst = max(worst, diff)
        if diff > tolerance or len(answer.probs) != CLASSES:
            wrong += 1
    # The check can fail: for every image, two versions of one domain differ by more than the tolerance.
    gaps = [
        float(np.abs(table[a] - table[b]).max(axis=1).min())
        for a in table
        for b in table
        if a[0] == b[0] and a[1] < b[1]
    ]
    return {
        "min_gap_between_versions": min(gaps, default=float("nan")),
        "unknown_version_answers": unknown,
        "wrong_answers": wrong,
        "versions_checked": len(table),
        "max_abs_diff": worst,
    }  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load before the kill")
    parser.add_argument("--after-restart", type=float, default=20.0, help="seconds of load after the restart")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--domains", type=int, default=12)
    parser.add_argument("--bank-slots", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--admin-interval", type=float, default=0.25, help="seconds between admin operations")
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest probability difference allowed"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        store_dir = Path(tmp) / "store"
        net = build_store(store_dir, args.width, args.size, args.domains, CLASSES)
        store = LocalStore(store_dir)
        chaos = Chaos(args, store_dir, net, store.get_backbone().manifest.fingerprint)
        for domain in store.list_domains():  # the initial versions, kept in case they get deleted
            stored = store.get(domain)
            chaos.record.artifacts[(domain, stored.version)] = (
                manifest_to_json(stored.manifest),
                stored.read_tensor_bytes(verify=True),
            )
        t0 = time.monotonic()
        asyncio.run(chaos.run())
        elapsed = time.monotonic() - t0
        problems = LocalStore(store_dir).verify()
        rec = chaos.record
        # The killed upload: either a complete listed version (verify() checked its bytes) or nothing at all.
        after = LocalStore(store_dir)
        killed_stored = [
            v
            for v in (after.describe("d1").versions if "d1" in after.list_domains() else [])
            if sha256_hex(after.get("d1", v).read_tensor_bytes(verify=True)) == chaos.killed_sha
        ]
        checks = recompute(store_dir, rec, chaos.images, args.tolerance)
        summary = {
            "seconds": round(elapsed, 1),
            "clients": args.clients,
            "domains": args.domains,
            "bank_slots": args.bank_slots,
            "answers": len(rec.answers),
            "statuses": dict(rec.statuses),
            "admin_ops": dict(rec.admin_ops),
            "five_xx_outside_restart": rec.five_xx_outside,
            "five_xx_inside_restart": rec.five_xx_inside,
            **checks,
            "version_reused": rec.version_reused,
            "store_problems_after_kill": [f"{p.field}: {p.message}" for p in problems],
            "store_consistent": not problems,
            "killed_upload_stored_as": killed_stored,
            "restart_seconds": round(chaos.restart_seconds, 2),
            "lost_in_flight_at_kill": rec.lost_in_flight_at_kill,
            "refused_while_down": rec.refused_while_down,
            "failed_after_ready": rec.failed_after_ready,
            "failed_before_kill": rec.failed_before_kill,
            "transport_errors": dict(rec.transport_errors),
            "lost_beyond_in_flight": rec.failed_after_ready + rec.failed_before_kill,
        }
        ok = (
            summary["five_xx_outside_restart"] == 0
            and checks["unknown_version_answers"] == 0
            and checks["wrong_answers"] == 0
            and not problems
            and summary["lost_beyond_in_flight"] == 0
        )
        summary["ok"] = ok
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
