"""Reading what a run left on disk: its config, each model's meta and predictions, the export checks.

The report is rebuilt from these files alone (no model is loaded), so that
``python -m profiling.report RUN`` can re-render a run at any time. Every problem with the files
is a :class:`UserError` naming the file and what would fix it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data.errors import UserError
from data.schema import build
from profiling.config import ConstraintsConfig, EvalConfig, ProfileConfig

__all__ = [
    "MODEL_DIRS",
    "PREDICTION_COLUMNS",
    "ModelRun",
    "RunFiles",
    "SplitScores",
    "json_ready",
    "read_json",
    "read_predictions",
    "read_run",
]

#: Model directories a run may hold, in the order the report lists them.
MODEL_DIRS: tuple[str, ...] = ("teacher", "student_baseline", "student", "student_pruned")
PREDICTION_COLUMNS: tuple[str, ...] = ("split", "index", "path", "label", "prob_defect", "logit_normal", "logit_defect")


@dataclass(frozen=True)
class SplitScores:
    """One model's predictions on one split, ordered by the image's index within the split."""

    probs: np.ndarray  # float64 probability of defect
    labels: np.ndarray  # int64, 1 = defect
    index: np.ndarray  # int64 position within the split
    paths: list[str]  # file path, or synthetic:<split>/<index>


@dataclass(frozen=True)
class ModelRun:
    """One model of the run as the report sees it: what it is and what it predicted."""

    name: str
    arch: str
    img_size: int
    threshold: float | None  # stored with the model (meta.json, or verify.json for int8)
    rule: str  # the rule that chose it on validation
    splits: dict[str, SplitScores]
    stored_test: dict[str, Any] | None  # the test metrics saved at training time, to cross-check
    quantised_from: str | None = None  # int8: the fp32 model it was made from


@dataclass(frozen=True)
class RunFiles:
    """Everything the report reads from a run directory."""

    run_dir: Path
    config: dict[str, Any]
    eval: EvalConfig
    profile_cfg: ProfileConfig
    constraints: ConstraintsConfig
    models: dict[str, ModelRun]
    data_report: dict[str, Any] | None
    profile: dict[str, Any] | None  # profile.json, written by profiling.measure


def json_ready(value: Any) -> Any:
    """NaN and infinity become null (JSON has no spelling for them); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); rerun the stage that wrote it") from None


def _section(config: dict[str, Any], name: str, cls: type, path: Path) -> Any:
    try:
        return build(cls, config.get(name) or {})
    except UserError as exc:
        raise UserError(f"{path}, section '{name}': {exc}") from None


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no config.yaml: is it a run directory (runs/<name>/) made by distill.run?")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must be a mapping of sections, got {type(config).__name__}")
    return config


def _parse_row(row: dict[str, str], path: Path, line: int) -> tuple[str, int, str, int, float]:
    try:
        label, prob = int(row["label"]), float(row["prob_defect"])
        index = int(row["index"])
    except (TypeError, ValueError):
        raise UserError(f"{path} line {line}: label, index and prob_defect must be numbers, got {row}") from None
    if label not in (0, 1) or not 0.0 <= prob <= 1.0:
        raise UserError(f"{path} line {line}: label must be 0 or 1 and prob_defect in [0, 1], "
                        f"got label {row['label']}, prob_defect {row['prob_defect']}")
    return row["split"], index, row["path"], label, prob


def read_predictions(path: Path) -> dict[str, SplitScores]:
    """``predictions.csv`` (columns :data:`PREDICTION_COLUMNS`) as scores per split, sorted by index."""
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


def _model_run(run_dir: Path, name: str, eval_cfg: EvalConfig) -> ModelRun:
    stage_dir = run_dir / name
    meta = read_json(stage_dir / "meta.json")
    return ModelRun(
        name=name,
        arch=meta.get("arch", "?"),
        img_size=int(meta.get("img_size", 0)),
        threshold=meta.get("threshold"),
        rule=meta.get("threshold_rule") or eval_cfg.threshold,
        splits=read_predictions(stage_dir / "predictions.csv"),
        stored_test=(meta.get("metrics") or {}).get("test"),
    )


def _int8_run(run_dir: Path, verify: dict[str, Any], models: dict[str, ModelRun]) -> ModelRun | None:
    """The int8 model of ``export/verify.json``, scored by its own predictions file."""
    int8 = verify.get("int8")
    if not int8 or int8.get("from") not in models:
        return None
    source = models[int8["from"]]
    return ModelRun(
        name=int8["model"],
        arch=source.arch,
        img_size=source.img_size,
        threshold=int8.get("threshold"),
        rule=source.rule,
        splits=read_predictions(run_dir / "export" / f"{int8['from']}_int8_predictions.csv"),
        stored_test=int8.get("test"),
        quantised_from=int8["from"],
    )


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory; at least one finished model with predictions must be there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' does not exist; give runs/<name> of a run made by distill.run")
    config = _read_config(run_dir)
    path = run_dir / "config.yaml"
    eval_cfg = _section(config, "eval", EvalConfig, path)
    models = {n: _model_run(run_dir, n, eval_cfg) for n in MODEL_DIRS if (run_dir / n / "meta.json").is_file()}
    if not models:
        raise UserError(f"'{run_dir}' holds no finished model (no <model>/meta.json for any of "
                        f"{', '.join(MODEL_DIRS)}); run the pipeline first")
    verify_path = run_dir / "export" / "verify.json"
    if verify_path.is_file():
        int8 = _int8_run(run_dir, read_json(verify_path), models)
        if int8 is not None:
            models[int8.name] = int8
    data_path, profile_path = run_dir / "data" / "report.json", run_dir / "profile.json"
    return RunFiles(
        run_dir=run_dir,
        config=config,
        eval=eval_cfg,
        profile_cfg=_section(config, "profile", ProfileConfig, path),
        constraints=_section(config, "constraints", ConstraintsConfig, path),
        models=models,
        data_report=read_json(data_path) if data_path.is_file() else None,
        profile=read_json(profile_path) if profile_path.is_file() else None,
    )
