"""Reading what a run left on disk: its config, each model's meta and predictions, the export checks.

The report is rebuilt from these files alone (no model is loaded), so that
``python -m profiling.report RUN`` can re-render a run at any time. Every problem with the files
is a :class:`UserError` naming the file and what would fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


from core.errors import UserError
from core.files import read_yaml_mapping
from core.rundir import MODELS, RunDir, SplitScores, read_json, read_predictions
from core.schema import build
from profiling.cost.config import ProfileConfig
from profiling.report.config import ConstraintsConfig, EvalConfig

__all__ = ["ModelRun", "RunFiles", "read_run"]


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
    learned_from: dict[str, int] | None = None  # labeled and unlabeled training images (meta.json)
    #: Its outputs on each runtime checked against PyTorch's on test images (export/verify.json):
    #: ``{"onnx": {...}, "openvino": {...}}``, ``{"onnx_int8": {...}}`` for an int8 model.
    runtime_checks: dict[str, dict[str, Any]] | None = None
    #: With data.tiles: ``splits`` are the labelled tiles, these each image (its worst tile's score),
    #: with the image-level threshold and the image test metrics saved at training time.
    image_splits: dict[str, SplitScores] | None = None
    image_threshold: float | None = None
    image_stored_test: dict[str, Any] | None = None
    tiles: dict[str, Any] | None = None  # the tiling (meta.json ``tiles``): grid/size, overlap, tiles per image


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
    profile: dict[str, Any] | None  # profile.json, written by profiling.report.measure


def _section(config: dict[str, Any], name: str, cls: type, path: Path) -> Any:
    try:
        return build(cls, config.get(name) or {})
    except UserError as exc:
        raise UserError(f"{path}, section '{name}': {exc}") from None


def _read_config(run: RunDir) -> dict[str, Any]:
    path = run.config
    if not path.is_file():
        raise UserError(f"'{run.root}' has no {path.name}: is it a run directory (runs/<name>/) made by distill.run?")
    return read_yaml_mapping(path, "sections (run:, data:, ...)")


def _model_run(run: RunDir, name: str, eval_cfg: EvalConfig) -> ModelRun:
    meta = read_json(run.meta(name))
    image = meta.get("image") if meta.get("tiles") else None
    return ModelRun(
        name=name,
        arch=meta.get("arch", "?"),
        img_size=int(meta.get("img_size", 0)),
        threshold=meta.get("threshold"),
        rule=meta.get("threshold_rule") or eval_cfg.threshold,
        splits=read_predictions(run.predictions(name)),
        stored_test=(meta.get("metrics") or {}).get("test"),
        learned_from=meta.get("learned_from"),
        image_splits=read_predictions(run.image_predictions(name)) if image else None,
        image_threshold=image.get("threshold") if image else None,
        image_stored_test=((image or {}).get("metrics") or {}).get("test"),
        tiles=meta.get("tiles"),
    )


def _int8_run(run: RunDir, verify: dict[str, Any], models: dict[str, ModelRun]) -> ModelRun | None:
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
        splits=read_predictions(run.int8_predictions(int8["from"])),
        stored_test=int8.get("test"),
        quantised_from=int8["from"],
        learned_from=source.learned_from,
        runtime_checks={"onnx_int8": int8["vs_fp32_torch"]} if int8.get("vs_fp32_torch") else None,
        image_splits=read_predictions(run.int8_image_predictions(int8["from"])) if source.tiles else None,
        image_threshold=(int8.get("image") or {}).get("threshold"),
        image_stored_test=(int8.get("image") or {}).get("test"),
        tiles=source.tiles,
    )


def _runtime_checks(verify: dict[str, Any], name: str) -> dict[str, dict[str, Any]] | None:
    """What export/verify.json says about ``name`` on ONNX Runtime (and OpenVINO, where it ran)."""
    entry = (verify.get("models") or {}).get(name)
    if not entry:
        return None
    checks = {"onnx": {k: v for k, v in entry.items() if k not in ("onnx", "openvino")}}
    if entry.get("openvino"):
        checks["openvino"] = entry["openvino"]
    return checks


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory; at least one finished model with predictions must be there."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise UserError(f"run directory '{run.root}' does not exist; give runs/<name> of a run made by distill.run")
    config = _read_config(run)
    eval_cfg = _section(config, "eval", EvalConfig, run.config)
    models = {n: _model_run(run, n, eval_cfg) for n in MODELS if run.meta(n).is_file()}
    if not models:
        raise UserError(f"'{run.root}' holds no finished model (no <model>/meta.json for any of "
                        f"{', '.join(MODELS)}); run the pipeline first")
    if run.verify.is_file():
        verify = read_json(run.verify)
        models = {n: replace(m, runtime_checks=_runtime_checks(verify, n)) for n, m in models.items()}
        int8 = _int8_run(run, verify, models)
        if int8 is not None:
            models[int8.name] = int8
    return RunFiles(
        run_dir=run.root,
        config=config,
        eval=eval_cfg,
        profile_cfg=_section(config, "profile", ProfileConfig, run.config),
        constraints=_section(config, "constraints", ConstraintsConfig, run.config),
        models=models,
        data_report=read_json(run.data_report) if run.data_report.is_file() else None,
        profile=read_json(run.profile) if run.profile.is_file() else None,
    )
