"""The data stage: read the source, check every image, split, look for leakage, write the reports.

Writes into ``runs/<name>/data/``: ``manifest.csv`` (path, label, group, split — reused on rerun,
so a run never silently reshuffles), ``report.json`` (sources, class counts per split, what was
skipped, the duplicate check), ``duplicates.json``, ``skipped.csv`` and, last, ``stage.json`` (the
config and seed it was made with: a rerun with another one is refused, never silently resplit).
With ``data.tiles`` the manifest also holds each image's tiles (labelled from its boxes, in its
split) and the report counts them (``data/tiles.py``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.config import DEFECT_TYPES, DataConfig
from data.dedup import cross_split_duplicates
from core import provenance
from core.errors import UserError
from data.folder import read_folder
from data.images import phash_bits, scan_images, thumbnail
from data.loader import InspectionDataset, class_weights, make_loader, resize_rendered, synthetic_pixels
from core.files import atomic_write_text
from data.manifest import SPLITS, UNLABELED, Sample, SkippedFile, read_manifest, write_manifest, write_skipped
from data.pool import hold_back_labels, pool_counts, pool_leaks, read_pool, synthetic_pool
from core.schema import to_dict
from data.split import check_splits, complete_splits, straddling_groups, with_groups
from data.tile_data import TileAccess, render_synthetic
from data.tiles import check_tile_splits, make_tiles, tile_report, tile_summary_lines
from data.yolo import IMAGE_EXTENSIONS, read_yolo

__all__ = ["PreparedData", "prepare_data", "summary_lines", "LeakageWarning"]

_MAX_LISTED = 20


class LeakageWarning(UserWarning):
    """Near-duplicates or shared groups across splits: test numbers may be optimistic."""


@dataclass
class PreparedData(TileAccess):
    """The checked, split dataset of a run, and the way to load any split at any size.

    ``samples`` are the image rows; with ``data.tiles``, ``tiles`` are the tile rows, loaded by
    the ``tile_*`` methods of :class:`data.tile_data.TileAccess`.
    """

    cfg: DataConfig
    samples: list[Sample]
    seed: int
    report: dict
    tiles: list[Sample] = field(default_factory=list)
    _pixels: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)
    #: synthetic.variants renders by size, then (index within a training dataset, variant); the
    #: training datasets of all stages are built over the same splits, so they share them.
    _variants: dict[int, dict] = field(default_factory=dict, repr=False)
    _tile_pixels: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)  # tiles, by size
    #: Augmented fixed views by size, then (image path, view seed): see ``InspectionDataset.view_memo``.
    _views: dict[int, dict] = field(default_factory=dict, repr=False)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def labels(self, name: str) -> torch.Tensor:
        return torch.tensor([s.label for s in self.split(name)], dtype=torch.long)

    def class_weights(self) -> torch.Tensor:
        return class_weights(self.labels("train"))

    def _cached_pixels(self, size: int) -> list[np.ndarray] | None:
        """Every image's plain view decoded (or rendered) once at ``size``, reused by every epoch and stage.

        Synthetic beads are always cached (cheap: a few MB); fresh training views are rendered on
        the fly on top. Real images are cached when ``data.cache`` allows it.
        """
        synthetic = self.cfg.source == "synthetic"
        if not synthetic:
            if self.cfg.cache == "none":
                return None
            if self.cfg.cache == "auto" and len(self.samples) * size * size * 3 > self.cfg.ram_limit_mb * 2**20:
                return None
        if size not in self._pixels:
            if synthetic:
                native = self.cfg.synthetic.image_size
                if size == native:
                    self._pixels[size] = [synthetic_pixels(s, self.cfg.synthetic, self.seed, 0, size)
                                          for s in self.samples]
                else:  # rendered once at the renderer's size, resized (pixel for pixel what rendering gives)
                    self._pixels[size] = [resize_rendered(p, size) for p in self._cached_pixels(native)]
                return self._pixels[size]
            results = scan_images([s.path for s in self.samples], keep_size=size, crop_pct=self.cfg.crop_pct,
                                  desc=f"decode to RAM at {size} px")
            bad = [(s.path, r.error) for s, r in zip(self.samples, results) if r.error]
            if bad:
                raise UserError(f"{len(bad)} image(s) became unreadable since the data stage, e.g. {bad[0][0]}: "
                                f"{bad[0][1]}; rerun with --force data")
            self._pixels[size] = [r.pixels for r in results]
        return self._pixels[size]

    def dataset(self, split: str | tuple[str, ...], size: int, *, train: bool = False,
                teacher_size: int | None = None) -> InspectionDataset:
        """The images of one split, or of several (``("train", "unlabeled")``: the labeled training
        images, then the unlabeled ones), at ``size``; with ``teacher_size`` each item also carries
        the teacher's own view (see :class:`data.loader.InspectionDataset`)."""
        splits = (split,) if isinstance(split, str) else tuple(split)
        index = [i for name in splits for i, s in enumerate(self.samples) if s.split == name]
        cached = self._cached_pixels(size)
        t_cached = self._cached_pixels(teacher_size) if teacher_size is not None else None
        dataset = InspectionDataset(
            [self.samples[i] for i in index], size,
            augment_cfg=self.cfg.augment if train else None,
            crop_pct=self.cfg.crop_pct,
            synthetic=self.cfg.synthetic if self.cfg.source == "synthetic" else None,
            run_seed=self.seed,
            pixels=[cached[i] for i in index] if cached is not None else None,
            teacher_size=teacher_size,
            teacher_pixels=[t_cached[i] for i in index] if t_cached is not None else None,
        )
        if train:  # the beads rendered for one stage serve the next (teacher, then student)
            dataset.variant_cache = self._variants
        return dataset

    def loader(self, split: str | tuple[str, ...], size: int, batch_size: int, *, train: bool = False,
               views: int | None = None, teacher_size: int | None = None, num_replicas: int = 1,
               rank: int = 0, epoch_length: int | None = None) -> DataLoader:
        loader = make_loader(
            self.dataset(split, size, train=train, teacher_size=teacher_size), batch_size, train=train,
            seed=self.seed, weighted=train and self.cfg.sampler == "weighted", views=views,
            num_workers=self.cfg.num_workers, num_replicas=num_replicas, rank=rank, epoch_length=epoch_length,
        )
        if train and views is not None and self._keep_views(loader):
            loader.dataset.view_memo = self._views.setdefault(size, {})
        return loader

    def _keep_views(self, loader: DataLoader) -> bool:
        """Whether a loader's fixed augmented views are kept in RAM after their first epoch: in the
        main process only (a loader process would keep its own copy), within ``data.ram_limit_mb``
        beside the decoded images, and never with ``data.cache: none``."""
        if self.cfg.cache == "none" or loader.num_workers > 0:
            return False
        dataset = loader.dataset
        views = len(dataset) * loader.sampler.views * 3 * dataset.size ** 2 * 4  # float32
        pixels = sum(p.nbytes for p in dataset.pixels) if dataset.pixels is not None else 0
        return views + pixels <= self.cfg.ram_limit_mb * 2**20

    @property
    def tiled(self) -> bool:
        """Whether models learn and are scored on tiles (``data.tiles``) rather than whole images."""
        return self.cfg.tiles is not None

    def unit_loader(self, split: str | tuple[str, ...], size: int, batch_size: int, *, train: bool = False,
                    views: int | None = None, teacher_size: int | None = None, num_replicas: int = 1,
                    rank: int = 0, epoch_length: int | None = None, every_tile: bool = False) -> DataLoader:
        """The loader of what a model learns from and is scored on: the images of a split, or with
        ``data.tiles`` their tiles (:meth:`tile_loader`). Every stage asks this, never both kinds.

        Tiles: training and the validation that steers training see the labelled tiles only (a
        sliver has no label); ``every_tile=True`` gives every tile of every image, slivers too
        (label -1), so that each image's score is the maximum over all its tiles.
        """
        if not self.tiled:
            return self.loader(split, size, batch_size, train=train, views=views, teacher_size=teacher_size,
                               num_replicas=num_replicas, rank=rank, epoch_length=epoch_length)
        splits = (split,) if isinstance(split, str) else tuple(split)
        splits = tuple(sp for sp in splits if sp != UNLABELED)  # a tiled run has no unlabeled images (refused)
        if len(splits) != 1:
            raise ValueError(f"tiles are loaded one labelled split at a time, not {splits} "
                             "(data.tiles does not combine with unlabeled images)")
        return self.tile_loader(splits[0], size, batch_size, train=train, include_excluded=every_tile and not train,
                                views=views, num_replicas=num_replicas, rank=rank, teacher_size=teacher_size,
                                epoch_length=epoch_length)

    def unit_samples(self, split: str, *, every_tile: bool = False) -> list[Sample]:
        """The rows a :meth:`unit_loader` of ``split`` indexes (its ``index`` field): images, or tiles."""
        return self.tile_split(split, include_excluded=every_tile) if self.tiled else self.split(split)


# ----------------------------------------------------------------------------- sources
def _synthetic_samples(cfg: DataConfig, seed: int) -> list[Sample]:
    """Exact class counts per split; which indices are defects is seeded."""
    syn = cfg.synthetic
    samples: list[Sample] = []
    for split, n in (("train", syn.num_train), ("val", syn.num_val), ("test", syn.num_test)):
        n_defect = min(n - 1, max(1, round(n * syn.defect_ratio)))
        labels = np.zeros(n, dtype=int)
        labels[np.random.default_rng([seed, n, len(split)]).permutation(n)[:n_defect]] = 1
        samples += [Sample(f"synthetic:{split}/{i:06d}", int(labels[i]), f"{split}/{i:06d}", split,
                           f"synthetic {syn.view}") for i in range(n)]
    return samples


def _read_source(cfg: DataConfig) -> tuple[list[Sample], list[SkippedFile], dict]:
    if cfg.source == "yolo":
        ds = read_yolo(cfg.path, cfg.defect_classes, cfg.missing_label)
        info = {"root": str(ds.root), "class_names": ds.names, "label_counts": ds.counts, "boxes": ds.boxes}
        return ds.samples, ds.skipped, info
    if cfg.source == "folder":
        samples, skipped = read_folder(cfg.path, cfg.defect_folders, cfg.normal_folders)
        return samples, skipped, {"root": str(Path(cfg.path).expanduser())}
    return [], [], {"synthetic": to_dict(cfg.synthetic)}


def _check_images(cfg: DataConfig, samples: list[Sample],
                  skipped: list[SkippedFile]) -> tuple[list[Sample], list, list, list]:
    """Decode every image once: list all broken files together, then stop or skip them."""
    results = scan_images([s.path for s in samples])
    broken = [(s, r.error) for s, r in zip(samples, results) if r.error]
    if broken and cfg.on_corrupt == "error":
        lines = [f"{s.path}: {err}" for s, err in broken]
        more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
        raise UserError(
            f"{len(broken)} unreadable image(s):\n  " + "\n  ".join(lines[:_MAX_LISTED]) + more +
            "\nRemove or replace them, or set data.on_corrupt=skip to skip them (they are listed in data/skipped.csv)."
        )
    skipped.extend(SkippedFile(s.path, f"unreadable: {err}") for s, err in broken)
    kept = [(s, r) for s, r in zip(samples, results) if not r.error]
    return [s for s, _ in kept], [r.phash for _, r in kept], [r.thumb for _, r in kept], [r.size for _, r in kept]


# ----------------------------------------------------------------------------- the stage
def prepare_data(cfg: DataConfig, out_dir: Path, seed: int) -> PreparedData:
    """Run (or reuse) the data stage and return the split dataset."""
    if cfg.tiles is not None and (cfg.label_fraction < 1 or cfg.unlabeled or cfg.synthetic.num_unlabeled):
        raise UserError("data.tiles does not combine with unlabeled images yet (data.label_fraction < 1, "
                        "data.unlabeled or data.synthetic.num_unlabeled): tile labels come from every image's "
                        "boxes; remove one of the two")
    if cfg.tiles is not None and cfg.source == "folder":
        raise UserError(
            "data.tiles: tiles are labelled from defect boxes, and data.source 'folder' has only a label per image "
            "(which tiles of a defect image show the defect is unknown, and calling them all defects would teach "
            "clean tiles as defects); use a YOLO dataset with boxes (data.source=yolo), or remove data.tiles to "
            "train on whole images"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, report_path, record_path = out_dir / "manifest.csv", out_dir / "report.json", out_dir / "stage.json"
    record = provenance.make("data", {"data": to_dict(cfg), "seed": seed})
    verdict = provenance.check(record_path, record)
    if verdict.state == "config":
        raise UserError(
            f"the data stage in '{out_dir}' was made with a different config (changed: {', '.join(verdict.changed)}); "
            "a run must not mix splits. Rerun with --force data (this redoes every stage), or choose a new run.name"
        )
    if verdict.same and manifest.is_file() and report_path.is_file():
        rows = read_manifest(manifest)
        report = json.loads(report_path.read_text(encoding="utf-8"))
        return PreparedData(cfg, [r for r in rows if not r.is_tile], seed, report, [r for r in rows if r.is_tile])

    samples, skipped, info = _read_source(cfg)
    boxes = info.pop("boxes", {})
    pool = [s for s in samples if s.split == UNLABELED]  # a YOLO split named 'unlabeled'
    samples = [s for s in samples if s.split != UNLABELED]
    if cfg.unlabeled:
        more, skip = read_pool(cfg.unlabeled, IMAGE_EXTENSIONS)
        pool, skipped = pool + more, skipped + skip
    pool_hashes: list = []
    pool_thumbs: list = []
    if cfg.source == "synthetic":
        samples, pool = _synthetic_samples(cfg, seed), synthetic_pool(cfg.synthetic, seed)
        rendered = PreparedData(cfg, samples + pool, seed, {})
        if cfg.tiles is not None:  # the boxes come with the renders; keep those for the hashes and for training
            rendered._pixels[cfg.synthetic.image_size], boxes = render_synthetic(samples, cfg.synthetic, seed)
        renders = rendered._cached_pixels(cfg.synthetic.image_size) if cfg.dedup else None
        hashes: list[int | None] = [phash_bits(p) for p in renders] if renders else [None] * len(rendered.samples)
        thumbs: list[np.ndarray | None] = [thumbnail(p) for p in renders] if renders else [None] * len(hashes)
        hashes, pool_hashes = hashes[:len(samples)], hashes[len(samples):]
        thumbs, pool_thumbs = thumbs[:len(samples)], thumbs[len(samples):]
        sizes = [(cfg.synthetic.image_size, cfg.synthetic.image_size)] * len(samples)
        split_note = "synthetic splits"
    else:
        checked, hashes, thumbs, sizes = _check_images(cfg, samples + pool, skipped)  # every image, pool too
        keep = [s.split != UNLABELED for s in checked]
        pool_hashes, pool_thumbs = [h for h, k in zip(hashes, keep) if not k], [t for t, k in zip(thumbs, keep) if not k]
        pool = [s for s, k in zip(checked, keep) if not k]
        samples, hashes, thumbs, sizes = ([x for x, k in zip(xs, keep) if k] for xs in (checked, hashes, thumbs, sizes))
        samples, unmatched = with_groups(samples, cfg.group_by)
        info["group_by"] = {"regex": cfg.group_by, "names_not_matched": unmatched} if cfg.group_by else None
        had_splits = any(s.split for s in samples)
        by_path = {s.path: (h, t, z) for s, h, t, z in zip(samples, hashes, thumbs, sizes)}
        samples, split_note = complete_splits(samples, cfg.split, seed)
        hashes, thumbs, sizes = ([by_path[s.path][k] for s in samples] for k in range(3))
        if had_splits and cfg.group_by:
            shared = straddling_groups(samples)
            info["groups_across_splits"] = {"count": len(shared), "examples": dict(list(shared.items())[:_MAX_LISTED])}
            if shared:
                warnings.warn(f"{len(shared)} group(s) of data.group_by have images in more than one of the "
                              f"source's splits, e.g. {next(iter(shared))}", LeakageWarning, stacklevel=2)
    counts = check_splits(samples)
    tiles: list[Sample] = []
    if cfg.tiles is not None:  # after the split: a tile lives in its image's split and group
        tiles = make_tiles(samples, sizes, boxes, cfg.tiles, info.get("class_names") or DEFECT_TYPES)
        info["tiles"] = tile_report(samples, tiles, cfg.tiles)
        check_tile_splits(info["tiles"])
        if cfg.source == "synthetic":
            info["tiles"]["note"] = "synthetic tiles crop the one render whose boxes labelled them (no fresh renders)"
    duplicates = (cross_split_duplicates(samples, hashes, thumbs, cfg.dedup_distance, cfg.dedup_max_pixel_diff)
                  if cfg.dedup else {"pairs": None})
    if duplicates.get("pairs"):
        warnings.warn(
            f"{duplicates['pairs']} near-duplicate image pair(s) across splits "
            f"({duplicates['test_images_with_duplicate_elsewhere']} test images have one in train/val): test "
            "scores may be optimistic; see data/duplicates.json and consider data.group_by", LeakageWarning, stacklevel=2)
    if pool and cfg.dedup:  # a pool image copying a held-out image is leakage: refused
        held_out = [i for i, s in enumerate(samples) if s.split in ("val", "test")]
        pool_leaks(samples, cross_split_duplicates(
            [samples[i] for i in held_out] + pool, [hashes[i] for i in held_out] + pool_hashes,
            [thumbs[i] for i in held_out] + pool_thumbs, cfg.dedup_distance, cfg.dedup_max_pixel_diff,
            splits=("val", "test", UNLABELED)))
    samples = hold_back_labels(samples, cfg.label_fraction, seed) + pool
    counts = check_splits([s for s in samples if s.split in SPLITS])  # the labeled images of each split
    if any(s.split == UNLABELED for s in samples):
        info["unlabeled"] = {**pool_counts(samples), "label_fraction": cfg.label_fraction}
    report = {
        "source": cfg.source,
        **info,
        "split_method": split_note,
        "counts": counts,
        "total": len(samples),
        "skipped": len(skipped),
        "skipped_by_reason": _count_reasons(skipped),
        "duplicates": {k: v for k, v in duplicates.items() if k != "examples"},
    }
    write_skipped(skipped, out_dir / "skipped.csv")
    atomic_write_text(out_dir / "duplicates.json", json.dumps(duplicates, indent=2))
    write_manifest(samples + tiles, manifest)  # image rows (unlabeled ones too), then tile rows
    atomic_write_text(report_path, json.dumps(report, indent=2))
    provenance.save(record_path, provenance.finish(record, out_dir, ["manifest.csv"]))  # last: marks the stage done
    prepared = PreparedData(cfg, samples, seed, report, tiles)
    if cfg.source == "synthetic" and (cfg.dedup or cfg.tiles is not None):
        prepared._pixels = rendered._pixels  # the renders made for the hashes (or boxes) serve training too
    return prepared


def _count_reasons(skipped: list[SkippedFile]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in skipped:
        key = s.reason.split(":")[0].split(" (")[0]
        out[key] = out.get(key, 0) + 1
    return out


def summary_lines(report: dict) -> list[str]:
    """A few lines for the console: counts per split, skipped files, leakage."""
    lines = [f"source: {report['source']} ({report['split_method']})"]
    for sp in SPLITS:
        c = report["counts"][sp]
        total = c["normal"] + c["defect"]
        lines.append(f"  {sp:<5} {total:>6} images  normal {c['normal']:>6}  defect {c['defect']:>6}"
                     f"  ({100 * c['defect'] / max(total, 1):.1f}% defect)")
    unlabeled = report.get("unlabeled")
    if unlabeled:
        held = (f", {unlabeled['held_back_from_train']} training images whose labels data.label_fraction "
                f"{unlabeled['label_fraction']} held back" if unlabeled["held_back_from_train"] else "")
        lines.append(f"  unlabeled {unlabeled['images']:>6} images: pool {unlabeled['pool']}{held} "
                     "(no stage learns a label from them)")
    if report.get("tiles"):
        lines += tile_summary_lines(report["tiles"])
    if report["skipped"]:
        lines.append(f"skipped {report['skipped']} file(s): {report['skipped_by_reason']} (listed in data/skipped.csv)")
    dup = report["duplicates"]
    if dup.get("pairs") is None:
        lines.append("near-duplicate check: off (data.dedup=false)")
    else:
        lines.append(f"near-duplicates across splits: {dup['pairs']} pair(s) within {dup['max_distance']} bits"
                     + (" — LEAKAGE RISK, see data/duplicates.json" if dup["pairs"] else ""))
    return lines
