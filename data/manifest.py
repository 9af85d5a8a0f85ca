"""One labelled image of the run, and the split manifest that records them all."""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

from core.files import atomic_write_text

__all__ = ["Sample", "SkippedFile", "SPLITS", "write_manifest", "read_manifest", "write_skipped"]

SPLITS: tuple[str, str, str] = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """An image and its image-level label (0 normal, 1 defect).

    ``path`` is a file path, or ``synthetic:<split>/<index>`` for a rendered bead. ``group`` names
    the near-identical frames it belongs to (a capture session); groups never straddle splits.
    ``split`` is train/val/test, or None until the splitter assigns one.
    """

    path: str
    label: int
    group: str
    split: str | None = None
    #: Why the label is what it is (e.g. 'boxes: gap', 'empty label file', 'folder defect').
    origin: str = ""

    def with_split(self, split: str) -> Sample:
        return replace(self, split=split)


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


def write_manifest(samples: list[Sample], path: Path) -> None:
    rows = [[s.path, s.label, s.group, s.split or "", s.origin] for s in samples]
    atomic_write_text(path, _csv_text(["path", "label", "group", "split", "origin"], rows))


def read_manifest(path: Path) -> list[Sample]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [
            Sample(row["path"], int(row["label"]), row["group"], row["split"] or None, row.get("origin", ""))
            for row in csv.DictReader(fh)
        ]


def write_skipped(skipped: list[SkippedFile], path: Path) -> None:
    atomic_write_text(path, _csv_text(["path", "reason"], [[s.path, s.reason] for s in skipped]))
