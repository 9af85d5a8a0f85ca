"""ONNX export: same outputs as PyTorch, dynamic batch, metadata, verification numbers, int8."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import timm
import torch

from conftest import TEST_SEED
from core.errors import UserError
from deploy.export import export_onnx, quantize_int8, read_metadata, verify_onnx
from deploy.runtime import onnx_logits, onnx_session
from student.prune import prune_channels

SIZE = 32
META = {"arch": "mobilenetv3_small_100", "threshold": 0.42, "class_names": ["normal", "defect"],
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A task with a simple rule (bright = defect), so outputs differ from image to image:
    an untrained net gives ~0.5 everywhere, where int8 rounding alone decides."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5 + (labels.float() - 0.5).view(-1, 1, 1, 1), labels


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    """A MobileNetV3 that follows the rule by construction, not training: the body keeps its random
    initialisation and the classifier is solved for (ridge least squares, float64) so that the
    defect logit is +4 on bright images and -4 on dark ones (256 images). Every held-out image
    lands on its side of 0.5 by at least 0.2 in logit (init seeds 0-8), far beyond float rounding;
    after a few training steps, how far would be up to the CPU's rounding."""
    torch.manual_seed(TEST_SEED)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=2).eval()
    images, labels = _images(256, seed=1000)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(images), pre_logits=True).double()
    a = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype)], 1)
    target = (labels * 8.0 - 4.0).double()
    solution = torch.linalg.solve(a.T @ a + 1e-8 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ target)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.weight[1] = solution[:-1].float()
        model.classifier.bias[1] = solution[-1].float()
        held_out, truth = _images(64, seed=12)
        logits = model(held_out)
    assert torch.equal(logits[:, 1] > logits[:, 0], truth.bool()), "the constructed classifier misses the rule"
    return model


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory) -> str:
    return export_onnx(net, tmp_path_factory.mktemp("export") / "model.onnx", SIZE, metadata=META)


def _torch_logits(net: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net(images).numpy()


def test_onnx_matches_torch_at_batch_1_and_3(net, exported):
    session = onnx_session(exported, threads=1)
    for n in (1, 3):
        images, _ = _images(n, seed=100 + n)
        got = onnx_logits(session, images.numpy())
        np.testing.assert_allclose(got, _torch_logits(net, images), rtol=1e-5, atol=1e-5)
    dims = onnx.load(str(exported)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, SIZE, SIZE]


def test_metadata_round_trips_and_nothing_temporary_is_left(exported):
    meta = read_metadata(exported)
    assert {k: meta[k] for k in META} == META
    assert meta["img_size"] == SIZE and meta["opset"] == 17 and meta["precision"] == "fp32"
    assert json.loads(exported.with_suffix(".json").read_text()) == meta
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model.json", "model.onnx"]


def test_verify_numbers(net, exported):
    images, _ = _images(24, seed=7)
    same = verify_onnx(exported, net, images, threshold=0.5)
    assert same["n"] == 24 and same["agreement"] == 1.0
    assert same["max_abs_diff_prob"] < 1e-5
    # Against a net whose defect logit is shifted by 1, the numbers are known in advance.
    shifted = copy.deepcopy(net)
    with torch.no_grad():
        shifted.get_classifier().bias[1] += 1.0
    p_onnx = torch.from_numpy(_torch_logits(net, images)).softmax(1)[:, 1]
    p_shifted = torch.from_numpy(_torch_logits(shifted, images)).softmax(1)[:, 1]
    # Halfway between the two probabilities of the image nearest 0.5: that one decision surely flips.
    k = int((p_onnx - 0.5).abs().argmin())
    threshold = float(p_onnx[k] + p_shifted[k]) / 2
    other = verify_onnx(exported, shifted, images, threshold=threshold)
    assert other["max_abs_diff_prob"] == pytest.approx((p_shifted - p_onnx).abs().max().item(), abs=1e-5)
    assert other["max_abs_diff_logit"] == pytest.approx(1.0, abs=1e-4)
    expected = ((p_shifted >= threshold) == (p_onnx >= threshold)).float().mean().item()
    assert other["agreement"] == pytest.approx(expected) and other["agreement"] < 1.0


def test_pruned_model_exports_and_verifies(net, tmp_path):
    pruned = copy.deepcopy(net)
    prune_channels(pruned, torch.zeros(1, 3, SIZE, SIZE), 0.3)
    path = export_onnx(pruned.eval(), tmp_path / "pruned.onnx", SIZE)
    result = verify_onnx(path, pruned, _images(16, seed=3)[0], threshold=0.5)
    assert result["agreement"] == 1.0 and result["max_abs_diff_prob"] < 1e-5
    full = export_onnx(net, tmp_path / "full.onnx", SIZE)
    assert path.stat().st_size < 0.7 * full.stat().st_size


def test_int8_runs_and_mostly_agrees(net, exported, tmp_path):
    calibration, _ = _images(32, seed=11)
    path = quantize_int8(exported, tmp_path / "model_int8.onnx", calibration.numpy())
    meta = read_metadata(path)
    assert meta["precision"] == "int8" and meta["calibration_images"] == 32
    assert {k: meta[k] for k in META} == META
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_int8.json", "model_int8.onnx"]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    session = onnx_session(path, threads=1)
    for n in (1, 3):
        assert onnx_logits(session, _images(n, seed=n)[0].numpy()).shape == (n, 2)
    images, _ = _images(64, seed=12)
    result = verify_onnx(path, net, images, threshold=0.5)
    assert result["agreement"] >= 0.85, result
    assert path.stat().st_size < exported.stat().st_size / 2


def test_int8_calibration_as_batches(exported, tmp_path):
    batches = (b.numpy() for b in _images(12, seed=13)[0].split(5))
    path = quantize_int8(exported, tmp_path / "q.onnx", batches)
    assert read_metadata(path)["calibration_images"] == 12


def test_dynamo_export_keeps_the_batch_dynamic(net, tmp_path):
    path = export_onnx(net, tmp_path / "dyn.onnx", SIZE, dynamo=True, metadata=META)
    meta = read_metadata(path)
    assert meta["exporter"] == "dynamo" and meta["opset"] >= 17 and meta["threshold"] == META["threshold"]
    session = onnx_session(path, threads=1)
    for n in (1, 3):
        images, _ = _images(n, seed=200 + n)
        np.testing.assert_allclose(onnx_logits(session, images.numpy()), _torch_logits(net, images),
                                   rtol=1e-5, atol=1e-5)


def test_dynamo_export_without_onnxscript_says_how_to_fix_it(net, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install onnxscript.*export.dynamo=false"):
        export_onnx(net, tmp_path / "dyn.onnx", SIZE, dynamo=True, metadata=META)
    assert list(tmp_path.iterdir()) == []


class _Broken(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("cannot trace")


def test_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        export_onnx(_Broken(), tmp_path / "model.onnx", SIZE)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_a_user_error(exported, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_metadata(tmp_path / "missing.onnx")
    with pytest.raises(UserError, match="does not exist"):
        onnx_session(tmp_path / "missing.onnx")
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot"):
        onnx_session(damaged)
    with pytest.raises(UserError, match="no images"):
        quantize_int8(exported, tmp_path / "q.onnx", [])
