"""OpenVINO as a runtime: export and verification against PyTorch, IR beside the ONNX file, the
latency column, ``predict --runtime openvino`` agreeing with ONNX Runtime, and a clear error
without the package. No test asserts on how fast anything is."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conftest import write_image
from core.errors import UserError
from deploy.export import export_onnx, verify_onnx, verify_openvino
from deploy.predict import main as predict_main
from profiling.cost.config import RUNTIME_NAMES, ProfileConfig
from profiling.cost.latency import RUNTIMES, profile_latency
from profiling.cost.profile_model import ModelEntry, profile_model
from training.modeling import Classifier, save_artifact
from data.transforms import ModelView

SIZE = 32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
THRESHOLD = 0.5
FAST = {"warmup": 1, "runs": 5}

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason='needs the openvino package (pip install -e ".[openvino]"; in the test extra)')


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright = defect: a few steps learn it, so outputs differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5 + (labels.float() - 0.5).view(-1, 1, 1, 1), labels


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(15):
        images, labels = _images(16, seed=step)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(net, tmp_path_factory) -> Path:
    """A run with a finished student and its ONNX export, as the pipeline leaves them."""
    run = tmp_path_factory.mktemp("run")
    model = Classifier(net, ModelView(SIZE, MEAN, STD), "mobilenetv3_small_050")
    save_artifact(run / "student", model.eval(), {"threshold": THRESHOLD, "config": {"data": {"crop_pct": 1.0}}})
    export_onnx(net, run / "export" / "student.onnx", SIZE,
                metadata={"model": "student", **model.describe(), "threshold": THRESHOLD})
    return run


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, size in enumerate((40, 32, 57, 100, 48, 64)):
        write_image(folder / f"p{i}.png", seed=i, size=size)
    return folder


def test_openvino_is_a_runtime_everywhere_runtimes_are_named() -> None:
    assert "openvino" in RUNTIME_NAMES and set(RUNTIME_NAMES) == set(RUNTIMES)
    assert ProfileConfig(runtimes=["onnx", "openvino"]).runtimes == ["onnx", "openvino"]


@needs_openvino
def test_openvino_matches_torch_like_onnx_runtime_and_saves_ir(net, run_dir, tmp_path) -> None:
    from deploy.openvino_runtime import compile_openvino, ir_metadata, save_ir

    onnx_path = run_dir / "export" / "student.onnx"
    images, _ = _images(24, seed=99)
    ov = verify_openvino(onnx_path, net, images, THRESHOLD, batch_size=7)  # a ragged last chunk: dynamic batch
    ort = verify_onnx(onnx_path, net, images, THRESHOLD)
    assert ov["n"] == ort["n"] == 24 and ov["agreement"] == 1.0
    assert ov["max_abs_diff_prob"] < 1e-4 and ov["max_abs_diff_logit"] < 1e-3  # fp32, not bf16
    assert ov["openvino"]

    # IR beside a copy of the file: fp32 weights (about the ONNX file's size), metadata inside it
    copy = tmp_path / "student.onnx"
    copy.write_bytes(onnx_path.read_bytes())
    meta = {"model": "student", "threshold": THRESHOLD, "img_size": SIZE}
    xml = save_ir(copy, meta)
    assert xml == tmp_path / "student.xml" and xml.with_suffix(".bin").is_file()
    assert xml.with_suffix(".bin").stat().st_size > 0.8 * copy.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing temporary left
    assert ir_metadata(xml) == meta
    assert verify_openvino(xml, net, images, THRESHOLD)["max_abs_diff_prob"] < 1e-4
    compiled = compile_openvino(xml, threads=1)
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    assert str(compiled.get_property("PERFORMANCE_HINT")) in ("LATENCY", "PerformanceMode.LATENCY")


@needs_openvino
def test_openvino_latency_column(net, run_dir) -> None:
    onnx_path = run_dir / "export" / "student.onnx"
    stats = profile_latency(net, SIZE, ["onnx", "openvino"], batch_sizes=[1, 2], threads=1, onnx_path=onnx_path,
                            allow_busy=True, **FAST)
    ov = [s for s in stats if s.runtime == "openvino"]
    assert [(s.batch, s.threads) for s in ov] == [(1, 1), (2, 1)]
    assert all(s.skipped is None and s.runs == 5 and s.min_ms <= s.median_ms <= s.max_ms for s in ov)
    (no_file,) = profile_latency(net, SIZE, ["openvino"], allow_busy=True, **FAST)
    assert no_file.skipped == "no fp32 ONNX file given" and no_file.median_ms is None
    result = profile_model(ModelEntry(net, SIZE, onnx_path), runtimes=["openvino"], batch_sizes=[1], threads=1,
                           allow_busy=True, peak_memory=False, **FAST)
    assert result["latency"]["openvino_b1"]["median_ms"] > 0


@needs_openvino
def test_predict_on_openvino_agrees_with_onnx_runtime(run_dir, photos, tmp_path, capsys) -> None:
    from deploy.openvino_runtime import save_ir
    from deploy.export import read_metadata

    onnx_path = run_dir / "export" / "student.onnx"
    xml = save_ir(onnx_path, read_metadata(onnx_path))
    outs = {}
    for name, args in (("ort", [str(onnx_path)]), ("ov", [str(onnx_path), "--runtime", "openvino"]),
                       ("ir", [str(xml)])):
        assert predict_main([*args, str(photos), "--out", str(tmp_path / f"{name}.json")]) == 0
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert "(openvino," in capsys.readouterr().out
    assert [outs[n]["runtime"] for n in ("ort", "ov", "ir")] == ["onnxruntime", "openvino", "openvino"]
    probs = {n: np.array([r["prob_defect"] for r in o["predictions"]]) for n, o in outs.items()}
    assert len(probs["ort"]) == 6 and probs["ort"].max() - probs["ort"].min() > 0.01  # the photos are told apart
    for n in ("ov", "ir"):
        assert np.abs(probs[n] - probs["ort"]).max() < 1e-4
        assert [r["decision"] for r in outs[n]["predictions"]] == [r["decision"] for r in outs["ort"]["predictions"]]
    # a run whose report deploys its model on OpenVINO predicts there without being told
    (run_dir / "report.json").write_text(json.dumps({"deployed": {"model": "student", "runtime": "openvino"}}))
    try:
        assert predict_main([str(run_dir), str(photos), "--out", str(tmp_path / "run.json")]) == 0
    finally:
        (run_dir / "report.json").unlink()
    assert json.loads((tmp_path / "run.json").read_text())["runtime"] == "openvino"
    # IR cannot run on ONNX Runtime; a model directory does not run on OpenVINO
    assert predict_main([str(xml), str(photos), "--runtime", "onnxruntime"]) == 2
    assert "ONNX Runtime cannot run" in capsys.readouterr().err
    assert predict_main([str(run_dir / "student"), str(photos), "--runtime", "openvino"]) == 2
    assert "PyTorch model directory" in capsys.readouterr().err


def test_without_the_package_a_user_error_names_the_extra(net, run_dir, photos, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    from deploy.openvino_runtime import compile_openvino, openvino_version, save_ir

    onnx_path = run_dir / "export" / "student.onnx"
    hint = 'pip install -e ".[openvino]"'
    for call in (lambda: compile_openvino(onnx_path), lambda: save_ir(onnx_path),
                 lambda: verify_openvino(onnx_path, net, _images(2, 0)[0], THRESHOLD),
                 lambda: profile_latency(net, SIZE, ["openvino"], onnx_path=onnx_path, allow_busy=True, **FAST)):
        with pytest.raises(UserError, match="needs the OpenVINO package") as err:
            call()
        assert hint in str(err.value)
    assert openvino_version() is None
    assert predict_main([str(onnx_path), str(photos), "--runtime", "openvino"]) == 2
    err = capsys.readouterr().err
    assert hint in err and "Traceback" not in err
    # a run deployed on OpenVINO still predicts here, on ONNX Runtime, and says so
    (run_dir / "report.json").write_text(json.dumps({"deployed": {"model": "student", "runtime": "openvino"}}))
    try:
        assert predict_main([str(run_dir), str(photos)]) == 0
    finally:
        (run_dir / "report.json").unlink()
    assert "OpenVINO, which is not installed here" in capsys.readouterr().out


@needs_openvino
def test_the_export_stage_checks_openvino_and_saves_ir(tmp_path) -> None:
    """A tiny run through export with export.openvino: verify.json records OpenVINO against PyTorch,
    and the IR lies beside the ONNX file, carrying the model's threshold."""
    import distill.run
    from deploy.openvino_runtime import ir_metadata
    from test_faults import write_config

    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "runs", threads=None, num_train=32)
    argv = [str(cfg), "--stages", "data,teacher,student,export", "teacher.epochs=1", "student.epochs=1",
            "export.openvino=true", "export.models=[student]"]
    assert distill.run.main(argv) == 0
    export = tmp_path / "runs" / "tiny" / "export"
    check = json.loads((export / "verify.json").read_text())["models"]["student"]
    assert check["openvino"]["n"] == check["n"] > 0 and check["openvino"]["agreement"] == 1.0
    assert check["openvino"]["max_abs_diff_prob"] < 1e-4 and check["openvino"]["ir"] == "student.xml"
    assert (export / "student.bin").is_file()
    meta = json.loads((tmp_path / "runs" / "tiny" / "student" / "meta.json").read_text())
    assert ir_metadata(export / "student.xml")["threshold"] == meta["threshold"]


def test_a_run_that_needs_openvino_stops_at_once_without_it(tmp_path, monkeypatch, capsys) -> None:
    import distill.run
    from test_faults import write_config

    monkeypatch.setitem(sys.modules, "openvino", None)
    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "runs", threads=None)
    assert distill.run.main([str(cfg), "profile.runtimes=[onnx,openvino]"]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[openvino]"' in err and "profile.runtimes" in err
    assert not (tmp_path / "runs" / "tiny" / "data").exists()  # before any stage ran
