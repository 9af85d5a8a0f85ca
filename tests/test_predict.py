"""python -m deploy.predict: mixed good and broken files, PyTorch and ONNX agreeing, the training
view, which model a run deploys, Grad-CAM overlays, and user errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import TEST_SEED, write_image
from core.errors import UserError
from data.images import open_rgb, square
from data.transforms import ModelView, to_float
from deploy.predict import collect_images, deployed_model, main
from deploy.export import export_onnx
from training.modeling import Classifier, save_artifact

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
THRESHOLD = 0.8  # the stored decision threshold
BROKEN = {"empty.jpg": "empty file", "text.jpg": "not an image", "cut.png": "truncated"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Good images of several sizes and shapes, the broken files of BROKEN, and a non-image file."""
    folder = tmp_path_factory.mktemp("images")
    for i, size in enumerate((40, 32, 57, 100)):
        write_image(folder / f"good{i}.png", seed=i, size=size)
    wide = write_image(folder / "sub" / "wide.jpg", seed=9, size=48)
    with Image.open(wide) as img:
        img.resize((90, 30)).save(wide)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture", encoding="utf-8")
    whole = (folder / "good0.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.txt").write_text("skipped: not an image extension", encoding="utf-8")
    return folder


GOOD = ["good0.png", "good1.png", "good2.png", "good3.png", "sub/wide.jpg"]
# The constructed model's defect logit on each good image (crop_pct 1.0), by mean brightness:
# darkest -3 ... brightest +3.5. The threshold 0.8 is a logit of 1.39: the two brightest are defects.
LOGITS_BY_BRIGHTNESS = [-3.0, -2.0, -1.0, 2.5, 3.5]


def _view(path: Path, crop_pct: float = 1.0) -> torch.Tensor:
    """What the model sees of an image file: as the data loader decodes, crops and squashes it, in [0, 1]."""
    return to_float(torch.from_numpy(np.array(square(open_rgb(path), SIZE, crop_pct))).permute(2, 0, 1))


def constructed_student(good: list[Path]) -> Classifier:
    """A MobileNetV3 whose outputs on ``good`` are set, not trained: the body keeps its random
    initialisation and the classifier is solved for (least squares, float64) so that the defect
    logit of each image is LOGITS_BY_BRIGHTNESS by its rank in mean brightness, the normal logit 0.
    A few training steps instead would leave which images pass the threshold to float rounding."""
    torch.manual_seed(TEST_SEED)
    net = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=2)
    model = Classifier(net, ModelView(SIZE, MEAN, STD), "mobilenetv3_small_100").eval()
    x = torch.stack([_view(p) for p in good])
    with torch.no_grad():
        feats = net.forward_head(net.forward_features(model.view(x)), pre_logits=True).double()
    rank = x.mean((1, 2, 3)).argsort().argsort()
    target = torch.tensor(LOGITS_BY_BRIGHTNESS, dtype=torch.float64)[rank]
    solution = torch.linalg.pinv(torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype)], 1)) @ target
    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.zero_()
        net.classifier.weight[1] = solution[:-1].float()
        net.classifier.bias[1] = solution[-1].float()
        logits = model(x)
    assert torch.allclose(logits[:, 1] - logits[:, 0], target.float(), atol=1e-3)  # the construction holds
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, images) -> Path:
    """A run with a finished student (model directory) and its ONNX export, as the pipeline leaves them.
    The student tells the good images apart by construction (see constructed_student), so an input
    mismatch between the two paths would show, and which images are defects is known in advance."""
    run = tmp_path_factory.mktemp("run")
    model = constructed_student([images / name for name in GOOD])
    meta = {"threshold": THRESHOLD, "config": {"data": {"crop_pct": 1.0}}}
    save_artifact(run / "student", model, meta)
    export_onnx(model.net, run / "export" / "student.onnx", SIZE,
                metadata={"model": "student", **model.describe(), "threshold": THRESHOLD})
    return run


def _rows(path: Path) -> dict[str, dict]:
    if path.suffix == ".json":
        return {Path(r["path"]).name: r for r in json.loads(path.read_text())["predictions"]}
    with path.open() as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


def test_mixed_folder_from_model_dir_and_onnx_agree(run_dir, images, tmp_path, capsys):
    assert main([str(run_dir / "student"), str(images), "--out", str(tmp_path / "torch.csv")]) == 0
    torch_out = capsys.readouterr().out
    assert main([str(run_dir / "export" / "student.onnx"), str(images), "--out", str(tmp_path / "onnx.json")]) == 0
    onnx_out = capsys.readouterr().out
    a, b = _rows(tmp_path / "torch.csv"), _rows(tmp_path / "onnx.json")
    assert sorted(a) == sorted(b) == sorted(["good0.png", "good1.png", "good2.png", "good3.png", "wide.jpg", *BROKEN])
    for name, reason in BROKEN.items():
        assert reason in a[name]["error"] and reason in b[name]["error"] and b[name]["prob_defect"] is None
        assert f"{name}: {reason}" in torch_out
    good = [n for n in a if n not in BROKEN]
    p_torch = np.array([float(a[n]["prob_defect"]) for n in good])
    p_onnx = np.array([b[n]["prob_defect"] for n in good])
    assert np.abs(p_torch - p_onnx).max() < 1e-5
    assert p_torch.max() - p_torch.min() > 0.05  # the images really are told apart
    assert [a[n]["decision"] for n in good] == [b[n]["decision"] for n in good]
    # The two brightest good images, and only they, are over the threshold (LOGITS_BY_BRIGHTNESS).
    brightness = {Path(n).name: _view(images / n).mean().item() for n in GOOD}
    brightest = sorted(brightness, key=brightness.get)[-2:]
    assert [b[n]["decision"] for n in good] == ["defect" if n in brightest else "normal" for n in good]
    summary = "8 images: 3 normal, 2 defect, 3 error; 1 other file(s) in the folders skipped"
    assert summary in torch_out and summary in onnx_out


@pytest.mark.parametrize("crop_pct", [1.0, 0.75])
def test_predicts_what_the_training_view_gives(run_dir, images, tmp_path, crop_pct):
    """Each image, whatever its size, decoded, cropped and squashed to a square as the data loader
    does with the run's data.crop_pct, then the Classifier's own view: the command's probability."""
    from training.modeling import load_model

    model_dir = tmp_path / "student"
    shutil.copytree(run_dir / "student", model_dir)
    meta = json.loads((model_dir / "meta.json").read_text())
    meta["crop_pct"] = crop_pct
    (model_dir / "meta.json").write_text(json.dumps(meta))
    model = load_model(model_dir)
    assert main([str(model_dir), str(images), "--out", str(tmp_path / "p.json"), "--threshold", "0.7"]) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["threshold"] == 0.7 and doc["runtime"] == "pytorch"
    for row in doc["predictions"]:
        if row["error"] is None:
            pixels = np.array(square(open_rgb(row["path"]), SIZE, crop_pct))
            with torch.no_grad():
                expected = model(to_float(torch.from_numpy(pixels).permute(2, 0, 1))[None]).softmax(1)[0, 1].item()
            assert row["prob_defect"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
            assert row["decision"] == ("defect" if expected >= 0.7 else "normal")


def test_an_onnx_file_alone_carries_its_crop(run_dir, images, tmp_path):
    """Copied away from its run, the ONNX file still crops as in training: crop_pct is in its metadata."""
    from training.modeling import load_model
    from deploy.export import update_metadata

    alone = tmp_path / "elsewhere" / "model.onnx"
    alone.parent.mkdir()
    shutil.copy(run_dir / "export" / "student.onnx", alone)
    update_metadata(alone, {"crop_pct": 0.75})
    model = load_model(run_dir / "student")
    assert main([str(alone), str(images), "--out", str(tmp_path / "p.json")]) == 0
    rows = [r for r in json.loads((tmp_path / "p.json").read_text())["predictions"] if r["error"] is None]
    assert len(rows) == 5
    for row in rows:
        pixels = np.array(square(open_rgb(row["path"]), SIZE, 0.75))
        with torch.no_grad():
            expected = model(to_float(torch.from_numpy(pixels).permute(2, 0, 1))[None]).softmax(1)[0, 1].item()
        assert row["prob_defect"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_which_model_a_run_deploys(tmp_path):
    run = tmp_path / "run"
    for name in ("student", "student_pruned"):
        (run / name).mkdir(parents=True)
        (run / name / "meta.json").write_text("{}")
        (run / name / "model.safetensors").write_bytes(b"")
    assert deployed_model(run) == run / "student_pruned"  # pruned first; PyTorch when not exported
    (run / "export").mkdir()
    (run / "export" / "student.onnx").write_bytes(b"")
    (run / "export" / "student_pruned.onnx").write_bytes(b"")
    assert deployed_model(run) == run / "export" / "student_pruned.onnx"  # its ONNX file when exported
    (run / "report.json").write_text(json.dumps({"deployed": "student"}))
    assert deployed_model(run) == run / "export" / "student.onnx"  # the report's choice wins
    # As profiling.report writes it: the chosen candidate's name, here the int8 copy.
    (run / "report.json").write_text(json.dumps({"deployed": {"model": "student_pruned_int8", "why": "fastest"}}))
    with pytest.raises(UserError, match="deploys 'student_pruned_int8', which is not in the run"):
        deployed_model(run)
    (run / "export" / "student_pruned_int8.onnx").write_bytes(b"")
    assert deployed_model(run) == run / "export" / "student_pruned_int8.onnx"
    (run / "report.json").write_text(json.dumps({"deployed": None}))  # a report without a student
    assert deployed_model(run) == run / "export" / "student_pruned.onnx"


def test_run_directory_and_gradcam_from_onnx(run_dir, images, tmp_path, capsys):
    cams = tmp_path / "cams"
    with pytest.warns(UserWarning, match="single cell"):  # MobileNetV3 at 32 px: a 1x1 feature map
        assert main([str(run_dir), str(images), "--gradcam", str(cams), "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert f"model {run_dir / 'export' / 'student.onnx'} (onnxruntime" in out  # the run's deployed model
    assert f"Grad-CAM from the PyTorch model it was exported from: {run_dir / 'student'}" in out
    rows = _rows(tmp_path / "p.csv")
    written = sorted(p.name for p in cams.iterdir())
    assert written == sorted(["good0.png.png", "good1.png.png", "good2.png.png", "good3.png.png", "sub__wide.jpg.png"])
    assert all(rows[n]["gradcam"] == "" for n in BROKEN)
    with Image.open(rows["wide.jpg"]["gradcam"]) as overlay:
        assert overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"
    # An ONNX file on its own has no PyTorch model to explain it with.
    alone = tmp_path / "alone.onnx"
    shutil.copy(run_dir / "export" / "student.onnx", alone)
    assert main([str(alone), str(images), "--gradcam", str(cams)]) == 2
    assert "--gradcam needs the PyTorch model" in capsys.readouterr().err


def test_gradcam_for_a_vit_teacher_directory(images, tmp_path):
    kwargs = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=SIZE, **kwargs)
    teacher = Classifier(net, ModelView(SIZE, [0.5] * 3, [0.5] * 3), "vit_tiny_patch16_224", kwargs)
    save_artifact(tmp_path / "teacher", teacher, {"threshold": 0.5})
    cams = tmp_path / "cams"
    args = [str(tmp_path / "teacher"), str(images / "sub"), str(images / "good3.png"), "--gradcam", str(cams)]
    assert main(args) == 0
    assert sorted(p.name for p in cams.iterdir()) == ["good3.png.png", "sub__wide.jpg.png"]


def test_globs_missing_paths_and_duplicates(images, tmp_path):
    found = collect_images([str(images / "good*.png"), str(images / "good0.png"), str(tmp_path / "nope.png"),
                            str(images / "sub")])
    assert [p.name for p in found.paths] == ["good0.png", "good1.png", "good2.png", "good3.png", "wide.jpg"]
    assert found.missing == [str(tmp_path / "nope.png")] and found.skipped == 0
    whole = collect_images([str(images)])
    assert len(whole.paths) == 8 and whole.skipped == 1  # notes.txt is not looked at, but counted


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.predict", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("what, message", [("missing model", "does not exist"), ("no images", "no images found"),
                                           ("not a model", "is not a model")])
def test_user_errors_exit_2_without_traceback(run_dir, images, tmp_path, what, message):
    args = {"missing model": [str(tmp_path / "no_such_run"), str(images)],
            "no images": [str(run_dir / "export" / "student.onnx"), str(tmp_path / "empty_dir_*")],
            "not a model": [str(images / "notes.txt"), str(images)]}[what]
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and message in res.stderr and "Traceback" not in res.stderr
    assert "Traceback" in _cli(*args, "--debug").stderr


def test_onnx_path_imports_no_training_stack(run_dir, images):
    code = ("import sys; from deploy.predict import main; rc = main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'onnx') if m in sys.modules)); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, str(run_dir / "export" / "student.onnx"), str(images)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("[]")
