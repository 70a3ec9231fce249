"""Kill a store's ``put`` at a chosen step, in a real subprocess (for tests and bench/store_crash.py).

The child (``python -m adapters_store.crashtest``) puts a bundle into a store (a directory or an
``s3://`` URL) with a fault hook that counts the store's write steps (``LocalStore`` calls it after
every chunk written, every fsync-and-rename stage and each phase of the index swap; ``S3Store`` after
each object uploaded and around the conditional index write). At step ``kill_at`` it reports ``PAUSED <n> <step>`` on stdout
and blocks reading stdin; the parent then SIGKILLs it. The kill therefore lands at a known point,
deterministically, without sleeps. ``kill_at=0`` runs the put to the end and lists every step.

After a kill, ``check_store`` says whether the store is still consistent.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adapters_store.bundle import unpack_bundle
from adapters_store.errors import DomainNotFound, StoreError
from adapters_store.index import DomainVersions
from adapters_store.local import LocalStore
from adapters_store.open import is_s3_url
from adapters_store.safetensors_check import check_safetensors
from adapters_store.store import AdapterStore
from adapters_store.validation import DomainSpec, sha256_hex, validate_domain_artifact

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class PutOutcome:
    """What happened to one child put."""

    killed_at: str | None
    """The step the child was paused (and killed) at; None when the put ran to the end."""
    step_number: int
    version: int | None
    """The version the put returned, when it completed."""
    steps: tuple[str, ...] = ()
    """Every step seen (only when the put ran to the end)."""


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("location", help="store directory or s3://bucket/prefix")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("kill_at", type=int)
    parser.add_argument("--activate", action="store_true")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    args = parser.parse_args(argv)

    manifest_bytes, tensor_bytes = unpack_bundle(args.bundle.read_bytes())
    # The spec is the file's own header: this harness tests the store, not validation.
    spec: DomainSpec = {n: (e.shape, e.dtype) for n, e in check_safetensors(tensor_bytes).entries.items()}
    artifact = validate_domain_artifact(
        manifest_bytes,
        tensor_bytes,
        spec_for=lambda m: spec,
        fingerprint=_manifest_fingerprint(manifest_bytes),
    )
    steps: list[str] = []

    def hook(step: str) -> None:
        steps.append(step)
        if args.kill_at <= 0:
            print(f"STEP {step}", flush=True)
        elif len(steps) == args.kill_at:
            print(f"PAUSED {len(steps)} {step}", flush=True)
            sys.stdin.read()  # the parent kills us here; EOF means it went away instead
            os._exit(3)

    store: AdapterStore
    if is_s3_url(args.location):
        from adapters_store.s3 import S3Store

        store = S3Store.from_url(args.location, fault_hook=hook)
    else:
        store = LocalStore(args.location, fault_hook=hook, chunk_bytes=args.chunk_bytes)
    version = store.put(artifact, activate=args.activate)
    print(f"DONE {version}", flush=True)


def _manifest_fingerprint(manifest_bytes: bytes) -> str:
    from adapters_store.manifest import parse_domain_manifest

    return parse_domain_manifest(manifest_bytes).backbone_fingerprint


@contextmanager
def _spawn_put(
    root: Path | str, bundle: Path, kill_at: int, activate: bool, chunk_bytes: int
) -> Iterator[subprocess.Popen[bytes]]:
    """The put child (this module run as a script), killed and its pipes closed on the way out."""
    cmd = [sys.executable, "-m", "adapters_store.crashtest", str(root), str(bundle), str(kill_at)]
    cmd += ["--chunk-bytes", str(chunk_bytes)] + (["--activate"] if activate else [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def run_put(
    root: Path | str,
    bundle: Path,
    kill_at: int,
    *,
    activate: bool = False,
    chunk_bytes: int = 1 << 20,
    timeout: float = 120.0,
) -> PutOutcome:
    """Put ``bundle`` into ``root`` from a child process; SIGKILL it at step ``kill_at`` (0: never).

    ``timeout`` only guards against a broken child; synchronisation is the child's PAUSED line.
    """
    steps: list[str] = []
    with _spawn_put(root, bundle, kill_at, activate, chunk_bytes) as proc:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                if not sel.select(timeout):
                    raise TimeoutError(f"crash child gave no sign of life for {timeout}s")
                line = proc.stdout.readline().decode().strip()
                if line.startswith("STEP "):
                    steps.append(line[5:])
                elif line.startswith("PAUSED "):
                    _, number, step = line.split(" ", 2)
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return PutOutcome(step, int(number), None)
                elif line.startswith("DONE "):
                    proc.wait()
                    return PutOutcome(None, len(steps), int(line[5:]), tuple(steps))
                else:
                    proc.wait()
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"crash child failed (rc={proc.returncode}): {line!r} {err[-2000:]}")


def run_put_killed_after(
    root: Path | str,
    bundle: Path,
    delay: float,
    *,
    activate: bool = False,
    chunk_bytes: int = 1 << 20,
    timeout: float = 120.0,
) -> PutOutcome:
    """Like ``run_put`` but SIGKILL ``delay`` seconds after the child's first write step (``LocalStore``:
    it took the lock; ``S3Store``: it begins uploading).

    For the benchmark: the kill lands wherever the child happens to be (inside a write, an fsync, a
    rename), not only at hook points. ``killed_at`` is the last step the child reported.
    """
    with _spawn_put(root, bundle, -1, activate, chunk_bytes) as proc:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"crash child gave no sign of life for {timeout}s")
            first = proc.stdout.readline().decode().strip()
            if not first.startswith("STEP "):
                proc.wait()
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"crash child failed (rc={proc.returncode}): {first!r} {err[-2000:]}")
            time.sleep(delay)  # the point of this mode: an arbitrary instant, not a chosen step
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        lines = [first, *(line.decode().strip() for line in proc.stdout.readlines())]
    steps = tuple(line[5:] for line in lines if line.startswith("STEP "))
    done = [int(line[5:]) for line in lines if line.startswith("DONE ")]
    if done:
        return PutOutcome(None, len(steps), done[0], steps)
    return PutOutcome(steps[-1], len(steps), None, steps)


def check_store(
    store: AdapterStore,
    domain: str,
    *,
    before: DomainVersions | None,
    known_sha256: dict[int, str],
    new_version: int,
    new_sha256: str,
    activate: bool,
) -> list[str]:
    """Problems with ``store`` after a put of ``domain`` that may have been killed (empty: consistent).

    ``before`` is ``describe(domain)`` before the put (None: no such domain yet), ``known_sha256`` the
    tensor sha256 of each version stored before, ``new_version``/``new_sha256`` what the put would
    create. Either the put landed entirely (``new_version`` listed, active if ``activate``) or not at
    all (the store is exactly as before); every listed version must load and match its checksum.
    """
    problems = [str(p) for p in store.verify()]
    old_versions = set(before.versions) if before else set()
    try:
        info: DomainVersions | None = store.describe(domain)
    except DomainNotFound:
        info = None
    except StoreError as exc:
        return [*problems, f"describe failed: {exc}"]
    listed = set(info.versions) if info else set()
    if old_versions - listed:
        problems.append(f"versions lost: {sorted(old_versions - listed)}")
    if listed - old_versions - {new_version}:
        problems.append(f"unexpected versions listed: {sorted(listed - old_versions - {new_version})}")
    landed = new_version in listed
    want_active = new_version if landed and activate else (before.active if before else None)
    active = info.active if info else None
    if active != want_active:
        problems.append(f"active is {active}, expected {want_active} (put {'landed' if landed else 'lost'})")
    sha_of = {**known_sha256, new_version: new_sha256}
    for version in sorted(listed):
        try:
            data = store.get(domain, version).read_tensor_bytes(verify=True)
        except StoreError as exc:
            problems.append(f"v{version} does not load: {exc}")
            continue
        if sha256_hex(data) != sha_of.get(version):
            problems.append(f"v{version} holds the wrong tensors")
    return problems


if __name__ == "__main__":
    _child(sys.argv[1:])
