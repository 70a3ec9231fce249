"""Image domains made from files Debian and PyPI packages ship: glyphs rendered from fonts, tiles of photos.

One owner for the rendering and tiling that both the decathlon's domains (``training.data`` sources
``glyphs``, ``textures-split``, ``photos-split``) and ``bench/train_defaults.py`` (its letters and photos
folders) use:

- ``render_glyph``: one character in one font at a size, shift and rotation, white on black, as the
  square a classifier sees (the bench's letters, the decathlon's glyphs);
- ``glyph_set``: characters x fonts, the fonts split so that the test fonts are never seen in training
  (the way Omniglot holds out drawers: a test glyph is a known character in an unknown hand);
- ``photo_tiles`` / ``spatial_split``: non-overlapping tiles of a photo, split by where they lie (train
  tiles from one band of each photo, test tiles from another), so a test tile is never a neighbour-shifted
  copy of a training tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont
from PIL.ImageDraw import Draw

FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),  # fonts-dejavu-core (+ -extra)
    Path("/usr/share/fonts/truetype/liberation"),  # fonts-liberation
    Path("/usr/share/fonts/truetype/freefont"),  # fonts-freefont-ttf
)
GLYPH_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
"""36 classes: capital letters and digits (O and 0, I and 1 differ by a font's design: part of the task).
All 62 of A-Z a-z 0-9 were tried first: at 12 training images per class and 3 epochs every method stayed
between 1.6% and 17% (MobileNetV2, seed 0), too weak a signal to compare methods."""


class RenderError(Exception):
    """The files a rendered domain needs are not installed."""


def font_files(dirs: Sequence[Path] = FONT_DIRS) -> list[Path]:
    """Every TrueType file in ``dirs`` that renders text (DejaVu's math font draws no Latin letters)."""
    fonts = sorted(p for d in dirs if d.is_dir() for p in d.glob("*.ttf") if "Math" not in p.name)
    if not fonts:
        raise RenderError(
            f"no fonts in {', '.join(str(d) for d in dirs)}: apt-get install -y fonts-dejavu-core "
            "fonts-liberation fonts-freefont-ttf (make bench-data)"
        )
    return fonts


def render_glyph(
    font: ImageFont.FreeTypeFont, character: str, *, shift: tuple[int, int] = (0, 0), angle: float = 0.0
) -> np.ndarray:
    """uint8 [32, 32]: ``character`` centred on a 48 px canvas, shifted, rotated, the centre 32 px cut out
    (the canvas margin keeps rotated corners inside)."""
    canvas = Image.new("L", (48, 48), 0)
    Draw(canvas).text((24 + shift[0], 24 + shift[1]), character, fill=255, font=font, anchor="mm")
    glyph = canvas.rotate(angle, resample=Image.Resampling.BILINEAR)
    return np.asarray(glyph.crop((8, 8, 40, 40)))


def random_glyph(font_path: Path, character: str, rng: np.random.Generator) -> np.ndarray:
    """A glyph at a random size (16-26 px), shift (±4 px) and rotation (±12°)."""
    font = ImageFont.truetype(str(font_path), int(rng.integers(16, 27)))
    dx, dy = rng.integers(-4, 5, size=2)
    return render_glyph(font, character, shift=(int(dx), int(dy)), angle=float(rng.uniform(-12, 12)))


@dataclass
class GlyphSet:
    """Rendered glyphs, split by font."""

    train_images: np.ndarray
    """uint8 [N, 32, 32]."""
    train_targets: np.ndarray
    test_images: np.ndarray
    test_targets: np.ndarray
    train_fonts: list[str]
    test_fonts: list[str]


def glyph_set(
    seed: int,
    *,
    characters: str = GLYPH_CHARACTERS,
    test_font_fraction: float = 0.25,
    train_per_font: int = 1,
    test_per_font: int = 1,
    fonts: Sequence[Path] | None = None,
) -> GlyphSet:
    """Every character in every font (``*_per_font`` random renderings each), the fonts shuffled with ``seed``
    and ``test_font_fraction`` of them held out for the test split."""
    paths = list(fonts) if fonts is not None else font_files()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    n_test = max(1, round(test_font_fraction * len(paths)))
    if n_test >= len(paths):
        raise RenderError(f"{len(paths)} fonts cannot be split into train and test fonts")
    test_fonts = [paths[i] for i in sorted(order[:n_test])]
    train_fonts = [paths[i] for i in sorted(order[n_test:])]

    def render(font_list: list[Path], per_font: int) -> tuple[np.ndarray, np.ndarray]:
        images, targets = [], []
        for path in font_list:
            for target, character in enumerate(characters):
                for _ in range(per_font):
                    images.append(random_glyph(path, character, rng))
                    targets.append(target)
        return np.stack(images), np.asarray(targets, dtype=np.int64)

    train_x, train_y = render(train_fonts, train_per_font)
    test_x, test_y = render(test_fonts, test_per_font)
    return GlyphSet(
        train_x, train_y, test_x, test_y, [p.name for p in train_fonts], [p.name for p in test_fonts]
    )


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
"""scikit-image's colour photos that ship inside the package (no download), one class each."""


def informative(tiles: np.ndarray, min_std: float = 8.0) -> np.ndarray:
    """Boolean mask of the tiles [N, ...] that are not flat (black sky, background say nothing)."""
    return tiles.reshape(len(tiles), -1).std(axis=1) > min_std


def photo_tiles(photo: np.ndarray, tile: int) -> np.ndarray:
    """Non-overlapping ``tile`` squares of an [H, W] or [H, W, C] photo as [rows, cols, tile, tile(, C)]."""
    rows, cols = photo.shape[0] // tile, photo.shape[1] // tile
    cut = photo[: rows * tile, : cols * tile]
    shape = (rows, tile, cols, tile, *photo.shape[2:])
    return cut.reshape(shape).swapaxes(1, 2)


def spatial_split(
    rows: int, cols: int, seed: int, test_fraction: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean [rows, cols] masks (train, test): the test tiles are a band of whole columns or rows at one
    edge of the photo, the edge chosen by ``seed`` (left, right, top, bottom); the train tiles are the rest
    except one separating line of tiles, so no train tile touches a test tile."""
    edge = int(np.random.default_rng(seed).integers(4))
    horizontal = edge in (0, 1)  # a band of columns
    length = cols if horizontal else rows
    band = max(1, round(test_fraction * length))
    if band + 2 > length:
        raise RenderError(f"a {rows}x{cols} grid of tiles is too small for a spatial split")
    index = np.arange(length)
    if edge in (1, 3):
        index = index[::-1]  # the band at the far edge
    position = np.empty(length, dtype=np.int64)
    position[index] = np.arange(length)
    test_line = position < band
    train_line = position > band  # position == band: the separating line
    if horizontal:
        return np.broadcast_to(train_line, (rows, cols)).copy(), np.broadcast_to(
            test_line, (rows, cols)
        ).copy()
    return (
        np.broadcast_to(train_line[:, None], (rows, cols)).copy(),
        np.broadcast_to(test_line[:, None], (rows, cols)).copy(),
    )
