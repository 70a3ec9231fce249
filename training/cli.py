"""`multidomain train ...` (also `python -m training ...`): backbone, adapter, finetune, compress,
evaluate, decathlon.

Every command is a typed function of the parsed arguments returning an exit code; errors the user
can act on (bad data, bad artifact, unreachable server) print one line and return 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from multidomain_client import ClientError

from adapters_store.errors import AdapterStoreError
from adapters_store.manifest import DomainManifest, Provenance
from model_artifacts import DomainArtifact, backbone_artifact, domain_artifact, import_torchvision
from residual_adapters import ADAPTER_KINDS, AdapterConfig, MultiDomainNet, create_backbone, list_backbones
from training import export
from training.backbones import load_backbone
from training.compress import CompressionError, compress_domains
from training.data import BatchMaker, DataError, DomainData, load_domain_data
from training.evaluate import evaluate, plot_confusion
from training.recipes import DEFAULT_LOWRANK_RANK, FINETUNE, Recipe, recipe_for
from training.trainer import TrainConfig, TrainingError, TrainResult, finetune_copy, train_domain

log = logging.getLogger("training")
_EXPECTED_ERRORS = (
    DataError,
    TrainingError,
    CompressionError,
    AdapterStoreError,
    FileNotFoundError,
    ValueError,
)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    _say(f"error: {message}")
    return 2


# -- shared arguments --------------------------------------------------------------------------------------


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        help="ImageFolder directory (one sub-folder per class) or a built-in: digits, mnist, fashion-mnist, textures",
    )
    g.add_argument("--input-size", type=int, default=64, help="square crop fed to the network (default 64)")
    g.add_argument(
        "--resize", type=int, default=None, help="shorter side before cropping (default input*72/64)"
    )
    g.add_argument(
        "--val-data",
        default=None,
        metavar="DIR",
        help="validation ImageFolder with the same classes (default: DIR/val or DIR/test when --data DIR "
        "holds train/ and one of them, else --val-fraction of --data)",
    )
    g.add_argument("--val-fraction", type=float, default=0.2)
    g.add_argument(
        "--train-per-class", type=int, default=None, help="at most this many training images per class"
    )
    g.add_argument("--val-per-class", type=int, default=None)
    g.add_argument("--grayscale", action="store_true", help="read folder images as grayscale")
    g.add_argument("--no-flip", action="store_true", help="never mirror (digits, characters, signs)")


def _add_train_args(p: argparse.ArgumentParser, lr: float | None) -> None:
    """``lr`` None: the learning rate, warm-up and clip default to the measured recipe (training.recipes)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=64)
    recipe_help = "default: the measured one for the backbone and kind, see training/README.md"
    g.add_argument("--lr", type=float, default=lr, help=recipe_help if lr is None else None)
    g.add_argument(
        "--warmup-epochs", type=float, default=None, help=f"linear learning-rate warm-up ({recipe_help})"
    )
    g.add_argument(
        "--clip-grad-norm", type=float, default=None, help=f"gradient-norm clip, 0 for none ({recipe_help})"
    )
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--adapter-weight-decay", type=float, default=None, help="weight decay of the adapters")
    g.add_argument(
        "--adapter-lr", type=float, default=None, help="learning rate of the adapters (default --lr)"
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file, written after every epoch")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")


def _add_backbone_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        required=True,
        help="backbone artifact directory, or 'mobilenet_v2' for the offline ImageNet weights",
    )


def _train_config(args: argparse.Namespace, recipe: Recipe) -> TrainConfig:
    """The run's settings: the flags given, the recipe for the rest."""
    if args.threads:
        torch.set_num_threads(args.threads)
    flags: dict[str, object] = {}  # the optimisation flags given; the recipe has the rest
    if args.lr is not None:
        flags["lr"] = args.lr
    if args.warmup_epochs is not None:
        flags["warmup_epochs"] = args.warmup_epochs
    if args.clip_grad_norm is not None:
        flags["clip_grad_norm"] = args.clip_grad_norm or None
    cfg = recipe.train_config(
        epochs=args.epochs,
        batch_size=args.batch_size,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        adapter_weight_decay=args.adapter_weight_decay,
        adapter_lr=args.adapter_lr,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        **flags,
    )
    clip = cfg.clip_grad_norm
    _say(
        f"settings: lr {cfg.lr:g}, warm-up {cfg.warmup_epochs:g} epochs, gradient clip {clip if clip is not None else 'none'}, "
        f"BN statistics from {'the training images' if cfg.bn_warm_start else 'the backbone'}, "
        f"{cfg.epochs} epochs of batch {cfg.batch_size}"
    )
    return cfg


def _load_data(args: argparse.Namespace, name: str | None) -> DomainData:
    data = load_domain_data(
        args.data,
        name=name,
        input_size=args.input_size,
        resize=args.resize,
        val_fraction=args.val_fraction,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
        grayscale=args.grayscale,
        flip=False if args.no_flip else None,
        val_source=args.val_data,
    )
    # Each skipped file was already logged with its path and reason by training.data.
    _say(
        f"data {data.name}: {data.num_classes} classes, {len(data.train)} train / {len(data.val)} val images"
        f"{f', {len(data.skipped)} skipped' if data.skipped else ''} ({data.description})"
    )
    return data


def _provenance(data: DomainData, epochs: int, val_accuracy: float | None) -> Provenance:
    return Provenance(
        dataset=data.description[:256],
        epochs=epochs,
        val_accuracy=None if val_accuracy is None else min(1.0, max(0.0, val_accuracy)),
        created_at=datetime.now(UTC),
    )


def _write_artifact(args: argparse.Namespace, artifact: DomainArtifact) -> None:
    manifest, tensor_bytes = artifact
    if args.out:
        export.write_domain_dir(artifact, args.out)
        _say(f"wrote {args.out}/ (domain {manifest.domain}, {len(tensor_bytes):,} bytes of tensors)")
    if getattr(args, "bundle", None):
        export.write_bundle(artifact, args.bundle)
        _say(f"wrote bundle {args.bundle}")
    if getattr(args, "upload", None):
        _upload(args.upload, args.token, manifest, tensor_bytes)


def _upload(url: str, token: str | None, manifest: DomainManifest, tensor_bytes: bytes) -> None:
    from multidomain_client import MultidomainClient

    from adapters_store.manifest import manifest_to_json

    with MultidomainClient(url, token) as client:
        answer = client.upload(manifest.domain, manifest_to_json(manifest), tensor_bytes, activate=True)
    _say(
        f"uploaded {manifest.domain} to {url}: version {answer.get('version')} (active: {answer.get('active')})"
    )


def _run(func: Any, args: argparse.Namespace) -> int:
    """Expected failures become one clear line and exit code 2; anything else is a bug and raises."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(func(args))
    except _EXPECTED_ERRORS as exc:
        return _fail(f"{type(exc).__name__}: {exc}")
    except ClientError as exc:  # unreachable, refused...: the text carries the server's reasons
        return _fail(f"upload failed: {type(exc).__name__}: {exc}")


# -- commands ----------------------------------------------------------------------------------------------


def cmd_backbone(args: argparse.Namespace) -> int:
    if args.import_torchvision:
        classifier = None if args.no_classifier else args.classifier_domain
        backbone, domain = import_torchvision(args.arch, args.import_torchvision, classifier)
        export.write_backbone_dir(backbone, args.out / "backbone")
        _say(f"wrote {args.out / 'backbone'}/ ({args.arch}, fingerprint {backbone[0].fingerprint[:16]}...)")
        if domain is not None:
            export.write_domain_dir(domain, args.out / domain[0].domain)
            _say(f"wrote {args.out / domain[0].domain}/ (its classifier, {len(domain[0].labels)} labels)")
        return 0
    if args.data is None:
        return _fail("give --data (train from scratch) or --import-torchvision PATH")
    kwargs: dict[str, Any] = {"width": args.width} if args.arch == "resnet26" else {}
    torch.manual_seed(args.seed)
    net = create_backbone(args.arch, **kwargs)
    data = _load_data(args, args.name)
    cfg = _train_config(args, _FROM_SCRATCH)
    net.add_domain(data.name, AdapterConfig(kind="bn"), data.num_classes)
    result = train_domain(
        net, data.name, data, cfg, trainable="all", checkpoint=args.checkpoint, resume=args.resume, log=_say
    )
    promote_domain_bn(net, data.name)
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.domain_parameters(data.name).values():
        p.requires_grad_(True)
    backbone = backbone_artifact(net)
    export.write_backbone_dir(backbone, args.out / "backbone")
    artifact = domain_artifact(
        net,
        data.name,
        labels=data.labels,
        preprocessing=data.preprocessing,
        provenance=_provenance(data, args.epochs, result.best_val_accuracy),
    )
    export.write_domain_dir(artifact, args.out / data.name)
    _say(
        f"backbone {args.arch} trained on {data.name}: val accuracy {result.best_val_accuracy:.4f} "
        f"(epoch {result.best_epoch}); wrote {args.out}/backbone and {args.out}/{data.name}"
    )
    return 0


_FROM_SCRATCH = Recipe(lr=0.1, warmup_epochs=0.0, clip_grad_norm=None)
"""A backbone from scratch: the paper's recipe as it stands (how training/pretrained/ was made)."""


def promote_domain_bn(net: MultiDomainNet, name: str) -> None:
    """Make a trained domain's BN the backbone's own (base) BN: new domains start from its statistics."""
    with torch.no_grad():
        for unit in net.units:
            bn = unit.domains[name].bn
            if isinstance(bn, torch.nn.BatchNorm2d):
                unit.base_bn.load_state_dict(bn.state_dict())


def _adapter_config(args: argparse.Namespace) -> AdapterConfig:
    allocation: str | list[str] = args.allocation
    if isinstance(allocation, str) and "," in allocation:
        allocation = [a for a in allocation.split(",") if a]
    rank = args.rank if args.rank is not None or args.kind != "lowrank" else DEFAULT_LOWRANK_RANK
    return AdapterConfig(
        kind=args.kind, rank=rank, allocation=allocation, pointwise_budget=args.pointwise_budget
    )


def _arch(net: MultiDomainNet) -> str:
    return str(net.architecture["name"])


def usefulness_floor(data: DomainData) -> tuple[float, float]:
    """(majority-class rate on validation, the accuracy a domain needs to be worth serving).

    Clearly above always guessing the most frequent class: 10 points above its rate, or half the way
    from it to 100% when that class alone already scores above 80% (10 points would be out of reach).
    """
    majority = float(torch.bincount(data.val.targets).max()) / max(len(data.val), 1)
    return majority, majority + min(0.10, (1.0 - majority) / 2)


def _why_not_useful(data: DomainData, result: TrainResult) -> str | None:
    """Why the trained domain is not worth serving, or None when it is."""
    majority, floor = usefulness_floor(data)
    if result.best_val_accuracy >= floor:
        return None
    return (
        f"best validation accuracy {result.best_val_accuracy:.4f} is not clearly above always guessing the "
        f"most frequent class ({majority:.4f} on {len(data.val)} validation images; needs {floor:.4f})"
    )


def cmd_adapter(args: argparse.Namespace) -> int:
    if args.upload and not args.token:
        _say("warning: --upload without --token: the server will refuse it if it requires one")
    if not (args.out or args.bundle or args.upload):
        return _fail("nowhere to put the artifact: give --out DIR, --bundle FILE or --upload URL")
    net = load_backbone(args.backbone)
    data = _load_data(args, args.name)
    cfg = _train_config(args, recipe_for(_arch(net), args.kind))
    adapter_cfg = _adapter_config(args)
    torch.manual_seed(args.seed)  # the new head is drawn from the global RNG
    net.add_domain(data.name, adapter_cfg, data.num_classes)
    counts = net.domain_parameter_counts(adapter_cfg, data.num_classes)
    _say(
        f"training {data.name} ({adapter_cfg.kind}): {sum(counts.values()):,} parameters "
        f"({counts}) on a frozen backbone of {net.shared_parameter_count:,}"
    )
    result = train_domain(net, data.name, data, cfg, checkpoint=args.checkpoint, resume=args.resume, log=_say)
    if not result.completed:
        _say("stopped early; continue with --resume")
        return 0
    artifact = domain_artifact(
        net,
        data.name,
        labels=data.labels,
        preprocessing=data.preprocessing,
        provenance=_provenance(data, args.epochs, result.best_val_accuracy),
        dtype=args.dtype,
    )
    _say(
        f"{data.name}: best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch}, "
        f"{result.train_images_per_s:.0f} images/s"
    )
    useless = _why_not_useful(data, result)
    if useless and args.upload and not args.force:
        args.upload = None  # local files are written (to inspect); the server gets nothing
        _write_artifact(args, artifact)
        return _fail(f"not uploading {data.name}: {useless}. Upload it anyway with --force.")
    if useless:
        _say(f"warning: {useless}")
    _write_artifact(args, artifact)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    net = load_backbone(args.backbone)
    data = _load_data(args, args.name)
    cfg = _train_config(args, recipe_for(_arch(net), FINETUNE))
    torch.manual_seed(args.seed)
    tuned = finetune_copy(net, data.name, data.num_classes)
    result = train_domain(
        tuned, data.name, data, cfg, trainable="all", checkpoint=args.checkpoint, resume=args.resume, log=_say
    )
    summary = {
        "domain": data.name,
        "method": "finetune",
        "val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "trainable_parameters": result.trainable_parameters,
        "images_per_s": result.train_images_per_s,
    }
    print(json.dumps(summary))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    if (args.energy is None) == (args.budget is None):
        return _fail("give exactly one of --energy or --budget")
    net = load_backbone(args.backbone)
    manifests: dict[str, DomainManifest] = {}
    for path in args.domains:
        manifest = export.load_domain_into(net, path)
        manifests[manifest.domain] = manifest
    names = list(manifests)
    report = compress_domains(
        net, names, energy=args.energy, budget=args.budget, shared_basis=args.shared_basis
    )
    if args.data and len(args.data) != len(names):
        return _fail(f"give one --data per domain ({len(names)}), got {len(args.data)}")
    datasets = dict(zip(names, args.data, strict=True)) if args.data else {}
    rows = []
    for name in names:
        compressed = report.domains[name]
        manifest = manifests[name]
        compressed_name = f"{name}__svd"
        net.load_domain(compressed_name, compressed.config, compressed.tensors)
        row: dict[str, Any] = {
            "domain": name,
            "adapter_parameters_before": compressed.adapter_parameters_before,
            "adapter_parameters_after": compressed.adapter_parameters_after,
        }
        val_accuracy = manifest.provenance.val_accuracy
        if name in datasets:
            data = _data_for_manifest(datasets[name], manifest, args.seed)
            batches = BatchMaker(data.preprocessing, data.flip)
            row["accuracy_before"] = evaluate(net, name, data.val, batches, data.labels).top1
            row["accuracy_after"] = evaluate(net, compressed_name, data.val, batches, data.labels).top1
            val_accuracy = row["accuracy_after"]
        provenance = manifest.provenance.model_copy(
            update={"val_accuracy": val_accuracy, "created_at": datetime.now(UTC)}
        )
        artifact = domain_artifact(
            net,
            compressed_name,
            labels=manifest.labels,
            preprocessing=manifest.preprocessing,
            provenance=provenance,
            dtype=manifest.dtype,
            domain=name,
        )
        export.write_domain_dir(artifact, args.out / name)
        rows.append(row)
    saved = report.parameters_before - report.parameters_after
    summary = {
        "domains": rows,
        "adapter_parameters_before": report.parameters_before,
        "adapter_parameters_after": report.parameters_after,
        "unique_parameters_after": report.unique_parameters,
        "saved_fraction": saved / report.parameters_before if report.parameters_before else 0.0,
        "shared_basis": report.shared_basis,
    }
    for row in rows:
        acc = (
            f", val accuracy {row['accuracy_before']:.4f} -> {row['accuracy_after']:.4f}"
            if "accuracy_before" in row
            else ""
        )
        _say(
            f"{row['domain']}: adapter parameters {row['adapter_parameters_before']:,} -> "
            f"{row['adapter_parameters_after']:,}{acc}; wrote {args.out / row['domain']}/"
        )
    print(json.dumps(summary))
    return 0


def _data_for_manifest(source: str, manifest: DomainManifest, seed: int) -> DomainData:
    """The data a domain was trained on, with the manifest's own geometry and normalisation."""
    p = manifest.preprocessing
    return load_domain_data(
        source,
        name=manifest.domain,
        input_size=p.input_size,
        resize=p.resize,
        seed=seed,
        grayscale=p.channels == "grayscale" and Path(source).is_dir(),
        normalisation=(list(p.mean), list(p.std)),
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    if len(args.domain) != len(args.data):
        return _fail(f"give one --data per --domain ({len(args.domain)}), got {len(args.data)}")
    net = load_backbone(args.backbone)
    rows = []
    for path, source in zip(args.domain, args.data, strict=True):
        manifest = export.load_domain_into(net, path)
        data = _data_for_manifest(source, manifest, args.seed)
        if len(data.labels) != len(manifest.labels):
            return _fail(
                f"{source} has {len(data.labels)} classes, domain {manifest.domain} has {len(manifest.labels)}"
            )
        split = {"val": data.val, "train": data.train}[args.split]
        ev = evaluate(
            net, manifest.domain, split, BatchMaker(data.preprocessing, flip=False), manifest.labels
        )
        _say(
            f"{manifest.domain} on {source} ({args.split}, {ev.images} images): "
            f"top-1 {ev.top1:.4f}, top-5 {ev.top5:.4f}"
        )
        if args.confusion:
            png = plot_confusion(ev, args.confusion / f"{manifest.domain}-confusion.png")
            _say(f"wrote {png}")
        rows.append({"domain": ev.domain, "images": ev.images, "top1": ev.top1, "top5": ev.top5})
    print(json.dumps({"domains": rows}))
    return 0


def _decathlon_command(args: argparse.Namespace) -> str:
    """The command that reproduces this run (the options given), for the report."""
    parts = ["multidomain", "train", "decathlon", "--preset", args.preset, "--out", str(args.out)]
    for flag in ("seeds", "domains", "methods", "epochs", "replicates", "threads"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag}", str(getattr(args, flag))]
    for backbone in args.backbone or ():
        parts += ["--backbone", backbone]
    if args.kinds:
        parts += ["--kinds", *args.kinds]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_decathlon(args: argparse.Namespace) -> int:
    from training.decathlon import PRESETS, run_decathlon, with_overrides, write_report

    preset = with_overrides(
        PRESETS[args.preset],
        seeds=args.seeds,
        backbones=args.backbone,
        domains=args.domains.split(",") if args.domains else None,
        kinds=args.kinds,
        methods=args.methods.split(",") if args.methods else None,
        epochs=args.epochs,
        replicates=args.replicates,
    )
    threads = args.threads or preset.threads
    if threads:
        torch.set_num_threads(threads)
    _say(f"decathlon preset {preset.name}: needs {preset.needs}")
    started = time.perf_counter()
    cache = args.cache or Path("runs") / "decathlon-cache" / preset.name
    results = run_decathlon(preset, cache_dir=cache, log=_say, device=args.device, train=not args.report_only)
    command = _decathlon_command(args)
    _say(f"torch threads: {torch.get_num_threads()}")
    paths = write_report(results, args.out, command)
    _say(f"done in {(time.perf_counter() - started) / 60:.1f} min; wrote {', '.join(str(p) for p in paths)}")
    return 0


# -- registration ------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add the `train` command group to the `multidomain` CLI."""
    train = subparsers.add_parser("train", help="train, compress, evaluate and export domains")
    sub = train.add_subparsers(dest="train_command", required=True)

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=lambda args: _run(func, args))
        return p

    p = command("backbone", cmd_backbone, "train a backbone from scratch, or import torchvision weights")
    p.add_argument("--arch", default="resnet26", choices=list_backbones())
    p.add_argument("--width", type=float, default=1.0, help="resnet26 width multiplier")
    p.add_argument("--import-torchvision", type=Path, default=None, help="a torchvision state_dict file")
    p.add_argument("--classifier-domain", default="imagenet", help="domain name of the imported classifier")
    p.add_argument("--no-classifier", action="store_true", help="drop the imported classifier")
    p.add_argument("--name", default=None, help="name of the base domain (default: from the data)")
    p.add_argument("--out", type=Path, required=True, help="directory for backbone/ and the domain artifact")
    _add_data_args(p)
    p.set_defaults(data=None)
    for action in p._actions:  # --data is optional here: importing needs none
        if action.dest == "data":
            action.required = False
    _add_train_args(p, lr=0.1)

    p = command("adapter", cmd_adapter, "train one domain on a frozen backbone and export its artifact")
    _add_backbone_arg(p)
    p.add_argument("--name", default=None, help="domain name (default: from the data)")
    p.add_argument("--kind", default="parallel", choices=ADAPTER_KINDS)
    p.add_argument(
        "--rank", type=int, default=None, help=f"rank of lowrank adapters (default {DEFAULT_LOWRANK_RANK})"
    )
    p.add_argument("--allocation", default="all", help="all, shallow, deep, range:A-B or unit names (comma)")
    p.add_argument("--pointwise-budget", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=None, help="artifact directory to write")
    p.add_argument("--bundle", type=Path, default=None, help="also write the single-file (tar) bundle")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--upload", default=None, metavar="URL", help="upload to a running server and activate")
    p.add_argument("--token", default=None, help="the server's admin token")
    p.add_argument(
        "--force",
        action="store_true",
        help="upload even a domain no better than always guessing the most frequent class",
    )
    _add_data_args(p)
    _add_train_args(p, lr=None)

    p = command("finetune", cmd_finetune, "baseline: train every weight of a copy (not served); prints JSON")
    _add_backbone_arg(p)
    p.add_argument("--name", default=None)
    _add_data_args(p)
    _add_train_args(p, lr=None)

    p = command("compress", cmd_compress, "SVD-compress the adapters of domain artifacts")
    _add_backbone_arg(p)
    p.add_argument("domains", nargs="+", type=Path, help="domain artifact directories or bundles")
    p.add_argument(
        "--energy", type=float, default=None, help="fraction of sigma^2 kept per unit (1.0 = exact)"
    )
    p.add_argument("--budget", type=float, default=None, help="fraction of adapter parameters kept")
    p.add_argument("--shared-basis", action="store_true", help="one basis per unit across the domains")
    p.add_argument(
        "--data", action="append", default=None, help="data source per domain (same order) for accuracy"
    )
    p.add_argument("--seed", type=int, default=0, help="split seed the domains were trained with")
    p.add_argument("--out", type=Path, required=True, help="directory for the compressed artifacts")

    p = command("evaluate", cmd_evaluate, "top-1/top-5 accuracy of a domain artifact, confusion matrix PNG")
    _add_backbone_arg(p)
    p.add_argument(
        "--domain",
        type=Path,
        action="append",
        required=True,
        help="domain artifact directory or bundle (repeat)",
    )
    p.add_argument(
        "--data", action="append", required=True, help="its data source (one per --domain, same order)"
    )
    p.add_argument("--split", default="val", choices=["val", "train"], help="split of the training-time seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confusion", type=Path, default=None, help="directory for <domain>-confusion.png files")

    p = command("decathlon", cmd_decathlon, "the paper's comparison in miniature (Markdown + JSON + PNG)")
    p.add_argument("--preset", default="mini", choices=["mini", "tiny"])
    p.add_argument("--out", type=Path, default=Path("docs/decathlon-mini"), help="output path without suffix")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (training and data-split seed)")
    p.add_argument(
        "--backbone",
        action="append",
        default=None,
        help="a row set of the preset (mobilenet_v2, resnet26) or a backbone spec (repeatable)",
    )
    p.add_argument("--domains", default=None, help="comma-separated subset of the preset's domains")
    p.add_argument("--kinds", nargs="+", default=None, help="add a row per adapter kind (by registry name)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the rows")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--replicates", type=int, default=None, help="bootstrap replicates")
    p.add_argument(
        "--cache", type=Path, default=None, help="per-run results (default runs/decathlon-cache/PRESET)"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report from the runs the cache holds (unfinished ones listed)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)

    from training.studies.cli import register as register_studies  # allocation, transfer

    register_studies(sub)


def main(argv: list[str] | None = None) -> int:
    """`python -m training adapter ...` (the same commands as `multidomain train adapter ...`)."""
    parser = argparse.ArgumentParser(prog="python -m training")
    register(parser.add_subparsers(dest="command", required=True))
    raw = list(sys.argv[1:] if argv is None else argv)
    if not raw or raw[0] != "train":
        raw = ["train", *raw]
    args = parser.parse_args(raw)
    return int(args.func(args))
