"""The report, on run directories written by hand with known numbers (no training, no models).

The expected figures are recomputed here independently (numpy, from the definitions), not with
the torchmetrics calls the report uses.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_image
from torch import nn

from data.config import SyntheticConfig
from core.errors import UserError
from data.images import open_rgb, square
from data.loader import synthetic_pixels
from data.manifest import Sample
from profiling.cost.config import RUNTIME_NAMES, ProfileConfig
from profiling.report.config import ConstraintsConfig
from profiling.report.constraints import choose_deployed
from profiling.cost.latency import RUNTIMES
from profiling.cost.profile_model import ModelEntry
from profiling.report.measure import measure
from profiling.report.build import build_report
from profiling.report.__main__ import main
from profiling.report.figures import load_images
from profiling.report.runfiles import read_run

# Validation: F1 is highest (1.0) at threshold 0.6, where both defects and no normal are called defect.
VAL = ([0.1, 0.2, 0.3, 0.6, 0.7], [0, 0, 0, 1, 1])
VAL_THRESHOLD = 0.6
ARCH = {"teacher": "vit_tiny_patch16_224", "student": "mobilenetv3_small_100", "student_pruned": "mobilenetv3_small_100"}


def _test_scores(seed: int, n: int = 40, n_defect: int = 12) -> tuple[list[float], list[int]]:
    """Scores with 3 decimals (exact in predictions.csv), defects scored higher on average, some ties."""
    rng = np.random.default_rng(seed)
    labels = np.array([1] * n_defect + [0] * (n - n_defect))
    probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1).round(2)
    return probs.tolist(), labels.tolist()


def _write_predictions(path: Path, splits: dict[str, tuple[list[float], list[int]]], image_dir: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "index", "path", "label", "prob_defect", "logit_normal", "logit_defect"])
        for split, (probs, labels) in splits.items():
            for i, (p, y) in enumerate(zip(probs, labels)):
                w.writerow([split, i, str(image_dir / f"{split}_{i}.png"), y, p, 0.0, 0.0])


def _profile(models: dict[str, float], int8_ms: float) -> dict:
    """A profile.json as profiling.report.measure writes it: ``models`` maps a name to its onnx_b1 median."""
    def stat(runtime: str, ms: float | None, skipped: str | None = None) -> dict:
        return {"runtime": runtime, "batch": 1, "threads": 2, "device": "cpu (test)", "median_ms": ms,
                "p90_ms": ms and ms * 1.1, "mean_ms": ms, "std_ms": 0.0, "min_ms": ms, "max_ms": ms, "runs": 30,
                "images_per_s": ms and 1e3 / ms, "other_cpu_load": 0.0, "skipped": skipped}

    out = {"machine": {"cpu": "test cpu", "torch": "x", "onnxruntime": "y"},
           "settings": {"runtimes": ["onnx", "onnx_int8"], "batch_sizes": [1], "threads": 2, "warmup": 10, "runs": 30},
           "limit": {"matmul_peak_gflops": 100.0, "threads": 2, "what": "test"}, "macs_note": "test", "models": {}}
    for name, ms in models.items():
        int8 = stat("onnx_int8", int8_ms) if name == "student_pruned" else stat("onnx_int8", None, "no int8 file")
        out["models"][name] = {
            "params": {"teacher": 5_000_000, "student": 1_500_000, "student_pruned": 900_000}[name],
            "macs": {"teacher": 1_000_000_000, "student": 50_000_000, "student_pruned": 30_000_000}[name],
            "latency": {"onnx_b1": stat("onnx", ms), "onnx_int8_b1": int8},
            "size_mb": {"onnx": 2.0, "safetensors": 2.1, **({"onnx_int8": 0.6} if name == "student_pruned" else {})},
            "ideal_ms": {"b1": 0.5},
        }
    return out


def make_run(root: Path, *, constraints: dict | None = None, val: tuple = VAL, profile: bool = True,
             duplicates: int = 0) -> Path:
    """A run directory with teacher, student, student_pruned and its int8 copy, written by hand."""
    run, images = root / "runs" / "r", root / "images"
    for i in range(6):
        write_image(images / f"test_{i}.png", seed=i, size=24)
    config = {"run": {"name": "r", "seed": 0}, "data": {"source": "folder", "path": str(root / "ds")},
              "eval": {"threshold": "f1", "bootstrap": 200, "ci": 0.95}, "constraints": constraints or {}}
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for k, name in enumerate(ARCH):
        meta = {"arch": ARCH[name], "img_size": 32, "threshold": VAL_THRESHOLD, "threshold_rule": "f1",
                "metrics": {"test": {}}}
        (run / name).mkdir()
        (run / name / "meta.json").write_text(json.dumps(meta))
        _write_predictions(run / name / "predictions.csv", {"train": _test_scores(10 + k), "val": val,
                                                            "test": _test_scores(k)}, images)
    int8 = {"model": "student_pruned_int8", "onnx": "student_pruned_int8.onnx", "from": "student_pruned",
            "threshold": VAL_THRESHOLD, "test": {}}
    (run / "export").mkdir()
    (run / "export" / "verify.json").write_text(json.dumps({"models": {}, "int8": int8}))
    _write_predictions(run / "export" / "student_pruned_int8_predictions.csv",
                       {"train": _test_scores(20), "val": val, "test": _test_scores(7)}, images)
    (run / "data").mkdir()
    dup = {"method": "pHash", "max_distance": 4, "pairs": duplicates,
           "pairs_by_split": {"train-val": 0, "train-test": duplicates, "val-test": 0},
           "test_images_with_duplicate_elsewhere": duplicates}
    counts = {"train": {"normal": 28, "defect": 12}, "val": {"normal": 3, "defect": 2}, "test": {"normal": 28, "defect": 12}}
    (run / "data" / "report.json").write_text(json.dumps({
        "source": "folder", "root": str(root / "ds"), "split_method": "by hand", "counts": counts, "total": 85,
        "skipped": 1, "skipped_by_reason": {"unreadable": 1}, "duplicates": dup}))
    if profile:
        (run / "profile.json").write_text(json.dumps(
            _profile({"teacher": 20.0, "student": 4.0, "student_pruned": 2.0}, int8_ms=1.5)))
    return run


@pytest.fixture(scope="module")
def default_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The report of the default hand-made run, without plots (read-only: tests must not change it)."""
    return build_report(make_run(tmp_path_factory.mktemp("default")), plots=False)


# --- independent recomputation --------------------------------------------------------------------


def _auroc(p: np.ndarray, y: np.ndarray) -> float:
    """P(defect scores above normal) + half P(tie), over every defect–normal pair."""
    pos, neg = p[y == 1][:, None], p[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def _counts(p: np.ndarray, y: np.ndarray, t: float) -> tuple[int, int, int, int]:
    called = p >= t
    return int((~called & (y == 0)).sum()), int((called & (y == 0)).sum()), int((~called & (y == 1)).sum()), \
        int((called & (y == 1)).sum())


@pytest.mark.parametrize("name, seed", [("teacher", 0), ("student", 1), ("student_pruned", 2),
                                        ("student_pruned_int8", 7)])
def test_figures_match_an_independent_recomputation(default_report: dict, name: str, seed: int) -> None:
    report = default_report
    p, y = (np.array(v) for v in _test_scores(seed))
    tn, fp, fn, tp = _counts(p, y, VAL_THRESHOLD)
    test = report["models"][name]["test"]
    assert test["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert test["recall"] == pytest.approx(tp / (tp + fn), abs=1e-6)
    assert test["precision"] == pytest.approx(tp / (tp + fp), abs=1e-6)
    assert test["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)
    assert test["auroc"] == pytest.approx(_auroc(p, y), abs=1e-6)
    assert test["threshold"] == VAL_THRESHOLD
    low, high = test["auroc_ci"]
    assert low <= test["auroc"] <= high and 0 <= low < high <= 1
    # train and validation are scored at the same (validation-chosen) threshold
    assert report["models"][name]["splits"]["val"]["f1"] == pytest.approx(1.0)


def test_report_schema_and_cost_per_model(default_report: dict) -> None:
    report = default_report
    assert list(report["models"]) == ["teacher", "student", "student_pruned", "student_pruned_int8"]
    for row in report["models"].values():
        assert {"arch", "params", "macs", "latency_ms", "size_mb", "test"} <= row.keys()
        assert {"accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc", "auprc", "mcc",
                "threshold"} <= row["test"].keys()
    pruned, int8 = report["models"]["student_pruned"], report["models"]["student_pruned_int8"]
    assert pruned["latency_ms"] == {"onnx_b1": pytest.approx({"median": 2.0, "p90": 2.2, "std": 0.0, "runs": 30,
                                                              "images_per_s": 500.0, "threads": 2,
                                                              "device": "cpu (test)", "other_cpu_load": 0.0})}
    assert list(int8["latency_ms"]) == ["onnx_int8_b1"] and int8["latency_ms"]["onnx_int8_b1"]["median"] == 1.5
    assert (int8["size_mb"], pruned["size_mb"], int8["params"]) == (0.6, 2.0, 900_000)
    assert report["models"]["teacher"]["latency_skipped"] == {}  # the teacher's missing int8 is not its figure
    assert 0 <= report["models"]["student"]["vs_teacher"]["agreement"] <= 1
    assert report["models"]["student"]["vs_teacher"]["kl_nats"] >= 0
    delta = report["models"]["student"]["vs_teacher"]["auroc_delta"]
    gap = report["models"]["student"]["test"]["auroc"] - report["models"]["teacher"]["test"]["auroc"]
    assert delta["delta"] == pytest.approx(gap) and delta["low"] <= delta["delta"] <= delta["high"]
    assert report["data"]["counts"]["test"] == {"normal": 28, "defect": 12} and report["machine"]["cpu"] == "test cpu"


# --- constraints and the exit code ----------------------------------------------------------------


def test_check_exits_0_when_every_constraint_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path, constraints={"max_latency_ms": 3.0, "max_params": 1e6, "min_auroc": 0.5})
    assert main([str(run), "--check", "--no-plots"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["constraints"]["passed"] and report["deployed"]["model"] == "student_pruned_int8"
    assert [c["name"] for c in report["constraints"]["checks"]] == ["max_latency_ms", "max_params", "min_auroc"]
    assert report["verdict"].startswith("**PASS**") and "**PASS**" in capsys.readouterr().out


def test_check_exits_1_when_a_constraint_fails(tmp_path: Path) -> None:
    run = make_run(tmp_path, constraints={"max_latency_ms": 1.0, "min_auroc": 0.5})
    assert main([str(run), "--check", "--no-plots"]) == 1
    assert main([str(run), "--no-plots"]) == 0  # without --check the report is written and the run is not failed
    report = json.loads((run / "report.json").read_text())
    (latency,) = [c for c in report["constraints"]["checks"] if c["name"] == "max_latency_ms"]
    assert latency["passed"] is False and latency["value"] == 1.5  # int8 is the fastest, and still too slow
    assert report["verdict"].startswith("**FAIL**") and "max_latency_ms" in report["verdict"]
    assert (run / "report.md").read_text().splitlines()[2] == report["verdict"]


def test_a_constraint_that_cannot_be_verified_does_not_pass(tmp_path: Path) -> None:
    run = make_run(tmp_path, constraints={"max_latency_ms": 100.0}, profile=False)
    assert main([str(run), "--check", "--no-plots"]) == 1
    (check,) = json.loads((run / "report.json").read_text())["constraints"]["checks"]
    assert check["passed"] is None and "not measured" in check["why"]


def test_the_deployed_model_is_the_fastest_that_passes(default_report: dict) -> None:
    rows = copy.deepcopy(default_report["models"])
    everything = ConstraintsConfig(max_latency_ms=10.0)
    assert choose_deployed(rows, everything)["model"] == "student_pruned_int8"
    # The choice reads validation, as the threshold does: int8 losing recall on test alone changes nothing ...
    for name in ("student_pruned", "student_pruned_int8"):
        rows[name]["splits"]["val"]["recall"] = rows[name]["test"]["recall"] = 0.99
    rows["student_pruned_int8"]["test"]["recall"] = 0.5
    chosen = choose_deployed(rows, ConstraintsConfig(max_latency_ms=10.0, min_recall=0.95))
    assert chosen["model"] == "student_pruned_int8" and not chosen["passed"]  # ... and test then shows the miss
    # ... while int8 losing recall on validation deploys the fp32 model.
    rows["student_pruned_int8"]["splits"]["val"]["recall"] = 0.5
    chosen = choose_deployed(rows, ConstraintsConfig(max_latency_ms=10.0, min_recall=0.95))
    assert (chosen["model"], chosen["runtime"], chosen["precision"]) == ("student_pruned", "onnx", "fp32")
    assert chosen["passed"] and "only (model, runtime) pair" in chosen["why"]


def _figure(ms: float, under_load: str | None = None) -> dict:
    return {"median": ms, "p90": ms, "std": 0.0, "runs": 30, "images_per_s": 1e3 / ms, "threads": 2,
            "device": "cpu (test)", "other_cpu_load": 0.0, **({"under_load": under_load} if under_load else {})}


def test_the_deployed_pair_is_the_fastest_runtime_and_precision_that_passes(default_report: dict) -> None:
    rows = copy.deepcopy(default_report["models"])
    rows["student_pruned"]["latency_ms"]["openvino_b1"] = _figure(1.2)  # faster than onnx (2.0) and int8 (1.5)
    rows["student_pruned"]["latency_ms"]["eager_b1"] = _figure(0.5)  # not a deploy runtime: predict runs the files
    chosen = choose_deployed(rows, ConstraintsConfig(max_latency_ms=10.0))
    assert (chosen["model"], chosen["runtime"], chosen["precision"]) == ("student_pruned", "openvino", "fp32")
    assert [(c["model"], c["runtime"]) for c in chosen["candidates"]] == [
        ("student_pruned", "onnx"), ("student_pruned", "openvino"), ("student_pruned_int8", "onnx_int8")]
    (latency,) = chosen["checks"]
    assert latency["value"] == 1.2 and "openvino_b1" in latency["what"]  # the bound read on the pair's runtime
    # the constraint's own runtime does not restrict the pairs: it is where a latency target is searched
    assert choose_deployed(rows, ConstraintsConfig(max_latency_ms=10.0, runtime="eager"))["runtime"] == "openvino"
    # a bound only int8 on ONNX Runtime meets deploys that pair
    rows["student_pruned"]["latency_ms"]["openvino_b1"] = _figure(1.8)
    assert choose_deployed(rows, ConstraintsConfig(max_latency_ms=1.6))["runtime"] == "onnx_int8"


def test_the_report_names_the_fastest_runtime_and_marks_figures_measured_under_load(tmp_path: Path) -> None:
    run = make_run(tmp_path, constraints={"max_latency_ms": 10.0})
    profile = json.loads((run / "profile.json").read_text())
    student = profile["models"]["student_pruned"]["latency"]
    student["openvino_b1"] = {**student["onnx_b1"], "runtime": "openvino", "median_ms": 1.2,
                              "other_cpu_load": 1.4, "under_load": "measured under load (1.40 cores busy)"}
    (run / "profile.json").write_text(json.dumps(profile))
    report = build_report(run, plots=False)
    pruned = report["models"]["student_pruned"]
    assert pruned["fastest"]["b1"] == {"runtime": "openvino", "median": 1.2,
                                       "under_load": "measured under load (1.40 cores busy)"}
    assert pruned["latency_ms"]["openvino_b1"]["under_load"] == "measured under load (1.40 cores busy)"
    assert "under_load" not in pruned["latency_ms"]["onnx_b1"]
    assert report["models"]["student_pruned_int8"]["fastest"]["b1"]["runtime"] == "onnx_int8"
    assert report["deployed"]["runtime"] == "openvino" and report["constraints"]["runtime"] == "openvino"
    md = (run / "report.md").read_text()
    assert "| onnx_b1 (ms) | onnx_int8_b1 (ms) | openvino_b1 (ms) | fastest b1 |" in md
    assert "1.2 †" in md and "student_pruned openvino_b1: measured under load (1.40 cores busy)" in md
    assert "student_pruned on openvino (deployed)" in report["verdict"]


def test_a_run_without_a_student_has_no_verdict_and_fails_the_check(tmp_path: Path) -> None:
    run = make_run(tmp_path, constraints={"min_auroc": 0.1})
    for name in ("student", "student_pruned", "export"):
        shutil.rmtree(run / name)
    assert main([str(run), "--check", "--no-plots"]) == 1
    report = json.loads((run / "report.json").read_text())
    assert report["deployed"] is None and report["verdict"].startswith("**NO VERDICT**")
    assert list(report["models"]) == ["teacher"]


# --- thresholds -------------------------------------------------------------------------------------


def test_a_validation_split_without_defects_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path, val=([0.1, 0.2, 0.3], [0, 0, 0]))
    with pytest.raises(UserError, match="teacher: the validation split has no defect images"):
        build_report(run)
    assert main([str(run), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: teacher: the validation split has no defect images") and "Traceback" not in err


def test_saved_probabilities_keep_float32_precision(tmp_path: Path) -> None:
    """A stage stores float32 scores and a float32 threshold; predictions.csv must give them back
    exactly, or a validation image scored at the threshold could change sides in the report."""
    from core.rundir import read_predictions, write_predictions

    run = make_run(tmp_path)
    scores = np.float32([0.1, 0.2, 0.3, 0.6, 0.7, 0.99999994, 1e-7 + 0.6])  # neighbours of 0.6 and 1.0
    labels = [0, 0, 0, 1, 1, 1, 1]
    rows = [(sp, i, f"{sp}_{i}.png", y, float(p), 0.0, float(p)) for sp in ("train", "val", "test")
            for i, (p, y) in enumerate(zip(scores, labels))]
    write_predictions(run / "student" / "predictions.csv", rows)
    back = read_predictions(run / "student" / "predictions.csv")["val"].probs
    assert np.array_equal(back.astype(np.float32), scores) and np.array_equal(back, scores.astype(np.float64))
    meta = json.loads((run / "student" / "meta.json").read_text())
    meta["threshold"] = float(np.float32(0.6))  # as a stage stores it: 0.6000000238418579
    (run / "student" / "meta.json").write_text(json.dumps(meta))
    row = build_report(run, plots=False)["models"]["student"]
    assert row["splits"]["val"]["recall"] == 1.0  # the validation defect scored exactly at it stays a defect
    assert row["threshold_check"]["agrees"]


def test_a_stored_threshold_that_validation_does_not_give_is_reported(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    meta = json.loads((run / "student" / "meta.json").read_text())
    meta["threshold"] = 0.25
    (run / "student" / "meta.json").write_text(json.dumps(meta))
    report = build_report(run, plots=False)
    assert not report["models"]["student"]["threshold_check"]["agrees"]
    assert any(n.startswith("student: the stored threshold 0.25") for n in report["notes"])


# --- leakage, plots, re-rendering -------------------------------------------------------------------


def test_a_near_perfect_score_comes_with_the_duplicate_check(tmp_path: Path) -> None:
    run = make_run(tmp_path, duplicates=3)
    perfect = ([0.01] * 28 + [0.99] * 12, [0] * 28 + [1] * 12)
    _write_predictions(run / "teacher" / "predictions.csv", {"val": VAL, "test": perfect}, tmp_path / "images")
    leak = build_report(run, plots=False)["leakage"]
    assert leak["near_perfect"] == ["teacher"] and leak["leakage_possible"]
    assert "3 image pair(s) across splits" in leak["statement"] and "leakage could explain" in leak["statement"]


def test_plots_are_written_and_the_report_rerenders_without_models(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    first = build_report(run)
    names = {Path(p).name for p in first["plots"]}
    assert names == {"roc.png", "pr.png", "confusion.png", "scores.png", "pareto.png", "errors.png"}
    for p in first["plots"]:
        assert (run / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    assert md.startswith("# Report: r\n\n**NO CONSTRAINTS SET**") and "![errors](plots/errors.png)" in md
    for section in ("## Models", "## Constraints", "## Thresholds", "## Train / validation / test", "## Data",
                    "## Plots"):
        assert section in md
    assert main([str(run), "--no-plots"]) == 0  # again, from the saved files alone
    assert json.loads((run / "report.json").read_text())["models"] == first["models"]
    (run / "profile.json").unlink()  # without latencies there is no Pareto plot, and the stale one goes
    assert "plots/pareto.png" not in build_report(run)["plots"] and not (run / "plots" / "pareto.png").exists()


def test_error_grid_images_come_from_the_data_layer(tmp_path: Path) -> None:
    files = read_run(make_run(tmp_path))
    shown = load_images(files, [(str(tmp_path / "images" / "test_0.png"), 0), (str(tmp_path / "gone.png"), 1)], 32)
    expected = square(open_rgb(tmp_path / "images" / "test_0.png"), 32).astype(np.float32) / 255
    np.testing.assert_allclose(shown[0], expected, atol=1e-6)
    assert shown[1] is None  # deleted since the run: drawn as "image unavailable", not an error
    synthetic = replace(files, config={"run": {"seed": 3}, "data": {"source": "synthetic"}})
    (bead,) = load_images(synthetic, [("synthetic:test/000005", 1)], 48)
    sample = Sample("synthetic:test/000005", 1, "", "test")
    np.testing.assert_allclose(bead, synthetic_pixels(sample, SyntheticConfig(), 3, 0, 48) / 255, atol=1e-6)


def test_user_errors_exit_2_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("eval: {threshold: f1}\n")
    assert main([str(tmp_path / "empty")]) == 2
    assert "holds no finished model" in capsys.readouterr().err
    with pytest.raises(UserError):
        main([str(tmp_path / "missing"), "--debug"])


# --- measuring --------------------------------------------------------------------------------------


def test_runtime_names_in_the_config_are_the_runtimes_that_exist() -> None:
    assert set(RUNTIME_NAMES) == set(RUNTIMES)


def test_measure_writes_profile_json_with_batchnorm_folded(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    cfg = ProfileConfig(runtimes=["eager"], warmup=1, runs=30, allow_busy=True, peak_memory=False)
    out = measure(tmp_path, {"student": ModelEntry(net, 16)}, cfg, ConstraintsConfig(runtime="eager", batch=2),
                  log=lambda _: None)
    row = out["models"]["student"]
    conv, linear = 16 * 16 * 8 * 3 * 3 * 3, 8 * 2  # one MAC per output element per input it sums
    pool = row["macs_by_operator"].get("adaptive_avg_pool2d", 0)
    assert row["macs"] == conv + linear + pool and row["macs_batchnorm"] > 0
    assert row["macs_fvcore"] == row["macs"] + row["macs_batchnorm"] and row["params"] == 3 * 8 * 9 + 16 + 18
    assert list(row["latency"]) == ["eager_b1", "eager_b2"]  # the constraint's batch is always measured
    assert all(s["median_ms"] > 0 and s["threads"] == out["settings"]["threads"] for s in row["latency"].values())
    assert row["ideal_ms"]["b2"] == pytest.approx(2 * row["ideal_ms"]["b1"])
    assert json.loads((tmp_path / "profile.json").read_text())["models"]["student"]["macs"] == row["macs"]
    assert out["limit"]["matmul_peak_gflops"] > 0 and out["machine"]["cpu"]
    assert not net.training  # the caller's model is left as it was
