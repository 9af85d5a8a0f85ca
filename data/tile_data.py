"""Loading tiles: a tile's item is its crop of the source image, resized to the model's size.

The crop is taken from the source at full resolution (the file decoded with EXIF orientation, or
the synthetic bead rendered once at ``data.synthetic.image_size``), then resized like a whole image
(:func:`data.images.square`), then augmented from the view seed like any item: the augmentation
applies to the tile. Items are ``(image, label, index, view_seed)`` as for images; ``label`` is
-1 (:data:`data.tiles.EXCLUDED`) for a sliver tile, which only evaluation datasets hold.

Synthetic tiles always crop the one render whose boxes labelled them: ``data.synthetic.fresh``
(a new bead per training view) does not apply to tiles, since a new bead puts its defect elsewhere.

:class:`TileAccess` gives :class:`data.prepare.PreparedData` its tile methods.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.config import DataConfig, SyntheticConfig
from core.errors import UserError
from data.images import BadImage, open_rgb, square
from data.loader import InspectionDataset, make_loader, synthetic_seed
from data.manifest import Sample
from data.tiles import EXCLUDED, Rect

__all__ = ["crop_tile", "source_pixels", "render_synthetic", "TileDataset", "TileAccess"]


def crop_tile(image: np.ndarray, rect: Rect, size: int, *, name: str = "the image") -> np.ndarray:
    """The tile ``rect`` of a uint8 HWC image, resized to ``size`` x ``size`` (uint8 HWC)."""
    x0, y0, x1, y1 = rect
    h, w = image.shape[:2]
    if x1 > w or y1 > h:
        raise UserError(f"{name} is {w} x {h} px but its tile {list(rect)} reaches {x1} x {y1}: the image "
                        "changed since the data stage; rerun with --force data")
    return square(Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1])), size)


def source_pixels(image: Sample, synthetic: SyntheticConfig | None, run_seed: int) -> np.ndarray:
    """An image at full resolution (uint8 HWC): the decoded file, or the bead rendered at its size."""
    if synthetic is not None:
        from data.loader import synthetic_pixels

        return synthetic_pixels(image, synthetic, run_seed, 0, synthetic.image_size)
    try:
        return np.asarray(open_rgb(image.path))
    except BadImage as exc:
        raise UserError(f"{image.path} became unreadable since the data stage ({exc}); "
                        "rerun with --force data") from None


def render_synthetic(samples: Sequence[Sample], cfg: SyntheticConfig,
                     run_seed: int) -> tuple[list[np.ndarray], dict[str, list[tuple[int, float, float, float, float]]]]:
    """Every synthetic image rendered once at the renderer's size (what ``synthetic_pixels`` gives
    for view 0) and the YOLO boxes of its defect, keyed by path (normal beads have none)."""
    from data.synth import render_sample

    pixels, boxes = [], {}
    for s in samples:
        bead = render_sample(synthetic_seed(run_seed, s, 0), s.label, cfg)
        pixels.append(bead.image)
        if bead.boxes:
            boxes[s.path] = list(bead.boxes)
    return pixels, boxes


class TileDataset(InspectionDataset):
    """Tiles of one split as items (see the module's docstring).

    ``parents`` holds each tile's image index within its split's images (``PreparedData.split``),
    so tile scores become image scores with ``data.tiles.image_scores(scores, parents[index])``.
    ``pixels`` are the tiles cached at ``size``; else ``sources`` (the parent images at full
    resolution, in RAM) are cropped per item; else each parent is decoded (or rendered) per item.
    """

    def __init__(self, tiles: list[Sample], parent_samples: list[Sample], parents: Sequence[int], size: int, *,
                 augment_cfg=None, synthetic: SyntheticConfig | None = None, run_seed: int = 0,
                 pixels: list[np.ndarray] | None = None, sources: list[np.ndarray] | None = None,
                 teacher_size: int | None = None, teacher_pixels: list[np.ndarray] | None = None) -> None:
        super().__init__(tiles, size, augment_cfg=augment_cfg, run_seed=run_seed, pixels=pixels,
                         teacher_size=teacher_size, teacher_pixels=teacher_pixels)
        if any(t.tile is None for t in tiles):
            raise ValueError("a TileDataset holds tile rows only (Sample.tile set)")
        self.parent_samples = parent_samples
        self.parents = torch.as_tensor(list(parents), dtype=torch.long)
        self.tile_synthetic = synthetic
        self.sources = sources
        self._last: tuple[str, np.ndarray] | None = None  # the last decoded parent: eval reads tiles in order

    def _pixels(self, index: int, view_seed: int, size: int) -> np.ndarray:
        if size in self.cached:
            return self.cached[size][index]
        parent = self.parent_samples[index]
        if self.sources is not None:
            image = self.sources[index]
        else:
            if self._last is None or self._last[0] != parent.path:
                self._last = (parent.path, source_pixels(parent, self.tile_synthetic, self.run_seed))
            image = self._last[1]
        return crop_tile(image, self.samples[index].tile, size, name=parent.path)  # type: ignore[arg-type]


def _decode_tiles(images: dict[str, Sample], tiles: list[Sample], size: int) -> list[np.ndarray]:
    """Each parent decoded once (threads: PIL releases the GIL), all its tiles cropped at ``size``."""
    by_parent: dict[str, list[int]] = {}
    for k, t in enumerate(tiles):
        by_parent.setdefault(t.image, []).append(k)

    def one(path: str) -> list[tuple[int, np.ndarray]]:
        image = source_pixels(images[path], None, 0)
        return [(k, crop_tile(image, tiles[k].tile, size, name=path))  # type: ignore[arg-type]
                for k in by_parent[path]]

    out: list[np.ndarray] = [None] * len(tiles)  # type: ignore[list-item]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for crops in pool.map(one, by_parent):
            for k, crop in crops:
                out[k] = crop
    return out


class TileAccess:
    """The tile half of ``PreparedData`` (``cfg``, ``samples`` (image rows), ``tiles`` (tile rows),
    ``seed`` and the pixel caches are its fields): tiles per split, their parent images, datasets
    and loaders. Training uses labelled tiles only; evaluation scores every tile of an image."""

    cfg: DataConfig
    samples: list[Sample]
    tiles: list[Sample]
    seed: int
    _tile_pixels: dict[int, list[np.ndarray]]

    def _tile_indices(self, split: str, include_excluded: bool) -> list[int]:
        if self.cfg.tiles is None or not self.tiles:
            raise UserError("data.tiles is not set: this run has no tiles (set data.tiles.grid or data.tiles.size "
                            "and rerun the data stage)")
        return [k for k, t in enumerate(self.tiles) if t.split == split and (include_excluded or t.label != EXCLUDED)]

    def tile_split(self, name: str, *, include_excluded: bool = True) -> list[Sample]:
        """The tile rows of a split, in manifest order (slivers, label -1, unless left out)."""
        return [self.tiles[k] for k in self._tile_indices(name, include_excluded)]

    def tile_parents(self, name: str, *, include_excluded: bool = True) -> torch.Tensor:
        """For each tile of :meth:`tile_split`, its image's index within ``split(name)``."""
        position = {s.path: i for i, s in enumerate(s for s in self.samples if s.split == name)}
        return torch.tensor([position[t.image] for t in self.tile_split(name, include_excluded=include_excluded)],
                            dtype=torch.long)

    def _cached_tile_pixels(self, size: int) -> list[np.ndarray] | None:
        """Every tile cropped and resized once at ``size`` when ``data.cache`` allows it (as images)."""
        if self.cfg.cache == "none":
            return None
        if self.cfg.cache == "auto" and len(self.tiles) * size * size * 3 > self.cfg.ram_limit_mb * 2**20:
            return None
        if size not in self._tile_pixels:
            if self.cfg.source == "synthetic":
                natives = self._native_sources()
                self._tile_pixels[size] = [crop_tile(natives[k], t.tile, size)  # type: ignore[arg-type]
                                           for k, t in enumerate(self.tiles)]
            else:
                self._tile_pixels[size] = _decode_tiles({s.path: s for s in self.samples}, self.tiles, size)
        return self._tile_pixels[size]

    def _native_sources(self) -> list[np.ndarray]:
        """Synthetic only: each tile's parent render (the renders are kept in RAM anyway)."""
        renders = self._cached_pixels(self.cfg.synthetic.image_size)  # type: ignore[attr-defined]
        index = {s.path: i for i, s in enumerate(self.samples)}
        return [renders[index[t.image]] for t in self.tiles]

    def tile_dataset(self, split: str, size: int, *, train: bool = False,
                     include_excluded: bool | None = None, teacher_size: int | None = None) -> TileDataset:
        """The tiles of a split at ``size``: augmented and without slivers for training; by default
        every tile, slivers included (label -1), for evaluation, so each image is scored whole.
        With ``teacher_size`` each item also carries the teacher's own view of the same tile (the
        crop resized to the teacher's size, same augmentation seed), as for images."""
        include = not train if include_excluded is None else include_excluded
        if train and include:
            raise ValueError("sliver tiles (label -1) are never trained on: include_excluded must be False with train")
        index = self._tile_indices(split, include)
        synthetic = self.cfg.synthetic if self.cfg.source == "synthetic" else None
        cached = self._cached_tile_pixels(size)
        t_cached = self._cached_tile_pixels(teacher_size) if teacher_size is not None else None
        natives = (self._native_sources() if synthetic is not None and (cached is None or
                                                                       (teacher_size is not None and t_cached is None))
                   else None)
        by_path = {s.path: s for s in self.samples}
        return TileDataset(
            [self.tiles[k] for k in index], [by_path[self.tiles[k].image] for k in index],
            self.tile_parents(split, include_excluded=include).tolist(), size,
            augment_cfg=self.cfg.augment if train else None, synthetic=synthetic, run_seed=self.seed,
            pixels=[cached[k] for k in index] if cached is not None else None,
            sources=[natives[k] for k in index] if natives is not None else None,
            teacher_size=teacher_size, teacher_pixels=[t_cached[k] for k in index] if t_cached is not None else None,
        )

    def tile_loader(self, split: str, size: int, batch_size: int, *, train: bool = False,
                    include_excluded: bool | None = None, views: int | None = None, num_replicas: int = 1,
                    rank: int = 0, teacher_size: int | None = None, epoch_length: int | None = None) -> DataLoader:
        """Like ``PreparedData.loader``, over :meth:`tile_dataset` (``(index, view_seed)`` keys)."""
        return make_loader(
            self.tile_dataset(split, size, train=train, include_excluded=include_excluded, teacher_size=teacher_size),
            batch_size, train=train, seed=self.seed, weighted=train and self.cfg.sampler == "weighted", views=views,
            num_workers=self.cfg.num_workers, num_replicas=num_replicas, rank=rank, epoch_length=epoch_length,
        )
