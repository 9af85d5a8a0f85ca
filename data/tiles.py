"""Tiles of a whole-part image: where they lie, what each one shows, and the image's verdict.

A gap of a few dozen pixels in a megapixel frame vanishes when the frame is resized to a model's
96-224 px; in a tile of the frame resized to the same size it stays visible. So an image is cut
into tiles (``data.tiles``), each tile is labelled from the image's defect boxes and classified on
its own, and the image is as defective as its worst tile (:func:`image_scores`).

Geometry (:func:`tile_rects`): tiles cover the whole image and never leave it. With ``size`` the
tiles are squares of that side, ``stride = floor(size * (1 - overlap))`` apart, and the last row
and column are shifted inward to end at the image's edge (overlapping their neighbour more) rather
than padded. With ``grid: [rows, cols]`` an axis of length ``L`` cut ``n`` times gets tiles of
about ``L / (1 + (n - 1) * (1 - overlap))`` pixels (a pixel or two more where rounding needs it),
spread evenly from edge to edge; grid tiles are square only when the image's aspect allows.
Either way neighbours share at least ``overlap`` of a tile (they stay a pixel apart at the least),
so any defect no wider (and no taller) than that shared strip lies whole inside at least one tile.

Labels (:func:`label_tile`): a tile is a defect when it holds at least ``min_box_fraction`` of the
area of some defect box (a box cut across tiles makes every tile holding enough of it a defect);
a tile that holds only a sliver of a box (more than nothing, less than the fraction) and not
enough of any box is :data:`EXCLUDED`: scored at evaluation, never taught as normal or defect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from data.config import TilesConfig
from core.errors import UserError
from data.manifest import SPLITS, Sample

__all__ = [
    "EXCLUDED", "Rect", "tile_rects", "pixel_boxes", "label_tile", "tile_id", "make_tiles",
    "tile_report", "tile_summary_lines", "check_tile_splits", "image_scores", "worst_tiles",
]

#: The label of a tile that holds only a sliver of a defect: left out of training.
EXCLUDED = -1
#: A tile or box in source pixels: (x0, y0, x1, y1), x0 <= x < x1.
Rect = tuple[int, int, int, int]

_EPS = 1e-9  # a box cut exactly in half holds 0.5 of it on each side, whatever the float rounding


def _starts_by_size(length: int, tile: int, overlap: float) -> list[int]:
    stride = max(1, int(tile * (1.0 - overlap) + _EPS))
    n = math.ceil((length - tile) / stride) + 1
    return [i * stride for i in range(n - 1)] + [length - tile]


def _grid_axis(length: int, n: int, overlap: float) -> tuple[int, list[int]]:
    """``n`` tiles spread evenly over ``length``: the smallest tile whose (rounded) steps leave
    neighbours sharing at least ``overlap`` of it."""
    if n == 1:
        return length, [0]
    tile = max(1, math.ceil(length / (1 + (n - 1) * (1.0 - overlap)) - _EPS))
    while math.ceil((length - tile) / (n - 1)) > max(1, int(tile * (1.0 - overlap) + _EPS)):
        tile += 1
    step = (length - tile) / (n - 1)
    return tile, [math.floor(i * step + 0.5) for i in range(n)]


def tile_rects(width: int, height: int, cfg: TilesConfig, *, image: str = "the image") -> list[Rect]:
    """The tiles of a ``width`` x ``height`` image, row by row (see the module's docstring).

    Raises :class:`UserError` naming the key and ``image`` when the tiles do not fit: a tile
    ``size`` larger than the image, or a ``grid`` finer than its pixels.
    """
    if cfg.size is not None:
        if cfg.size > width or cfg.size > height:
            raise UserError(f"data.tiles.size {cfg.size} is larger than {image} ({width} x {height} px); "
                            f"give a size of at most {min(width, height)} or use data.tiles.grid")
        xs, ys = _starts_by_size(width, cfg.size, cfg.overlap), _starts_by_size(height, cfg.size, cfg.overlap)
        tw = th = cfg.size
    else:
        rows, cols = cfg.grid  # type: ignore[misc]
        tw, xs = _grid_axis(width, cols, cfg.overlap)
        th, ys = _grid_axis(height, rows, cfg.overlap)
        if len(set(xs)) < cols or len(set(ys)) < rows:
            raise UserError(f"data.tiles.grid {[rows, cols]} is finer than {image} ({width} x {height} px): "
                            "tiles would repeat; use fewer rows and columns")
    return [(x, y, x + tw, y + th) for y in ys for x in xs]


def pixel_boxes(boxes: Sequence[Sequence[float]], width: int, height: int, *,
                image: str = "the image") -> list[tuple[int, float, float, float, float]]:
    """YOLO boxes ``(class, cx, cy, w, h)`` (normalised) as ``(class, x0, y0, x1, y1)`` in pixels.

    A box overshooting the frame is clipped to it (what is outside was never in the picture); a
    box smaller than a pixel is widened to one pixel. A box with a coordinate outside [0, 1.01]
    (the YOLO reader's tolerance) or lying wholly outside the frame is an error.
    """
    out = []
    for box in boxes:
        cls, cx, cy, w, h = box
        if any(not math.isfinite(v) or v < 0.0 or v > 1.01 for v in (cx, cy, w, h)):
            raise UserError(f"{image}: box {list(box)} lies outside the image (YOLO coordinates are normalised "
                            "to [0, 1]); fix its label line")
        x0, x1 = max((cx - w / 2) * width, 0.0), min((cx + w / 2) * width, float(width))
        y0, y1 = max((cy - h / 2) * height, 0.0), min((cy + h / 2) * height, float(height))
        if x1 < x0 or y1 < y0:
            raise UserError(f"{image}: box {list(box)} lies outside the image; fix its label line")
        if x1 - x0 < 1:
            x0 = min(max((x0 + x1 - 1) / 2, 0.0), width - 1.0)
            x1 = x0 + 1
        if y1 - y0 < 1:
            y0 = min(max((y0 + y1 - 1) / 2, 0.0), height - 1.0)
            y1 = y0 + 1
        out.append((int(cls), x0, y0, x1, y1))
    return out


def label_tile(rect: Rect, boxes: Sequence[tuple[int, float, float, float, float]],
               min_box_fraction: float) -> tuple[int, int | None, float]:
    """A tile's label from pixel boxes (:func:`pixel_boxes`): 1 (defect), 0 (normal) or
    :data:`EXCLUDED` (a sliver), with the class of the box that decided it and the fraction of
    that box the tile holds (the largest fraction of any box; 0.0 and None for a normal tile)."""
    best, best_cls = 0.0, None
    for cls, x0, y0, x1, y1 in boxes:
        iw = min(x1, rect[2]) - max(x0, rect[0])
        ih = min(y1, rect[3]) - max(y0, rect[1])
        if iw <= 0 or ih <= 0:
            continue
        fraction = iw * ih / ((x1 - x0) * (y1 - y0))
        if fraction > best:
            best, best_cls = fraction, cls
    if best_cls is None:
        return 0, None, 0.0
    return (1 if best >= min_box_fraction - _EPS else EXCLUDED), best_cls, min(best, 1.0)


def tile_id(image: str, rect: Rect) -> str:
    """A tile row's own ``path``: the image's, then the rectangle (never opened as a file)."""
    return f"{image}#{rect[0]},{rect[1]},{rect[2]},{rect[3]}"


def _origin(label: int, cls: int | None, fraction: float, names: Sequence[str], cfg: TilesConfig) -> str:
    if cls is None:
        return "tile: no defect box"
    name = names[cls] if 0 <= cls < len(names) else str(cls)
    if label == 1:
        return f"tile: {fraction:.2f} of a {name} box"
    return f"tile: sliver, {fraction:.2f} of a {name} box < data.tiles.min_box_fraction {cfg.min_box_fraction}"


def make_tiles(images: list[Sample], sizes: Sequence[tuple[int, int]], boxes: dict[str, Sequence[Sequence[float]]],
               cfg: TilesConfig, class_names: Sequence[str] = ()) -> list[Sample]:
    """The tile rows of split images: each inherits its image's split and group (so a frame
    never straddles two splits) and takes its label from the image's defect ``boxes`` (YOLO
    ``(class, cx, cy, w, h)``, keyed by the image's path; none for a normal image).

    ``sizes[i]`` is ``(width, height)`` of ``images[i]``. Every image too small for the tiles is
    named in one :class:`UserError`.
    """
    if len(sizes) != len(images):
        raise ValueError(f"{len(images)} images but {len(sizes)} sizes")
    too_small: list[str] = []
    tiles: list[Sample] = []
    for image, (width, height) in zip(images, sizes):
        try:
            rects = tile_rects(width, height, cfg, image=image.path)
        except UserError as exc:
            too_small.append(str(exc))
            continue
        px = pixel_boxes(boxes.get(image.path, ()), width, height, image=image.path)
        for rect in rects:
            label, cls, fraction = label_tile(rect, px, cfg.min_box_fraction)
            tiles.append(Sample(tile_id(image.path, rect), label, image.group, image.split,
                                _origin(label, cls, fraction, class_names, cfg), image.path, rect))
    if too_small:
        more = f" (and {len(too_small) - 1} more image(s) like it)" if len(too_small) > 1 else ""
        raise UserError(too_small[0] + more)
    return tiles


def tile_report(images: list[Sample], tiles: list[Sample], cfg: TilesConfig) -> dict[str, Any]:
    """Images and tiles per split and class, the tiles excluded as slivers, and the defect images
    none of whose tiles holds enough of a box to be a defect tile (taught nothing about it)."""
    counts: dict[str, dict[str, Any]] = {}
    defect_tile_parents = {t.image for t in tiles if t.label == 1}
    per_image: dict[str, int] = {}
    for t in tiles:
        per_image[t.image] = per_image.get(t.image, 0) + 1
    for sp in SPLITS:
        ims = [s for s in images if s.split == sp]
        ts = [t for t in tiles if t.split == sp]
        counts[sp] = {
            "images": {"normal": sum(s.label == 0 for s in ims), "defect": sum(s.label == 1 for s in ims)},
            "tiles": {"normal": sum(t.label == 0 for t in ts), "defect": sum(t.label == 1 for t in ts),
                      "excluded": sum(t.label == EXCLUDED for t in ts)},
            "defect_images_without_defect_tile": sum(s.label == 1 and s.path not in defect_tile_parents for s in ims),
        }
    n = list(per_image.values()) or [0]
    return {
        "config": {"grid": list(cfg.grid) if cfg.grid else None, "size": cfg.size, "overlap": cfg.overlap,
                   "min_box_fraction": cfg.min_box_fraction},
        "counts": counts,
        "tiles_per_image": {"min": min(n), "max": max(n)},
        "excluded": sum(c["tiles"]["excluded"] for c in counts.values()),
    }


def tile_summary_lines(report: dict[str, Any]) -> list[str]:
    """Console lines for :func:`tile_report`: tiles per split and class, slivers left out."""
    lines = []
    for sp in SPLITS:
        c = report["counts"][sp]["tiles"]
        lines.append(f"  {sp:<5} {c['normal'] + c['defect']:>6} tiles   normal {c['normal']:>6}  "
                     f"defect {c['defect']:>6}  ({c['excluded']} slivers left out)")
    lost = {sp: c["defect_images_without_defect_tile"] for sp, c in report["counts"].items()
            if c["defect_images_without_defect_tile"]}
    if lost:
        lines.append(f"defect images none of whose tiles holds data.tiles.min_box_fraction of a box: {lost} "
                     "(larger tiles or more overlap would show those defects whole)")
    return lines


def check_tile_splits(report: dict[str, Any]) -> None:
    """Training on tiles needs both normal and defect tiles in train."""
    c = report["counts"]["train"]["tiles"]
    if c["defect"] == 0 or c["normal"] == 0:
        missing = "defect" if c["defect"] == 0 else "normal"
        raise UserError(
            f"data.tiles: the 'train' split has no {missing} tiles (normal {c['normal']}, defect {c['defect']}, "
            f"{c['excluded']} excluded as slivers); "
            + ("lower data.tiles.min_box_fraction, raise data.tiles.overlap or use larger tiles so a tile holds a "
               "defect box" if missing == "defect" else "use smaller tiles so some hold no defect")
        )


def image_scores(tile_scores: Any, image_ids: Any, num_images: int | None = None) -> Any:
    """Each image's score: the maximum of its tiles' scores (the worst tile decides).

    ``tile_scores`` (e.g. the probability of *defect*) and ``image_ids`` (each tile's image index,
    e.g. ``TileDataset.parents``) are 1-D arrays of one length, numpy or torch; the result has
    ``num_images`` entries (default: the largest id + 1), numpy or torch like ``tile_scores``. An
    image without any tile score is an error (its verdict would be made up).
    """
    as_torch = type(tile_scores).__module__.startswith("torch")
    if as_torch:
        dtype = tile_scores.dtype
        tile_scores = tile_scores.detach().cpu().double().numpy()
    if hasattr(image_ids, "detach"):
        image_ids = image_ids.detach().cpu().numpy()
    scores = np.asarray(tile_scores, dtype=np.float64)
    ids = np.asarray(image_ids)
    if scores.ndim != 1 or scores.shape != ids.shape:
        raise ValueError(f"tile scores {scores.shape} and image ids {ids.shape} must be 1-D and of one length")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"image ids must be integers, got {ids.dtype}")
    n = int(ids.max()) + 1 if num_images is None and ids.size else int(num_images or 0)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"image ids must lie in [0, {n}), got {int(ids.min())}..{int(ids.max())}")
    out = np.full(n, -np.inf)
    np.maximum.at(out, ids.astype(np.int64), scores)
    present = np.zeros(n, dtype=bool)
    present[ids] = True
    missing = np.flatnonzero(~present)
    if missing.size:
        raise ValueError(f"{missing.size} image(s) have no tile score, e.g. image {int(missing[0])}")
    if as_torch:
        import torch

        return torch.from_numpy(out).to(dtype)
    return out


def worst_tiles(tile_scores: Any, image_ids: Any, num_images: int) -> np.ndarray:
    """For each image, the position (in ``tile_scores``) of its highest-scoring tile: the tile whose
    score :func:`image_scores` gives the image (the first such tile on a tie)."""
    scores = np.asarray(tile_scores.detach().cpu().double().numpy() if hasattr(tile_scores, "detach") else tile_scores,
                        dtype=np.float64)
    ids = np.asarray(image_ids.detach().cpu().numpy() if hasattr(image_ids, "detach") else image_ids, dtype=np.int64)
    best = image_scores(scores, ids, num_images)
    out = np.full(num_images, -1, dtype=np.int64)
    for k in range(len(scores) - 1, -1, -1):  # backwards: the first tile of a tie is written last
        if scores[k] == best[ids[k]]:
            out[ids[k]] = k
    return out
