"""Predicting whole images with a model trained on tiles (``data.tiles``).

The model's metadata (``tiles`` in the ONNX file or in ``meta.json``) says how it cut images in
training: a grid or a tile size, the overlap, and the image-level threshold. Here a new image is
cut the same way (:func:`data.tiles.tile_rects` on the image at full resolution), every tile is
resized to the model's size like a whole image (:func:`data.images.square`, as
:func:`data.tile_data.crop_tile` does in training), all tiles of one image go through the model as
one batch, and the image's probability of defect is the maximum over its tiles: the worst tile
decides, at the image-level threshold chosen on validation images.

Like the ONNX path of :mod:`deploy.predict`, nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.errors import UserError
from core.schema import FieldError
from data.config import TilesConfig
from data.images import BadImage, open_rgb, square
from data.tiles import Rect, image_scores, tile_rects

__all__ = ["Tiling", "tiling_of", "cut", "TiledImage", "score_image"]


@dataclass(frozen=True)
class Tiling:
    """How a tiled model cuts an image, and the image-level threshold (None: not stored)."""

    cfg: TilesConfig
    threshold: float | None
    tiles_per_image: int | None = None

    def describe(self) -> str:
        how = f"grid {list(self.cfg.grid)}" if self.cfg.grid else f"{self.cfg.size} px tiles"
        return f"{how}, overlap {self.cfg.overlap}"


def tiling_of(meta: dict[str, Any], source: str | Path) -> Tiling | None:
    """The tiling of a model from its metadata (ONNX ``tiles``, or ``meta.json`` ``tiles`` with the
    threshold under ``image``), or None for a model of whole images."""
    t = meta.get("tiles")
    if not t:
        return None
    try:
        cfg = TilesConfig(grid=tuple(int(v) for v in t["grid"]) if t.get("grid") else None,  # type: ignore[arg-type]
                          size=int(t["size"]) if t.get("size") else None, overlap=float(t.get("overlap", 0.0)))
    except (FieldError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"'{source}': its tiling metadata {t} is not valid ({exc}); export the model again with "
                        "python -m distill.run ... --force export") from None
    threshold = t.get("threshold", (meta.get("image") or {}).get("threshold"))
    return Tiling(cfg, None if threshold is None else float(threshold), t.get("tiles_per_image"))


def cut(pixels: np.ndarray, tiling: Tiling, size: int, *,
        name: str = "the image") -> tuple[list[Rect], list[np.ndarray]]:
    """The tiles of a uint8 H,W,3 image at full resolution, each resized to ``size`` (uint8)."""
    h, w = pixels.shape[:2]
    rects = tile_rects(w, h, tiling.cfg, image=name)
    return rects, [square(Image.fromarray(np.ascontiguousarray(pixels[y0:y1, x0:x1])), size)
                   for x0, y0, x1, y1 in rects]


@dataclass
class TiledImage:
    """One image's tiles and their scores; ``prob`` is the maximum, at tile ``worst``."""

    pixels: np.ndarray  # the image at full resolution, uint8 H,W,3
    rects: list[Rect]
    tiles: list[np.ndarray]  # each tile at the model's size, uint8
    probs: np.ndarray  # probability of defect per tile
    prob: float
    worst: int


def score_image(path: Path, tiling: Tiling, size: int,
                probabilities: Callable[[list[np.ndarray]], np.ndarray]) -> TiledImage | str:
    """Decode ``path``, cut it, score all its tiles in one batch (``probabilities``: uint8 tiles ->
    probability of defect per tile); or why it cannot be (unreadable, smaller than the tiles)."""
    try:
        pixels = np.asarray(open_rgb(path))
    except BadImage as exc:
        return str(exc)
    try:
        rects, tiles = cut(pixels, tiling, size, name=str(path))
    except UserError as exc:
        return str(exc)
    probs = np.asarray(probabilities(tiles), dtype=np.float64)
    prob = float(image_scores(probs, np.zeros(len(probs), dtype=np.int64), 1)[0])
    return TiledImage(pixels, rects, tiles, probs, prob, int(np.flatnonzero(probs == prob)[0]))
