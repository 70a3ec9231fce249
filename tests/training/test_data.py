"""Data: one interface over image folders and built-ins, seeded splits, augmentation, bad files reported."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import FASHION_MNIST_DIR, BatchMaker, DataError, load_domain_data, stratified_split


def make_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 14)) -> Path:
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8) + 60 * c
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_image_folder_reports_and_skips_unreadable_files(tmp_path: Path, caplog) -> None:
    root = make_folder(tmp_path / "pets", {"cat": 6, "dog": 6})
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        data = load_domain_data(str(root), input_size=8, val_fraction=0.5)
    skipped = sorted(Path(p).name for p, _ in data.skipped)
    assert skipped == ["broken.png", "empty.jpg"]
    assert "broken.png" in caplog.text and "empty.jpg" in caplog.text
    assert data.labels == ["cat", "dog"] and data.name == "pets"
    assert len(data.train) + len(data.val) == 12
    assert data.train.images.shape[1:] == (3, 9, 9)  # resize 8 * 72/64 = 9, square
    assert data.preprocessing.channels == "rgb" and data.flip


def test_image_folder_skips_what_the_server_would_refuse(tmp_path: Path) -> None:
    """Training decodes with the server's decoder: a BMP or TIFF would be refused when served, so it is
    reported and skipped here too, never trained on."""
    root = make_folder(tmp_path / "pets", {"cat": 4, "dog": 4})
    Image.new("RGB", (20, 14)).save(root / "cat" / "odd.bmp")
    Image.new("RGB", (20, 14)).save(root / "dog" / "odd.tiff")
    data = load_domain_data(str(root), input_size=8, val_fraction=0.5)
    reasons = {Path(p).name: reason for p, reason in data.skipped}
    assert set(reasons) == {"odd.bmp", "odd.tiff"}
    assert all("not a JPEG, PNG or WebP" in r for r in reasons.values())
    assert len(data.train) + len(data.val) == 8


def test_image_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not one of"):
        load_domain_data(str(tmp_path / "missing"))
    root = make_folder(tmp_path / "x", {"a": 3})
    (root / "b").mkdir()
    (root / "b" / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"no readable images for classes \['b'\]; first skipped: .*bad.png"):
        load_domain_data(str(root))


def test_grayscale_domain_normalisation_and_no_flip_for_digits() -> None:
    data = load_domain_data("digits", input_size=16, train_per_class=20, val_per_class=5)
    assert data.preprocessing.channels == "grayscale" and not data.flip
    assert data.train.images.shape[1] == 1
    mean, std = data.preprocessing.mean, data.preprocessing.std
    assert mean[0] == mean[1] == mean[2] and 0.0 < mean[0] < 1.0 and std[0] > 0.0
    batches = BatchMaker(data.preprocessing, data.flip)
    x = batches.centre(data.train.images)
    assert x.shape == (200, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])  # grayscale replicated to 3 channels
    # Statistics of the training split: the normalised full-size images are centred and unit-scaled.
    full = BatchMaker(data.preprocessing.model_copy(update={"input_size": data.preprocessing.resize}), False)
    y = full.centre(data.train.images)
    assert abs(float(y.mean())) < 1e-3 and abs(float(y.std()) - 1.0) < 1e-2


def test_splits_are_stratified_disjoint_and_seeded() -> None:
    targets = torch.arange(10).repeat_interleave(30)
    a = stratified_split(targets, [0.6, 0.2, 0.2], seed=1, per_class=[5, None, None])
    b = stratified_split(targets, [0.6, 0.2, 0.2], seed=1, per_class=[5, None, None])
    c = stratified_split(targets, [0.6, 0.2, 0.2], seed=2, per_class=[5, None, None])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    train, val, test = a
    assert len(train) == 50 and torch.bincount(targets[train]).tolist() == [5] * 10
    assert len(val) == 60 and len(test) == 60
    assert not set(train.tolist()) & set(val.tolist()) and not set(val.tolist()) & set(test.tolist())


def test_augmentation_crops_and_flips_only_where_allowed() -> None:
    data = load_domain_data("textures", input_size=16, train_per_class=4, val_per_class=2)
    images = data.train.images
    g = torch.Generator().manual_seed(0)
    flipping = BatchMaker(data.preprocessing, flip=True)
    out = flipping.augment(images, g)
    assert out.shape == (len(images), 3, 16, 16)
    # Every augmented image is some 16x16 window of its source, mirrored or not.
    raw = flipping.normalise(images)
    windows = raw.unfold(2, 16, 1).unfold(3, 16, 1)  # [n, 3, oy, ox, 16, 16]
    mirrored = 0
    for i in range(len(images)):
        w = windows[i, 0].reshape(-1, 16, 16)
        plain = (w - out[i, 0]).abs().amax((1, 2)).min() < 1e-5
        flipped = (w - out[i, 0].flip(-1)).abs().amax((1, 2)).min() < 1e-5
        assert plain or flipped
        mirrored += int(flipped and not plain)
    assert mirrored > 0
    fixed = BatchMaker(data.preprocessing, flip=False).augment(images, torch.Generator().manual_seed(0))
    for i in range(len(images)):
        w = windows[i, 0].reshape(-1, 16, 16)
        assert (w - fixed[i, 0]).abs().amax((1, 2)).min() < 1e-5


@pytest.mark.skipif(FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is installed here")
def test_missing_fashion_mnist_says_how_to_install_it() -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_domain_data("fashion-mnist")


def test_mnist_subset_uses_the_official_test_split() -> None:
    data = load_domain_data("mnist", input_size=16, train_per_class=3, val_per_class=2, test_per_class=4)
    assert (len(data.train), len(data.val)) == (30, 20)
    assert data.test is not None and len(data.test) == 40
    assert torch.bincount(data.test.targets).tolist() == [4] * 10


def test_sixteen_bit_images_keep_their_contrast(tmp_path: Path) -> None:
    """16-bit PNGs map by their full range (as the server does), not clipped white by PIL's convert."""
    for name, level in (("dark", 8000), ("bright", 56000)):
        (tmp_path / "deep" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((12, 12), level + i, dtype=np.uint16)).save(
                tmp_path / "deep" / name / f"{i}.png"
            )
    data = load_domain_data(str(tmp_path / "deep"), input_size=8, val_fraction=0.5)
    pixels = torch.cat([data.train.images, data.val.images]).float()
    assert pixels.max() <= 255 and 0 < pixels.min() < 60  # 8000 >> 8 = 31, not 255


def test_train_and_val_folders_are_detected_and_read_as_they_stand(tmp_path: Path) -> None:
    make_folder(tmp_path / "pets" / "train", {"cat": 6, "dog": 4})
    make_folder(tmp_path / "pets" / "val", {"cat": 3, "dog": 2})
    data = load_domain_data(str(tmp_path / "pets"), input_size=8)
    assert data.name == "pets" and data.labels == ["cat", "dog"]
    assert torch.bincount(data.train.targets).tolist() == [6, 4]  # nothing split off for validation
    assert torch.bincount(data.val.targets).tolist() == [3, 2]
    assert "validation folder val" in data.description
    # test/ serves when there is no val/; --val-data names any folder; both give the same images.
    (tmp_path / "pets" / "val").rename(tmp_path / "pets" / "test")
    assert len(load_domain_data(str(tmp_path / "pets"), input_size=8).val) == 5
    given = load_domain_data(
        str(tmp_path / "pets" / "train"),
        val_source=str(tmp_path / "pets" / "test"),
        input_size=8,
        val_per_class=1,
    )
    assert given.name == "pets" and torch.bincount(given.val.targets).tolist() == [1, 1]
    assert torch.equal(given.train.images, data.train.images)


def test_train_and_val_folders_must_hold_the_same_classes(tmp_path: Path) -> None:
    make_folder(tmp_path / "pets" / "train", {"cat": 4, "dog": 4})
    make_folder(tmp_path / "pets" / "val", {"cat": 2, "owl": 2})
    with pytest.raises(DataError, match=r"same classes: .*val lacks \['dog'\], has extra \['owl'\]"):
        load_domain_data(str(tmp_path / "pets"), input_size=8)
    with pytest.raises(DataError, match="is not a directory"):
        load_domain_data(str(tmp_path / "pets" / "train"), val_source=str(tmp_path / "nope"), input_size=8)


def test_classes_named_train_and_val_are_classes(tmp_path: Path) -> None:
    """A plain ImageFolder whose classes are called train and val is not mistaken for a split pair."""
    make_folder(tmp_path / "trains", {"train": 5, "val": 5})
    data = load_domain_data(str(tmp_path / "trains"), input_size=8, val_fraction=0.4)
    assert data.labels == ["train", "val"] and (len(data.train), len(data.val)) == (6, 4)


# -- sources with a held-out split of their own (training.rendered) -------------------------------------------


def test_spatial_split_holds_out_a_band_at_an_edge_chosen_by_the_seed() -> None:
    from training.rendered import spatial_split

    edges = set()
    for seed in range(12):
        train, test = spatial_split(16, 16, seed)
        assert not (train & test).any() and test.sum() == 5 * 16 and train.sum() == 10 * 16
        # one separating line of tiles: no train tile is a 4-neighbour of a test tile
        pad = np.pad(test, 1)
        touching = pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
        assert not (train & touching).any()
        edges.add(
            (bool(test[:, 0].all()), bool(test[:, -1].all()), bool(test[0].all()), bool(test[-1].all()))
        )
    assert len(edges) == 4  # left, right, top, bottom all occur


def test_textures_split_tests_on_tiles_never_trained_on() -> None:
    data = load_domain_data("textures-split", input_size=16, seed=3, val_per_class=5, test_fraction=1.0)
    assert data.labels == ["brick", "grass", "gravel"] and data.test is not None
    train = {bytes(t.numpy()) for t in data.train.images}
    assert not any(bytes(t.numpy()) in train for t in data.test.images)
    assert "split spatially" in data.description and data.flip


def test_glyphs_test_fonts_are_never_training_fonts() -> None:
    from training.rendered import GLYPH_CHARACTERS, font_files, glyph_set

    fonts = font_files()[:8]
    glyphs = glyph_set(1, characters="Ab7", fonts=fonts, test_font_fraction=0.25)
    assert len(glyphs.test_fonts) == 2 and not set(glyphs.test_fonts) & set(glyphs.train_fonts)
    assert glyphs.train_images.shape == (6 * 3, 32, 32) and glyphs.test_images.shape == (2 * 3, 32, 32)
    assert sorted(set(glyphs.test_targets.tolist())) == [0, 1, 2]
    assert glyph_set(1, characters="Ab7", fonts=fonts).test_fonts == glyphs.test_fonts  # the seed fixes it
    assert len(GLYPH_CHARACTERS) == 36
    data = load_domain_data(
        "glyphs", input_size=16, seed=0, train_per_class=2, val_per_class=1, test_per_class=1
    )
    assert data.num_classes == 36 and not data.flip and len(data.test or []) == 36
