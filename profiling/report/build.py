"""The run's report: every model side by side, and whether "light, fast and accurate" holds.

Renders ``RUN/report.md``, ``RUN/report.json`` and ``RUN/plots/*.png`` from the files the run
saved (predictions, meta.json, export/verify.json, data/report.json and ``profile.json``): no
model is retrained or even loaded, unless ``--measure`` asks to re-measure the costs first.
``--check`` exits 1 when the deployed model fails a constraint (or one cannot be verified), 0 when
all pass; a user mistake (no such run, a damaged file) exits 2 with one message.

Every quality figure is recomputed here from ``predictions.csv``: the threshold stored with the
model (chosen on validation when it was trained) is applied to the saved probabilities, and the
validation choice is redone from the saved validation scores as a check. The probabilities are
saved at full float32 precision, so the decisions recomputed here are the ones made at training
time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError
from core.files import atomic_write_text, json_ready
from core.rundir import RunDir, SplitScores
from profiling.report.constraints import choose_deployed, fastest_runtimes
from profiling.report.figures import write_plots
from profiling.report.quality import agreement, binary_metrics, bootstrap_ci, mean_kl, paired_auroc_delta
from profiling.report.render import render_markdown, verdict
from profiling.report.runfiles import ModelRun, RunFiles, read_run
from profiling.report.thresholds import choose_threshold

__all__ = ["NEAR_PERFECT", "build_report"]

#: A test score at or above this is "near-perfect": the report then states whether leakage could explain it.
NEAR_PERFECT = 0.99
_CI_METRICS = ("auroc", "f1", "recall")


def _split(m: ModelRun, split: str, level: str = "tile") -> SplitScores:
    splits = m.image_splits if level == "image" else m.splits
    if split not in (splits or {}):
        raise UserError(f"{m.name}: its {'image_' if level == 'image' else ''}predictions have no '{split}' split; "
                        "rerun its stage (--force)")
    return splits[split]  # type: ignore[index]


def _threshold(m: ModelRun, level: str = "tile") -> tuple[float, dict[str, Any]]:
    """The threshold applied to ``m``'s predictions (of ``level``: tiles or whole images, ``tile``
    meaning the model's own unit), and the check of it against validation."""
    val = _split(m, "val", level)
    try:
        choice = choose_threshold(val.probs, val.labels, m.rule)
    except UserError as exc:
        raise UserError(f"{m.name}: {exc}") from None
    stored = m.image_threshold if level == "image" else m.threshold
    applied = stored if stored is not None else choice.threshold
    check = {
        "rule": m.rule,
        "stored": stored,
        "rechosen_on_val": choice.threshold,
        "agrees": stored is not None and choice.threshold == applied,
        "val_recall": choice.recall,
        "val_specificity": choice.specificity,
        "val_defects": choice.n_defect,
        "val_normals": choice.n_normal,
    }
    return applied, check


def _quality(m: ModelRun, bootstrap: int, ci: float, notes: list[str], level: str = "tile") -> dict[str, Any]:
    """Metrics on every split at the model's threshold, and bootstrap intervals on test; ``level``
    ``image`` scores whole images of a tiled run (each image's score: its worst tile)."""
    threshold, check = _threshold(m, level)
    splits_in = m.image_splits if level == "image" else m.splits
    test = _split(m, "test", level)
    splits = {sp: binary_metrics(s.probs, s.labels, threshold) for sp, s in (splits_in or {}).items()}
    if bootstrap:
        intervals = bootstrap_ci(test.probs, test.labels, threshold, _CI_METRICS, n=bootstrap, ci=ci)
        splits["test"].update({f"{k}_ci": list(v) for k, v in intervals.items()}, ci_level=ci)
    stored = (m.image_stored_test if level == "image" else m.stored_test) or {}
    what = f"{m.name}" + (" (images)" if level == "image" else "")
    if stored.get("confusion_matrix") not in (None, splits["test"]["confusion_matrix"]):
        notes.append(f"{what}: the test confusion matrix saved at training time {stored['confusion_matrix']} differs "
                     f"from the one recomputed from the saved predictions {splits['test']['confusion_matrix']}.")
    if check["stored"] is None:
        notes.append(f"{what}: no threshold was stored with it; the one rule '{m.rule}' picks from the saved "
                     "validation scores is used.")
    elif not check["agrees"]:
        notes.append(f"{what}: the stored threshold {check['stored']} differs from the one rule '{m.rule}' picks "
                     f"again from the saved validation scores ({check['rechosen_on_val']:.6g}); the stored one is used.")
    out = {"threshold": threshold, "threshold_rule": m.rule, "threshold_check": check,
           "test": splits["test"], "splits": splits}
    if level == "image":
        out["val"] = splits.get("val")
    return out


def _cost(m: ModelRun, profile: dict[str, Any] | None) -> dict[str, Any]:
    """The model's figures from profile.json; an int8 model takes its ONNX Runtime int8 ones."""
    source = m.quantised_from or m.name
    p = (profile or {}).get("models", {}).get(source)
    if p is None:
        return {"params": None, "macs": None, "latency_ms": {}, "size_mb": None}
    int8 = m.quantised_from is not None
    latency, skipped = {}, {}
    for key, s in p.get("latency", {}).items():
        if (s["runtime"] == "onnx_int8") != int8:
            continue
        if s.get("median_ms") is None:
            skipped[key] = s.get("skipped")
            continue
        latency[key] = {"median": s["median_ms"], "p90": s["p90_ms"], "std": s["std_ms"], "runs": s["runs"],
                        "images_per_s": s["images_per_s"], "threads": s["threads"], "device": s["device"],
                        "other_cpu_load": s.get("other_cpu_load")}
        if s.get("under_load"):
            latency[key]["under_load"] = s["under_load"]  # "measured under load (N cores busy)"
    sizes = p.get("size_mb") or {}
    files = {k: v for k, v in sizes.items() if (k == "onnx_int8") == int8}
    memory = {k: v for k, v in (p.get("peak_memory_mb") or {}).items()
              if k != "skipped" and k.startswith("onnx_int8") == int8}
    return {
        "params": p.get("params"), "macs": p.get("macs"), "macs_fvcore": p.get("macs_fvcore"),
        "macs_batchnorm": p.get("macs_batchnorm"), "macs_skipped_ops": p.get("macs_skipped_ops"),
        "latency_ms": latency, "latency_skipped": skipped,
        "size_mb": files.get("onnx_int8") if int8 else files.get("onnx", files.get("safetensors")),
        "files_mb": files, "peak_memory_mb": memory, "ideal_ms": p.get("ideal_ms"),
    }


def _vs_teacher(models: dict[str, ModelRun], rows: dict[str, dict[str, Any]], notes: list[str],
                bootstrap: int = 0, ci: float = 0.95) -> None:
    """Teacher–student agreement (same decision, each at its threshold), KL and the AUROC difference
    with its paired bootstrap interval (``bootstrap`` resamples; none at 0) on test, in place."""
    if "teacher" not in models:
        return
    teacher = _split(models["teacher"], "test")
    for name, m in models.items():
        test = _split(m, "test")
        if name == "teacher":
            continue
        if not np.array_equal(test.index, teacher.index):
            notes.append(f"{name}: its test predictions cover other images than the teacher's; no agreement computed.")
            continue
        rows[name]["vs_teacher"] = {
            "agreement": agreement(teacher.probs, test.probs, rows["teacher"]["threshold"], rows[name]["threshold"]),
            "kl_nats": mean_kl(teacher.probs, test.probs),
        }
        if bootstrap:
            delta = paired_auroc_delta(test.probs, teacher.probs, test.labels, n=bootstrap, ci=ci)
            rows[name]["vs_teacher"]["auroc_delta"] = {**delta, "ci_level": ci}


def _leakage(rows: dict[str, dict[str, Any]], data_report: dict[str, Any] | None) -> dict[str, Any]:
    """The duplicate check's result, said together with any near-perfect test score."""
    near = [n for n, r in rows.items()
            if any((r["test"].get(k) or 0) >= NEAR_PERFECT for k in ("auroc", "f1", "accuracy"))]
    dup = (data_report or {}).get("duplicates") or {}
    if data_report is None:
        check = "there is no data/report.json, so the duplicate check's result is unknown"
        could = True
    elif dup.get("pairs") is None:
        check = "the near-duplicate check was off (data.dedup=false), so leakage between splits is not ruled out"
        could = True
    elif dup["pairs"]:
        check = (f"the near-duplicate check found {dup['pairs']} image pair(s) across splits within "
                 f"{dup.get('max_distance')} bits of pHash ({dup.get('test_images_with_duplicate_elsewhere')} test "
                 f"image(s) have one in train or val; see data/duplicates.json)")
        could = True
    else:
        check = (f"the near-duplicate check found no image pairs across splits within {dup.get('max_distance')} bits "
                 "of pHash (it compares pixels; frames of one capture session only stay together with data.group_by)")
        could = False
    if near:
        scores = ", ".join(f"{n} (AUROC {rows[n]['test']['auroc']:.3f}, F1 {rows[n]['test']['f1']:.3f})" for n in near)
        conclusion = ("leakage could explain part of it" if could
                      else "so copies of test images in training do not explain it")
        statement = f"Near-perfect test scores: {scores}; {check}: {conclusion}."
    else:
        statement = f"No near-perfect test score (all below {NEAR_PERFECT}); {check}."
    groups = (data_report or {}).get("groups_across_splits")
    if groups and groups.get("count"):
        statement += f" {groups['count']} capture group(s) of data.group_by straddle the source's own splits."
    return {"statement": statement, "near_perfect": near, "near_perfect_at": NEAR_PERFECT,
            "leakage_possible": could, "duplicates": dup}


def _constraints(rows: dict[str, dict[str, Any]], files: RunFiles) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    c = files.constraints
    deployed = choose_deployed(rows, c)
    checks = deployed["checks"] if deployed else []
    block = {
        "passed": bool(deployed) and all(ch["passed"] is True for ch in checks),
        "model": deployed["model"] if deployed else None,
        # the deployed pair's runtime: its latency is what the bound was checked on
        "runtime": deployed["runtime"] if deployed else c.runtime, "batch": c.batch,
        "constraint_runtime": c.runtime,
        "checks": checks,
        "set": {k: v for k, v in vars(c).items() if v is not None and k not in ("runtime", "batch")},
        "precision": deployed["precision"] if deployed else None,
    }
    if deployed is None:
        block["why"] = "the run has no student (student or student_pruned) to deploy"
    return ({k: v for k, v in deployed.items() if k != "checks"} if deployed else None), block


def _model_rows(files: RunFiles, notes: list[str]) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, m in files.models.items():
        rows[name] = {"arch": m.arch, "img_size": m.img_size, **_cost(m, files.profile),
                      **_quality(m, files.eval.bootstrap, files.eval.ci, notes)}
        if m.image_splits is not None:  # tiled: the image level (each image's score: its worst tile)
            rows[name]["unit"] = "tile"
            rows[name]["tiles_per_image"] = (m.tiles or {}).get("tiles_per_image")
            rows[name]["image"] = _quality(m, files.eval.bootstrap, files.eval.ci, notes, level="image")
        if m.quantised_from:
            rows[name]["quantised_from"] = m.quantised_from
        if m.learned_from:
            rows[name]["learned_from"] = m.learned_from
        if m.runtime_checks:
            rows[name]["runtime_checks"] = m.runtime_checks
        rows[name]["fastest"] = fastest_runtimes(rows[name])
    _vs_teacher(files.models, rows, notes, files.eval.bootstrap, files.eval.ci)
    for row in rows.values():
        if row.get("image") is not None and row.get("tiles_per_image"):
            row["image"]["latency_ms"] = _per_image_latency(row)
    return rows


def _per_image_latency(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A tiled model's median latency per runtime: one tile (batch 1) and one image (all its tiles
    as one batch), from the figures profile.json measured."""
    n = int(row["tiles_per_image"])
    out: dict[str, dict[str, Any]] = {}
    for key, figure in (row.get("latency_ms") or {}).items():
        runtime, batch = key.rsplit("_b", 1)
        if int(batch) in (1, n):
            entry = out.setdefault(runtime, {"tile": None, "image": None, "tiles_per_image": n})
            if int(batch) == 1:
                entry["tile"] = figure["median"]
            if int(batch) == n:
                entry["image"] = figure["median"]
    return out


def build_report(run_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Read a finished run, recompute every figure from its saved files, write report.json/.md and plots.

    Returns the report.json content. ``plots=False`` skips the figures (seconds of matplotlib;
    a CI gate needs only the numbers). Raises :class:`UserError` for a missing run directory,
    damaged files, or a validation split without both classes (no threshold can be checked).
    """
    files = read_run(run_dir)
    notes: list[str] = []
    if files.profile is None:
        notes.append("No profile.json: params, MACs and latency were not measured. Run the report stage of "
                     "distill.run, or `python -m profiling.report RUN --measure`.")
    rows = _model_rows(files, notes)
    deployed, constraints = _constraints(rows, files)
    profile = files.profile or {}
    report: dict[str, Any] = {
        "run": files.run_dir.name,
        "models": rows,
        "deployed": deployed,
        "constraints": constraints,
        "leakage": _leakage(rows, files.data_report),
        "data": files.data_report,
        "machine": profile.get("machine"),
        "profile": {k: profile.get(k) for k in ("settings", "limit", "macs_note")} if profile else None,
        "eval": {"threshold": files.eval.threshold, "bootstrap": files.eval.bootstrap, "ci": files.eval.ci},
        "notes": notes,
    }
    report["verdict"] = verdict(report)
    report = json_ready(report)
    report["plots"] = [str(p.relative_to(files.run_dir)) for p in write_plots(files, report)] if plots else []
    run = RunDir(files.run_dir)
    atomic_write_text(run.report_json, json.dumps(report, indent=2))
    atomic_write_text(run.report_md, render_markdown(report))
    return report
