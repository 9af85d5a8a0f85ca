"""Provenance: one record per stage decides what a rerun reuses, redoes or refuses.

The unit tests check :mod:`core.provenance` on plain files. The run tests drive a tiny pipeline
(a ViT teacher with the convolutional stem, a pruned student) in-process and check what a user
sees: ``profiling.report --measure`` rebuilds every model of the run, changed export settings
re-export and re-profile, a replaced teacher makes the student stale and it is redone, and a
student stage run against a teacher made with another config is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from core import provenance
from core.rundir import RunDir
from distill.run import main
from distill.stages import StaleWarning

TINY = """\
run: {{name: tiny, output_dir: '{out}', seed: 0, device: cpu}}
data:
  source: synthetic
  num_workers: 0
  synthetic: {{image_size: 32, num_train: 32, num_val: 16, num_test: 16}}
teacher:
  arch: vit_tiny_patch16_224
  pretrained: false
  conv_stem: true
  img_size: 32
  model_kwargs: {{patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}}
  drop_path: 0.0
  layer_decay: null
  epochs: 1
  batch_size: 16
student: {{arch: mobilenetv3_small_050, pretrained: false, img_size: 32, epochs: 1, batch_size: 16}}
prune: {{target: {{macs: 0.6}}, steps: 1, epochs: 1, batch_size: 16}}
export: {{int8: false, models: [student_pruned, student, teacher]}}
profile: {{runtimes: [onnx], runs: 30, warmup: 0, allow_busy: true, peak_memory: false}}
constraints: {{runtime: onnx}}
"""


# ----------------------------------------------------------------------------- the record itself
def test_compare_names_what_differs(tmp_path: Path) -> None:
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"a")
    saved = provenance.make("student", {"lr": 1, "data": {"size": 32}}, {"teacher": weights})
    assert provenance.compare(None, saved).state == "new"
    assert provenance.compare(saved, provenance.make("student", {"lr": 1, "data": {"size": 32}},
                                                     {"teacher": weights})).same
    changed = provenance.compare(saved, provenance.make("student", {"lr": 2, "data": {"size": 64}},
                                                        {"teacher": weights}))
    assert (changed.state, changed.changed) == ("config", ["data.size", "lr"])
    weights.write_bytes(b"b")
    stale = provenance.compare(saved, provenance.make("student", {"lr": 1, "data": {"size": 32}},
                                                      {"teacher": weights}))
    assert (stale.state, stale.changed) == ("inputs", ["teacher"])


def test_a_replaced_output_is_noticed(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"trained")
    record = provenance.make("teacher", {"lr": 1})
    provenance.save(tmp_path / "stage.json", provenance.finish(record, tmp_path, ["model.safetensors"]))
    assert provenance.check(tmp_path / "stage.json", record).same
    (tmp_path / "model.safetensors").write_bytes(b"replaced by hand")
    verdict = provenance.check(tmp_path / "stage.json", record)
    assert (verdict.state, verdict.changed) == ("outputs", ["model.safetensors"])


# ----------------------------------------------------------------------------- a run
def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(out=tmp_path / "runs"))
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunDir]:
    base = tmp_path_factory.mktemp("provenance")
    cfg = _config(base)
    assert main([str(cfg)]) == 0
    return cfg, RunDir(base / "runs" / "tiny")


def _latency_keys(run: RunDir) -> dict[str, set[str]]:
    profile = json.loads(run.profile.read_text())
    return {name: {k for k, v in m["latency"].items() if v["median_ms"] is not None}
            for name, m in profile["models"].items()}


def test_report_measure_rebuilds_every_model_of_a_run(finished_run: tuple[Path, RunDir],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A conv-stem ViT teacher and a pruned student are rebuilt by the one model loader."""
    from profiling.report.__main__ import main as report_main

    _, run = finished_run
    assert json.loads(run.meta("teacher").read_text())["conv_stem"] is True
    assert json.loads(run.meta("student_pruned").read_text())["pruning"]["history"]
    before = run.profile.stat().st_mtime_ns
    assert report_main([str(run.root), "--measure", "--no-plots"]) == 0
    assert run.profile.stat().st_mtime_ns != before  # measured again, not reused
    profile = json.loads(run.profile.read_text())
    for name in ("teacher", "student", "student_pruned"):
        assert profile["models"][name]["params"] > 0 and profile["models"][name]["macs"] > 0
    pruned, student = profile["models"]["student_pruned"], profile["models"]["student"]
    assert pruned["params"] < student["params"]
    assert "onnx_b1" in _latency_keys(run)["teacher"]


def test_changed_export_settings_export_and_profile_again(finished_run: tuple[Path, RunDir],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run = finished_run
    assert main([str(cfg), "--stages", "export,report"]) == 0  # nothing changed: both reused
    out = capsys.readouterr().out
    assert "[export] finished earlier" in out and "profile.json measured the same files" in out
    assert not run.onnx("student_pruned", int8=True).exists()
    assert "onnx_int8_b1" not in _latency_keys(run)["student_pruned"]

    assert main([str(cfg), "--stages", "export,report", "export.int8=true"]) == 0
    out = capsys.readouterr().out
    assert "changed since the last export: exporting again" in out
    assert "[report] re-measuring" in out
    assert run.onnx("student_pruned", int8=True).is_file()
    assert "onnx_int8_b1" in _latency_keys(run)["student_pruned"]  # the new file was timed
    report = json.loads(run.report_json.read_text())
    assert report["models"]["student_pruned_int8"]["latency_ms"]["onnx_int8_b1"]["median"] > 0

    # Turned off again: the int8 file goes, and no latency of a file that no longer exists is shown.
    assert main([str(cfg), "--stages", "export,report"]) == 0
    assert not run.onnx("student_pruned", int8=True).exists()
    assert "onnx_int8_b1" not in _latency_keys(run)["student_pruned"]
    assert "student_pruned_int8" not in json.loads(run.report_json.read_text())["models"]


def test_a_replaced_teacher_makes_the_student_stale(finished_run: tuple[Path, RunDir],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run = finished_run
    student_before = json.loads(run.record("student").read_text())
    # A teacher replaced by hand: same architecture, other weights.
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(str(run.weights("teacher"))).items()}
    save_file(weights, str(run.weights("teacher")))
    new_teacher = provenance.digest(run.weights("teacher"))

    assert main([str(cfg), "--stages", "teacher,student"]) == 0
    out = capsys.readouterr().out
    assert "[teacher] model.safetensors changed since the stage wrote it" in out  # rescored, not retrained
    assert "[student] the teacher changed since it was made: redoing it" in out
    student_after = json.loads(run.record("student").read_text())
    assert student_before["inputs"]["teacher"] != new_teacher == student_after["inputs"]["teacher"]
    assert student_after["outputs"]["model.safetensors"] != student_before["outputs"]["model.safetensors"]

    # The pruned student was made from the old teacher and student: a run that keeps it says so ...
    with pytest.warns(StaleWarning, match="the student and the teacher that '.*student_pruned' was made from changed"):
        assert main([str(cfg), "--stages", "export"]) == 0
    # ... and the prune stage redoes it.
    assert main([str(cfg), "--stages", "prune"]) == 0
    assert "[student_pruned] the student and the teacher changed since it was made: redoing it" in \
        capsys.readouterr().out


def test_student_stage_refuses_a_teacher_made_with_another_config(finished_run: tuple[Path, RunDir],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run = finished_run
    config_before = run.config.read_text()
    assert main([str(cfg), "--stages", "student", "teacher.lr=0.123"]) == 2
    err = capsys.readouterr().err
    assert "teacher' was made with a different config (changed: teacher.lr)" in err
    assert "--force teacher" in err
    assert run.config.read_text() == config_before  # config.yaml never claims a teacher it does not hold
