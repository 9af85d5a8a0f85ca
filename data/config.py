"""The ``data:`` section of a run's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.schema import FieldError

__all__ = ["AugmentConfig", "SyntheticConfig", "TilesConfig", "DataConfig", "DEFECT_TYPES"]

#: Defects seen on real sealing lines; the synthetic renderer draws each of them.
DEFECT_TYPES: tuple[str, ...] = ("gap", "bubble", "thin", "thick", "offset", "spill", "overlap")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations suited to inspection: no crops that could cut a defect out."""

    hflip: float = 0.5  # probability
    vflip: float = 0.5  # probability
    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    translate: float = 0.05  # fraction of the image side
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.2  # factor in [1 - b, 1 + b]
    contrast: float = 0.2
    saturation: float = 0.1

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FieldError(name, f"is a probability in [0, 1], got {getattr(self, name)}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise FieldError("scale", f"must be [low, high] with 0 < low <= high, got {list(self.scale)}")


@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in procedural sealant-bead images (``data.source: synthetic``)."""

    view: Literal["segment", "part"] = "segment"
    image_size: int = 96
    num_train: int = 1200
    num_val: int = 300
    num_test: int = 400
    severity: tuple[float, float] = (0.5, 1.0)
    defect_ratio: float = 0.2
    defect_types: tuple[str, ...] = DEFECT_TYPES
    #: Render new training images every epoch (same labels, new beads): data need not repeat.
    fresh: bool = True
    #: Unlabeled images rendered besides the splits (split ``unlabeled`` in the manifest): the pool a
    #: teacher labels for the student. Their classes follow ``defect_ratio``; nobody sees the label.
    num_unlabeled: int = 0
    #: With ``fresh``: how many different beads each training image cycles through (each rendered
    #: once and kept in RAM, since rendering costs as much as a training step); None: a new bead
    #: every epoch.
    variants: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise FieldError("image_size", f"must be >= 16 pixels, got {self.image_size}")
        if self.variants is not None and self.variants < 1:
            raise FieldError("variants", f"must be >= 1 or null, got {self.variants}")
        if self.num_unlabeled < 0:
            raise FieldError("num_unlabeled", f"must be >= 0, got {self.num_unlabeled}")
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 2:
                raise FieldError(name, f"must be >= 2 images, got {getattr(self, name)}")
        lo, hi = self.severity
        if not 0.0 <= lo <= hi <= 1.0:
            raise FieldError("severity", f"must be [low, high] within [0, 1], got {list(self.severity)}")
        if not 0.0 < self.defect_ratio < 1.0:
            raise FieldError("defect_ratio", f"must be in (0, 1), got {self.defect_ratio}")
        unknown = [t for t in self.defect_types if t not in DEFECT_TYPES]
        if unknown or not self.defect_types:
            raise FieldError("defect_types", f"must be a non-empty list from {list(DEFECT_TYPES)}, got {unknown or '[]'}")


@dataclass(frozen=True)
class TilesConfig:
    """Cut each image into tiles (``data.tiles``): a defect of a few dozen pixels in a megapixel
    frame survives a tile resized to the model's size, not the whole frame resized to it.

    Either ``grid: [rows, cols]`` (tiles of about ``H / rows`` by ``W / cols``, widened by the
    overlap) or ``size`` (square tiles of that many source pixels). ``overlap`` is the fraction of a
    tile shared with its neighbour, so a defect on a tile border lies whole in another tile. A tile
    is a defect when it holds at least ``min_box_fraction`` of a defect box's area; a tile holding
    less (a sliver) is left out of training rather than taught as normal.
    """

    grid: tuple[int, int] | None = None
    size: int | None = None
    overlap: float = 0.0
    min_box_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.grid is not None and self.size is not None:
            raise FieldError("grid", "and data.tiles.size are alternatives: give grid: [rows, cols] or "
                                     "size: <pixels>, not both")
        if self.grid is None and self.size is None:
            raise FieldError("size", "(or data.tiles.grid) must be given: a tile side in source pixels, "
                                     "or grid: [rows, cols]")
        if self.grid is not None and min(self.grid) < 1:
            raise FieldError("grid", f"must be [rows, cols] with both >= 1, got {list(self.grid)}")
        if self.size is not None and self.size < 8:
            raise FieldError("size", f"must be >= 8 source pixels, got {self.size}")
        if not 0.0 <= self.overlap < 1.0:
            raise FieldError("overlap", f"must be >= 0 and < 1 (a fraction of the tile), got {self.overlap}")
        if not 0.0 < self.min_box_fraction <= 1.0:
            raise FieldError("min_box_fraction", f"must be in (0, 1], got {self.min_box_fraction}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from, how they are split and checked, and how they are loaded."""

    source: Literal["synthetic", "yolo", "folder"] = "synthetic"
    #: yolo: a data.yaml file or the folder holding it; folder: the root of the class folders.
    path: str | None = None
    #: yolo: class ids or names whose boxes make an image a defect (default: every class).
    defect_classes: list[int | str] | None = None
    #: yolo: an image without a label file is 'normal' or an 'error'.
    missing_label: Literal["normal", "error"] = "normal"
    #: folder: which folder names mean defect and which mean normal.
    defect_folders: list[str] = field(default_factory=lambda: ["defect"])
    normal_folders: list[str] = field(default_factory=lambda: ["normal"])
    #: Unreadable images: stop with a list of them, or skip them and list them in the run.
    on_corrupt: Literal["error", "skip"] = "error"
    #: train/val/test fractions when the source has no split of its own.
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    #: A regex on the file name whose first group (or whole match) names a group of near-identical
    #: frames (a capture session, a burst) that must stay within one split.
    group_by: str | None = None
    #: Cross-split near-duplicate check: pairs whose perceptual hashes are within this Hamming distance ...
    dedup: bool = True
    dedup_distance: int = 4
    #: ... confirmed when their 16x16 colour thumbnails differ by at most this (mean |diff| / 255).
    dedup_max_pixel_diff: float = 0.05
    #: 'weighted' draws training batches with equal expected counts of each class.
    sampler: Literal["random", "weighted"] = "random"
    #: Weight the cross-entropy by inverse class frequency.
    class_weighted_loss: bool = False
    #: Keep decoded images in RAM ('auto': when they fit in ram_limit_mb).
    cache: Literal["none", "ram", "auto"] = "auto"
    ram_limit_mb: int = 2048
    #: Fraction of the image kept by the evaluation crop; 1.0 keeps it whole (a defect at the
    #: border must not be cropped away). Images are resized to a square.
    crop_pct: float = 1.0
    num_workers: int | None = None  # None: chosen from the CPU count
    #: Tiles of each image, labelled from its defect boxes (None: whole images only).
    tiles: TilesConfig | None = None
    #: Keep the labels of this fraction of the training split (stratified, seeded); the rest of it
    #: becomes unlabeled. Teacher and baseline learn from the labeled images only; a distilled
    #: student learns from the labels and from the teacher on every training and pool image.
    #: Validation and test keep every label.
    label_fraction: float = 1.0
    #: A pool of unlabeled images: a folder (searched recursively) or a .txt list of image paths
    #: (relative to the list's folder). A YOLO source may name a split 'unlabeled' in data.yaml instead.
    unlabeled: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.source in ("yolo", "folder") and not self.path:
            raise FieldError("path", f"is required for data.source '{self.source}' (the dataset's location)")
        if any(f < 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6 or self.split[0] <= 0:
            raise FieldError("split", f"must be three fractions train, val, test that sum to 1, got {list(self.split)}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise FieldError("crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise FieldError("label_fraction", f"must be in (0, 1], got {self.label_fraction}")
        if self.unlabeled is not None and self.source == "synthetic":
            raise FieldError("unlabeled", "is for image files; the synthetic source renders its pool: set "
                                          "data.synthetic.num_unlabeled=N instead")
        if self.tiles is not None and self.crop_pct < 1.0:
            raise FieldError("crop_pct", f"must be 1.0 with data.tiles (tiles cover the whole image), "
                                         f"got {self.crop_pct}")
        if not 0.0 <= self.dedup_max_pixel_diff <= 1.0:
            raise FieldError("dedup_max_pixel_diff", f"must be in [0, 1], got {self.dedup_max_pixel_diff}")
        if self.dedup_distance < 0:
            raise FieldError("dedup_distance", f"must be >= 0, got {self.dedup_distance}")
        if self.num_workers is not None and self.num_workers < 0:
            raise FieldError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.group_by is not None:
            import re

            try:
                re.compile(self.group_by)
            except re.error as exc:
                raise FieldError("group_by", f"is not a valid regular expression: {exc}") from None
