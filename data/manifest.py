"""One labelled image (or tile of an image) of the run, and the split manifest that records them all.

``manifest.csv`` has the columns path, label, group, split, origin; with ``data.tiles`` it also
has image and tile, and holds the image rows and the tile rows together (an image row leaves both
empty). A manifest without those columns has no tiles, so older manifests read as they always did.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

from core.errors import UserError
from core.files import atomic_write_text

__all__ = ["Sample", "SkippedFile", "SPLITS", "UNLABELED", "write_manifest", "read_manifest", "write_skipped"]

#: The labeled splits: every model is evaluated on each of them.
SPLITS: tuple[str, str, str] = ("train", "val", "test")
#: Images no stage may learn a label from: a pool of unlabeled images (label -1: unknown), and the
#: training images whose labels ``data.label_fraction`` held back (their true label stays in the
#: manifest for the record, and synthetic beads need it to be rendered; loaders give -1).
UNLABELED = "unlabeled"


@dataclass(frozen=True)
class Sample:
    """An image and its image-level label (0 normal, 1 defect), or a tile of one.

    A tile row (``tile`` set) has the label of its own pixels: 0, 1, or -1 (``data.tiles.EXCLUDED``:
    it holds a sliver of a defect, so it is scored but never trained on), its parent's group and
    split, ``image`` naming the parent, and a ``path`` of its own (``<image>#x0,y0,x1,y1``).

    ``path`` is a file path, or ``synthetic:<split>/<index>`` for a rendered bead. ``group`` names
    the near-identical frames it belongs to (a capture session); groups never straddle splits.
    ``split`` is train/val/test, ``unlabeled`` (:data:`UNLABELED`), or None until the splitter
    assigns one.
    """

    path: str
    label: int
    group: str
    split: str | None = None
    #: Why the label is what it is (e.g. 'boxes: gap', 'empty label file', 'folder defect').
    origin: str = ""
    #: A tile row: the parent image's ``path`` (whose pixels it crops) and the rectangle
    #: ``(x0, y0, x1, y1)`` in source pixels, x0 <= x < x1. Empty / None for an image row.
    image: str = ""
    tile: tuple[int, int, int, int] | None = None

    def with_split(self, split: str) -> Sample:
        return replace(self, split=split)

    @property
    def is_tile(self) -> bool:
        return self.tile is not None


@dataclass(frozen=True)
class SkippedFile:
    """A file the run did not use, and why; every one is listed in ``data/skipped.csv``."""

    path: str
    reason: str


def _csv_text(header: list[str], rows: list[list[object]]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


_COLUMNS = ["path", "label", "group", "split", "origin"]
_TILE_COLUMNS = ["image", "tile"]


def write_manifest(samples: list[Sample], path: Path) -> None:
    """Image rows (and tile rows, if any) as CSV; without tiles the columns are today's five."""
    tiled = any(s.is_tile for s in samples)
    rows = [[s.path, s.label, s.group, s.split or "", s.origin]
            + ([s.image, " ".join(map(str, s.tile)) if s.tile else ""] if tiled else []) for s in samples]
    atomic_write_text(path, _csv_text(_COLUMNS + (_TILE_COLUMNS if tiled else []), rows))


def _parse_tile(text: str, path: Path, line: int) -> tuple[int, int, int, int]:
    parts = text.split()
    try:
        x0, y0, x1, y1 = (int(p) for p in parts)
    except ValueError:
        x0 = y0 = x1 = y1 = 0
    if len(parts) != 4 or x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
        raise UserError(f"{path}:{line}: tile '{text}' must be 'x0 y0 x1 y1' (pixels, x0 < x1, y0 < y1); "
                        "the manifest was edited or damaged: rerun with --force data")
    return x0, y0, x1, y1


def read_manifest(path: Path) -> list[Sample]:
    """Every row, image rows and tile rows (``Sample.is_tile``) in file order."""
    out = []
    with path.open(newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            tile = row.get("tile") or ""
            out.append(Sample(row["path"], int(row["label"]), row["group"], row["split"] or None, row.get("origin", ""),
                              row.get("image") or "", _parse_tile(tile, path, line) if tile else None))
    return out


def write_skipped(skipped: list[SkippedFile], path: Path) -> None:
    atomic_write_text(path, _csv_text(["path", "reason"], [[s.path, s.reason] for s in skipped]))
