"""``multidomain store``: validate artifacts and manage the versioned store from the shell.

    multidomain store validate ARTIFACT --backbone BACKBONE_DIR    exit 0 valid, 1 invalid (reasons printed)
    multidomain store put ARTIFACT --backbone BACKBONE_DIR [--activate]
    multidomain store put-backbone BACKBONE_DIR
    multidomain store list | show DOMAIN [--version N] | activate DOMAIN VERSION | rollback DOMAIN
    multidomain store delete DOMAIN [--version N] | verify
    multidomain store copy SRC DST                               backbone, every version, active/history
    multidomain store gc [--min-age-hours H]                     remove what interrupted uploads left

ARTIFACT is a bundle (.tar) or a directory with manifest.json + adapter.safetensors; BACKBONE_DIR a
directory with manifest.json + backbone.safetensors. ``--store`` (and SRC, DST) is a directory or
``s3://bucket/prefix`` (endpoint and credentials from the usual ``AWS_*`` settings); it defaults to
``$MD_STORE_URL``, else ``$MD_STORE_DIR``, else ``./store``. Validation against a backbone goes through
``model_artifacts`` (imported lazily, so ``list`` stays fast and loads no torch); ``adapters_store`` itself
never knows the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from adapters_store import (
    AdapterStore,
    ArtifactInvalid,
    DomainManifest,
    DomainSpec,
    Problem,
    StoreError,
    ValidatedArtifact,
    ValidatedBackbone,
    open_store,
    validate_domain_artifact,
)
from adapters_store.copy import copy_store
from adapters_store.files import read_backbone_dir, read_domain_files

EXIT_OK, EXIT_INVALID = 0, 1


class _Refused(Exception):
    """Problems with the command's inputs; printed one per line, exit 1."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("refused")
        self.problems = problems


def default_store_location() -> str:
    return os.environ.get("MD_STORE_URL") or os.environ.get("MD_STORE_DIR") or "store"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``store`` command group; every command sets ``func(args) -> exit code``."""
    group = subparsers.add_parser("store", help="validate artifacts, manage the adapter store")
    commands = group.add_subparsers(dest="store_command", required=True)
    with_store = argparse.ArgumentParser(add_help=False)
    with_store.add_argument(
        "--store",
        default=None,
        help="store directory or s3://bucket/prefix (default: $MD_STORE_URL, else $MD_STORE_DIR, else ./store)",
    )

    p = commands.add_parser("validate", help="check a domain artifact against a backbone artifact")
    p.add_argument(
        "artifact", type=Path, help="bundle .tar or directory with manifest.json + adapter.safetensors"
    )
    p.add_argument(
        "--backbone", type=Path, required=True, help="directory with manifest.json + backbone.safetensors"
    )
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("put", parents=[with_store], help="validate a domain artifact and store it")
    p.add_argument("artifact", type=Path)
    p.add_argument("--backbone", type=Path, required=True)
    p.add_argument("--activate", action="store_true", help="make the new version the active one")
    p.set_defaults(func=cmd_put)

    p = commands.add_parser(
        "put-backbone", parents=[with_store], help="validate and store a backbone artifact"
    )
    p.add_argument("backbone", type=Path)
    p.set_defaults(func=cmd_put_backbone)

    p = commands.add_parser(
        "list", parents=[with_store], help="domains with their active and stored versions"
    )
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("show", parents=[with_store], help="a domain's versions and a version's manifest")
    p.add_argument("domain")
    p.add_argument("--version", type=int, default=None, help="default: the active version")
    p.set_defaults(func=cmd_show)

    p = commands.add_parser("activate", parents=[with_store], help="serve the given version of a domain")
    p.add_argument("domain")
    p.add_argument("version", type=int)
    p.set_defaults(func=cmd_activate)

    p = commands.add_parser(
        "rollback", parents=[with_store], help="re-activate the previously active version"
    )
    p.add_argument("domain")
    p.set_defaults(func=cmd_rollback)

    p = commands.add_parser("delete", parents=[with_store], help="delete a version, or a whole domain")
    p.add_argument("domain")
    p.add_argument("--version", type=int, default=None, help="only this (inactive) version")
    p.set_defaults(func=cmd_delete)

    p = commands.add_parser(
        "verify", parents=[with_store], help="check every stored file against its checksum"
    )
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser(
        "gc", parents=[with_store], help="delete what interrupted uploads left behind (never listed objects)"
    )
    p.add_argument(
        "--min-age-hours",
        type=float,
        default=1.0,
        help="S3: only objects at least this old (a live upload may not have listed its own yet)",
    )
    p.set_defaults(func=cmd_gc)

    p = commands.add_parser(
        "copy", help="copy a store (backbone, every version, active versions and rollback history)"
    )
    p.add_argument("source", help="directory or s3://bucket/prefix")
    p.add_argument("destination", help="directory or s3://bucket/prefix (its domains must be new to it)")
    p.set_defaults(func=cmd_copy)


def _store(args: argparse.Namespace) -> AdapterStore:
    return open_store(args.store if args.store is not None else default_store_location())


def _guarded(command: Callable[[argparse.Namespace, TextIO], int]) -> Callable[[argparse.Namespace], int]:
    """Map this package's refusals and the store's errors to a message and exit 1, in one place."""

    def run(args: argparse.Namespace) -> int:
        out = sys.stdout
        try:
            return command(args, out)
        except (_Refused, ArtifactInvalid) as exc:
            print("invalid:", file=out)
            for problem in exc.problems:
                print(f"  {problem}", file=out)
            return EXIT_INVALID
        except StoreError as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_INVALID

    run.__name__ = command.__name__
    return run


# -- reading artifacts from disk: adapters_store.files (size limits, pickles refused) -------------------


def backbone_spec(backbone: ValidatedBackbone) -> tuple[Callable[[DomainManifest], DomainSpec], str]:
    """Build the backbone with the model library: ``(spec_for, fingerprint)`` for validation."""
    from model_artifacts import BackboneRefused, backbone_network, spec_for

    try:
        net = backbone_network(backbone.manifest, backbone.tensors)
    except BackboneRefused as exc:
        raise _Refused([Problem(f"backbone.{exc.field}", str(exc), exc.code)]) from None
    return spec_for(net), net.fingerprint()


def validate_path(artifact: Path, backbone_dir: Path) -> ValidatedArtifact:
    """Everything ``store validate`` checks; raises ``_Refused`` / ``ArtifactInvalid``."""
    backbone = read_backbone_dir(backbone_dir)
    spec_for, fingerprint = backbone_spec(backbone)
    manifest, tensors = read_domain_files(artifact)
    return validate_domain_artifact(manifest, tensors, spec_for=spec_for, fingerprint=fingerprint)


def _summary(validated: ValidatedArtifact) -> str:
    m = validated.manifest
    return (
        f"{m.domain}: {len(m.labels)} labels, {len(validated.tensors)} tensors ({m.dtype}), "
        f"adapter {m.adapter.kind}, sha256 {m.sha256[:16]}..."
    )


# -- commands -----------------------------------------------------------------------------------------


@_guarded
def cmd_validate(args: argparse.Namespace, out: TextIO) -> int:
    validated = validate_path(args.artifact, args.backbone)
    print(f"valid: {_summary(validated)}", file=out)
    return EXIT_OK


@_guarded
def cmd_put(args: argparse.Namespace, out: TextIO) -> int:
    validated = validate_path(args.artifact, args.backbone)
    version = _store(args).put(validated, activate=args.activate)
    state = "active" if args.activate else "inactive"
    print(f"stored {validated.manifest.domain} v{version} ({state})", file=out)
    return EXIT_OK


@_guarded
def cmd_put_backbone(args: argparse.Namespace, out: TextIO) -> int:
    backbone = read_backbone_dir(args.backbone)
    backbone_spec(backbone)  # the model library must rebuild it and agree on the fingerprint
    _store(args).put_backbone(backbone)
    print(f"stored backbone {backbone.manifest.name} {backbone.manifest.fingerprint[:16]}...", file=out)
    return EXIT_OK


@_guarded
def cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    infos = store.describe_all()
    if not infos:
        print(f"no domains in {store!r}", file=out)
        return EXIT_OK
    width = max(len("DOMAIN"), *(len(i.domain) for i in infos))
    print(f"{'DOMAIN':<{width}}  ACTIVE  VERSIONS", file=out)
    for info in infos:
        active = "-" if info.active is None else f"v{info.active}"
        print(f"{info.domain:<{width}}  {active:<6}  {' '.join(f'v{v}' for v in info.versions)}", file=out)
    return EXIT_OK


@_guarded
def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    info = store.describe(args.domain)
    print(f"domain:   {info.domain}", file=out)
    print(f"active:   {'-' if info.active is None else f'v{info.active}'}", file=out)
    print(f"versions: {' '.join(f'v{v}' for v in info.versions)}", file=out)
    if info.previous:
        print(f"rollback: v{info.previous[-1]}", file=out)
    version = args.version if args.version is not None else info.active
    if version is not None:
        stored = store.get(args.domain, version)
        print(f"manifest of v{version}:", file=out)
        print(json.dumps(stored.manifest.model_dump(mode="json"), indent=2), file=out)
    return EXIT_OK


@_guarded
def cmd_activate(args: argparse.Namespace, out: TextIO) -> int:
    _store(args).activate(args.domain, args.version)
    print(f"{args.domain}: v{args.version} active", file=out)
    return EXIT_OK


@_guarded
def cmd_rollback(args: argparse.Namespace, out: TextIO) -> int:
    version = _store(args).rollback(args.domain)
    print(f"{args.domain}: rolled back to v{version}", file=out)
    return EXIT_OK


@_guarded
def cmd_delete(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    if args.version is None:
        store.delete_domain(args.domain)
        print(f"{args.domain}: deleted", file=out)
    else:
        store.delete_version(args.domain, args.version)
        print(f"{args.domain}: v{args.version} deleted", file=out)
    return EXIT_OK


@_guarded
def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    problems = _store(args).verify()
    if problems:
        raise _Refused(problems)
    print("store is consistent", file=out)
    return EXIT_OK


@_guarded
def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    removed = _store(args).collect_garbage(timedelta(hours=args.min_age_hours))
    for path in removed:
        print(f"removed {path}", file=out)
    print(f"{len(removed)} unlisted object(s) removed", file=out)
    return EXIT_OK


@_guarded
def cmd_copy(args: argparse.Namespace, out: TextIO) -> int:
    source, destination = open_store(args.source), open_store(args.destination)
    report = copy_store(source, destination)
    print(
        f"copied {report.domains} domain(s), {report.versions} version(s), {report.bytes} bytes "
        f"from {source!r} to {destination!r}",
        file=out,
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the ``store`` group alone (``python -m multidomain.store_cli list``)."""
    parser = argparse.ArgumentParser(prog="multidomain")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["store", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
