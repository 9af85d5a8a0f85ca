"""The run directory's format: every name a run writes, in one place, with its readers and writers.

    runs/<name>/
      config.yaml            the resolved config, as run
      data/                  manifest.csv, report.json, duplicates.json, skipped.csv, stage.json
      teacher/               model.safetensors + meta.json, predictions.csv, stage.json,
                             last.ckpt (resume), metrics.csv, tb/; with data.tiles predictions.csv
                             holds the labelled tiles and image_predictions.csv each image (its
                             worst tile's score)
      student/               the same for the distilled student (+ teacher_cache.safetensors)
      student_baseline/      the same student trained without the teacher
      student_pruned/        the same after pruning; round<k>/ per pruning round
      export/                <model>.onnx (+ .json), <model>_int8.onnx, <model>_int8_predictions.csv
                             (+ <model>_int8_image_predictions.csv with tiles), verify.json, stage.json
      profile.json           params, MACs, latency per runtime of every model (with its provenance)
      report.md, report.json, plots/

Every other module asks :class:`RunDir` for a path instead of spelling it, so the format has one
owner. ``stage.json`` is the provenance record of :mod:`core.provenance`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError
from core.files import atomic_write_text

__all__ = [
    "CONFIG", "META", "WEIGHTS", "PREDICTIONS", "IMAGE_PREDICTIONS", "RECORD", "CHECKPOINT", "MODELS", "DEPLOY_ORDER",
    "STAGES",
    "STAGE_OF", "STAGE_OUTPUTS", "PREDICTION_COLUMNS", "RunDir", "SplitScores", "is_model_dir", "read_json",
    "predictions_text", "read_predictions",
]

CONFIG = "config.yaml"
META, WEIGHTS = "meta.json", "model.safetensors"
PREDICTIONS = "predictions.csv"
#: With data.tiles: one row per image, its score the maximum over its tiles (same columns).
IMAGE_PREDICTIONS = "image_predictions.csv"
RECORD = "stage.json"
CHECKPOINT = "last.ckpt"

#: The pipeline's stages, in order; ``--stages`` and ``--force`` take these names.
STAGES: tuple[str, ...] = ("data", "teacher", "student", "prune", "export", "report")
#: Model directories a run may hold, in the order the report lists them.
MODELS: tuple[str, ...] = ("teacher", "student_baseline", "student", "student_pruned")
#: Without a report's choice, the first of these a run has is the deployed model.
DEPLOY_ORDER: tuple[str, ...] = ("student_pruned", "student")
#: The stage that makes each model directory.
STAGE_OF: dict[str, str] = {"teacher": "teacher", "student": "student", "student_baseline": "student",
                            "student_pruned": "prune"}
#: What each stage leaves in the run directory (what ``--force`` removes).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "data": ("data",), "teacher": ("teacher",), "student": ("student", "student_baseline"),
    "prune": ("student_pruned",), "export": ("export",),
    "report": ("report.md", "report.json", "profile.json", "plots"),
}
PREDICTION_COLUMNS: tuple[str, ...] = ("split", "index", "path", "label", "prob_defect", "logit_normal", "logit_defect")


class RunDir:
    """Paths of one run directory ``runs/<name>``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.name = self.root.name
        self.config = self.root / CONFIG
        self.data = self.root / "data"
        self.manifest = self.data / "manifest.csv"
        self.data_report = self.data / "report.json"
        self.export = self.root / "export"
        self.verify = self.export / "verify.json"
        self.profile = self.root / "profile.json"
        self.report_json = self.root / "report.json"
        self.report_md = self.root / "report.md"
        self.plots = self.root / "plots"

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def model(self, name: str) -> Path:
        """A model directory (or any stage directory: ``data``, ``export``)."""
        return self.root / name

    def meta(self, name: str) -> Path:
        return self.root / name / META

    def weights(self, name: str) -> Path:
        return self.root / name / WEIGHTS

    def predictions(self, name: str) -> Path:
        return self.root / name / PREDICTIONS

    def image_predictions(self, name: str) -> Path:
        """With data.tiles: each image's score (its worst tile) on every split."""
        return self.root / name / IMAGE_PREDICTIONS

    def record(self, stage_dir: str) -> Path:
        return self.root / stage_dir / RECORD

    def onnx(self, name: str, *, int8: bool = False) -> Path:
        return self.export / (f"{name}_int8.onnx" if int8 else f"{name}.onnx")

    def int8_predictions(self, name: str) -> Path:
        return self.export / f"{name}_int8_{PREDICTIONS}"

    def int8_image_predictions(self, name: str) -> Path:
        return self.export / f"{name}_int8_{IMAGE_PREDICTIONS}"

    def finished(self, name: str) -> bool:
        """Whether the model directory ``name`` holds a finished model (weights and meta.json)."""
        return is_model_dir(self.model(name))

    def finished_models(self) -> list[str]:
        return [n for n in MODELS if self.finished(n)]

    def read_meta(self, name: str) -> dict[str, Any]:
        path = self.meta(name)
        if not path.is_file():
            raise UserError(f"no finished model in '{path.parent}' ({META} is missing); run its stage first")
        return read_json(path)


def is_model_dir(path: Path) -> bool:
    """A finished model directory: ``model.safetensors`` and ``meta.json``."""
    return (Path(path) / META).is_file() and (Path(path) / WEIGHTS).is_file()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the run; a damaged one is a :class:`UserError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); rerun the stage that wrote it (--force)") from None


# ----------------------------------------------------------------------------- predictions.csv
def predictions_text(rows: Iterable[tuple[str, int, str, int, float, float, float]]) -> str:
    """``predictions.csv`` for rows ``(split, index, path, label, prob_defect, logit_normal, logit_defect)``.

    Numbers are written as Python's shortest exact form (``repr``), so they read back to the very
    value the stage computed: the report recomputes every figure from this file and must find the
    same decisions as at training time.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for split, index, path, label, prob, logit0, logit1 in rows:
        writer.writerow([split, index, path, label, repr(float(prob)), repr(float(logit0)), repr(float(logit1))])
    return buf.getvalue()


def write_predictions(path: Path, rows: Iterable[tuple[str, int, str, int, float, float, float]]) -> None:
    atomic_write_text(path, predictions_text(rows))


@dataclass(frozen=True)
class SplitScores:
    """One model's predictions on one split, ordered by the image's index within the split."""

    probs: np.ndarray  # float64 probability of defect
    labels: np.ndarray  # int64, 1 = defect
    index: np.ndarray  # int64 position within the split
    paths: list[str]  # file path, or synthetic:<split>/<index>


def _parse_row(row: dict[str, str], path: Path, line: int) -> tuple[str, int, str, int, float]:
    try:
        label, prob, index = int(row["label"]), float(row["prob_defect"]), int(row["index"])
    except (TypeError, ValueError):
        raise UserError(f"{path} line {line}: label, index and prob_defect must be numbers, got {row}") from None
    if label not in (0, 1) or not 0.0 <= prob <= 1.0:
        raise UserError(f"{path} line {line}: label must be 0 or 1 and prob_defect in [0, 1], "
                        f"got label {row['label']}, prob_defect {row['prob_defect']}")
    return row["split"], index, row["path"], label, prob


def read_predictions(path: Path) -> dict[str, SplitScores]:
    """``predictions.csv`` (columns :data:`PREDICTION_COLUMNS`) as scores per split, sorted by index."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' is missing; rerun the stage that makes it (--force <stage>)")
    rows: dict[str, list[tuple[int, str, int, float]]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("split", "index", "path", "label", "prob_defect") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; expected {', '.join(PREDICTION_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            split, index, image, label, prob = _parse_row(row, path, line)
            rows.setdefault(split, []).append((index, image, label, prob))
    out = {}
    for split, items in rows.items():
        items.sort()
        index = np.array([i for i, *_ in items], dtype=np.int64)
        if len(np.unique(index)) != len(index):
            raise UserError(f"{path}: split '{split}' lists an image index twice; rerun the stage that wrote it")
        out[split] = SplitScores(
            probs=np.array([p for *_, p in items], dtype=np.float64),
            labels=np.array([y for _, _, y, _ in items], dtype=np.int64),
            index=index,
            paths=[image for _, image, _, _ in items],
        )
    return out
