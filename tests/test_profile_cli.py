"""python -m profiling.profile: what it can load (timm name, ONNX file, run model directory) and its CLI.

No test asserts on how fast anything is.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch

from core.errors import UserError
from data.transforms import ModelView
from profiling.profile import main, model_dir_entry, onnx_entry, timm_entry
from student.config import PruneConfig
from student.prune import StudentPruner
from training.modeling import Classifier, save_artifact

ARCH = "mobilenetv3_small_050"
FAST = ["--runtimes", "eager", "onnx", "--runs", "2", "--warmup", "0", "--no-memory", "--allow-busy"]


def _pruned_model_dir(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A pruned student saved exactly as the prune stage saves it: StudentPruner.structure() in
    meta.json (through save_artifact), weights in safetensors."""
    torch.manual_seed(0)
    net = timm.create_model(ARCH, pretrained=False, num_classes=2).eval()
    pruner = StudentPruner(net, torch.zeros(1, 3, 32, 32), PruneConfig(target={"macs": 0.6}))
    pruner.step()
    model = Classifier(net, ModelView(32, (0.5,) * 3, (0.25,) * 3), ARCH)
    save_artifact(folder, model, {"pruning": json.loads(json.dumps(pruner.structure()))})  # as JSON keeps it
    return folder, net


def test_a_pruned_model_directory_reloads_to_identical_outputs(tmp_path: Path) -> None:
    folder, pruned = _pruned_model_dir(tmp_path / "run" / "student_pruned")
    entry = model_dir_entry(folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(entry.net(x), pruned(x), rtol=0, atol=0)
    fresh = sum(p.numel() for p in timm.create_model(ARCH, num_classes=2).parameters())
    assert sum(p.numel() for p in entry.net.parameters()) < fresh
    assert (entry.img_size, entry.weights, entry.onnx) == (32, folder / "model.safetensors", None)


def test_a_model_directory_whose_weights_do_not_fit_is_a_user_error(tmp_path: Path) -> None:
    folder, _ = _pruned_model_dir(tmp_path / "student")
    meta = json.loads((folder / "meta.json").read_text())
    del meta["pruning"]  # the unpruned shapes cannot take the pruned weights
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not fit the architecture"):
        model_dir_entry(folder)


def test_timm_names_take_their_own_size_or_the_one_given() -> None:
    assert timm_entry(ARCH).img_size == 224
    vit = timm_entry("vit_tiny_patch16_224", 64)
    assert vit.img_size == 64 and vit.net(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


def test_an_onnx_file_reads_its_size_from_the_metadata(tmp_path: Path) -> None:
    import onnx

    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "b", 2: "h", 3: "w"}})
    with pytest.raises(UserError, match="pass --img-size"):
        onnx_entry(path)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"img_size": "48"})
    onnx.save(model, str(path))
    assert onnx_entry(path).img_size == 48


def test_cli_profiles_a_timm_name_and_prints_a_table(capsys: pytest.CaptureFixture) -> None:
    assert main([ARCH, "--img-size", "32", *FAST]) == 0
    out = capsys.readouterr().out
    assert "M MACs per image (BatchNorm folded" in out and "fp32 matmul" in out
    assert "eager" in out and "onnx" in out and "no fp32 ONNX file given" in out  # skipped, with the reason


def test_cli_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["not_a_model_name", *FAST]) == 2
    assert "neither a timm model name" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.onnx")]) == 2
    assert main([ARCH, "--batch-sizes", "0"]) == 2
