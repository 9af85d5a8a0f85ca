"""Grad-CAM: the layer chosen per architecture, shapes for ViT grids and pruned students, the
overlay's colours, the class activation map of a pooled linear head, and that a model whose
defect evidence lies in the synthetic defects (constructed, not trained) gets its heat there."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import TEST_SEED
from data.config import DEFECT_TYPES
from data.synth import render
from deploy.explain import gradcam, overlay, target_layer
from student.prune import prune_channels


def _vit(img_size, **kwargs) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=img_size,
                             patch_size=8, depth=2, embed_dim=32, num_heads=2, **kwargs).eval()


@pytest.mark.parametrize("img_size, kwargs, grid", [
    (32, {}, (4, 4)),
    ((32, 48), {"reg_tokens": 2}, (4, 6)),  # a non-square grid, three prefix tokens
    (32, {"class_token": False, "global_pool": "avg"}, (4, 4)),  # no prefix token at all
])
def test_vit_maps_and_token_grid(img_size, kwargs, grid):
    net = _vit(img_size, **kwargs)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(3, 3, h, w)
    layer = target_layer(net, x[:1])
    assert layer.name == "blocks.1.norm1" and layer.module is net.blocks[-1].norm1 and layer.grid == grid
    # Patch token k (after the prefix) lands at row k // gw, column k % gw of the grid.
    prefix, n = net.num_prefix_tokens, grid[0] * grid[1]
    tokens = torch.cat([torch.full((1, prefix, 2), -1.0), torch.arange(n).float().view(1, n, 1).expand(1, n, 2)], 1)
    assert torch.equal(layer.reshape(tokens)[0, 0], torch.arange(n).float().view(grid))
    maps = gradcam(net, x)
    assert maps.shape == (3, h, w) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and maps.max() > 0.5


@pytest.mark.parametrize("arch, name", [("mobilenetv3_small_100", "blocks"), ("efficientnet_b0", "bn2"),
                                        ("resnet10t", "layer4")])
def test_cnn_layer_is_the_last_feature_map(arch, name):
    net = timm.create_model(arch, pretrained=False, num_classes=2).eval()
    x = torch.randn(2, 3, 64, 64)
    layer = target_layer(net, x[:1])
    assert layer.name == name and layer.reshape is None and layer.grid == (2, 2)  # stride 32
    with torch.no_grad():
        assert layer.module(*_input_of(net, layer.module, x[:1])).shape == net.forward_features(x[:1]).shape
    assert gradcam(net, x).shape == (2, 64, 64)


def _input_of(net: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> tuple:
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0]


def test_pruned_student_is_narrower_and_still_explained():
    net = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=2)
    x = torch.randn(2, 3, 64, 64)
    before = net.forward_features(x[:1]).shape[1]
    prune_channels(net, x[:1], 0.5)
    layer = target_layer(net, x[:1])
    assert layer.name == "blocks" and net.forward_features(x[:1]).shape[1] < before
    maps = gradcam(net, x)  # net is in train mode here: it must stay so, with no gradients left
    assert maps.shape == (2, 64, 64) and 0.0 <= maps.min() and maps.max() <= 1.0
    assert net.training and all(p.grad is None for p in net.parameters())


def test_frozen_network_same_maps():
    net = timm.create_model("resnet10t", pretrained=False, num_classes=2).eval()
    x = torch.randn(2, 3, 64, 64)
    free = gradcam(net, x, target_class=0)
    assert free.max() > 0.5  # a real map, not the all-zero one of no evidence
    net.requires_grad_(False)
    np.testing.assert_allclose(gradcam(net, x, target_class=0), free, atol=1e-6)


def test_a_single_cell_map_is_flagged():
    net = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=2).eval()
    with pytest.warns(UserWarning, match="single cell at 32 px"):
        assert gradcam(net, torch.randn(1, 3, 32, 32)).shape == (1, 32, 32)


def test_overlay_puts_red_on_the_hot_spot():
    image = np.full((40, 60, 3), 128, np.uint8)
    cam = np.zeros((4, 6), np.float32)
    cam[0, 0] = 1.0  # hot at the top-left, cold elsewhere; resized to the image
    out = overlay(image, cam)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    hot, cold = out[2, 2].astype(int), out[-3, -3].astype(int)
    assert hot[0] > hot[2] + 50 and cold[2] > cold[0] + 50  # jet: 1 is red, 0 is blue
    with pytest.raises(ValueError, match="uint8"):
        overlay(image.astype(np.float32), cam)


# ----------------------------------------------------------------------------- localisation
SIZE = 96  # ResNet at output stride 8 gives a 12x12 map: fine enough to say where a defect is


def _beads(seed: int, n: int, defect_ratio: float) -> list:
    rng = np.random.default_rng(seed)
    return [render(seed * 10_000 + i, size=SIZE, severity=1.0,
                   defect=DEFECT_TYPES[i % len(DEFECT_TYPES)] if rng.random() < defect_ratio else None)
            for i in range(n)]


def _tensor(beads: list) -> torch.Tensor:
    x = torch.from_numpy(np.stack([b.image for b in beads])).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25


def _box_mask(boxes: list) -> np.ndarray:
    """Pixels whose centre lies in any of the YOLO boxes (normalised cx, cy, w, h)."""
    centres = (np.arange(SIZE) + 0.5) / SIZE
    mask = np.zeros((SIZE, SIZE), bool)
    for _, cx, cy, w, h in boxes:
        mask |= (np.abs(centres[:, None] - cy) <= h / 2) & (np.abs(centres[None, :] - cx) <= w / 2)
    return mask


def localisation(net: torch.nn.Module, seed: int = 1, n: int = 140) -> dict[str, float]:
    """Where the defect-class heatmap peaks on ``n`` held-out defect images, against two chance rates:
    ``area`` (a peak placed uniformly at random: the fraction of the image the boxes cover) and
    ``other_peaks`` (this model's peaks on *other* images tested against this image's boxes). The
    second is the stricter: defects sit near the centre and so may the heat, whatever the image."""
    beads = _beads(seed, n, 1.0)
    masks = [_box_mask(b.boxes) for b in beads]
    peaks = [np.unravel_index(np.argmax(m), m.shape) for m in gradcam(net, _tensor(beads))]
    hits = [mask[p] for mask, p in zip(masks, peaks)]
    other = [np.mean([mask[p] for j, p in enumerate(peaks) if j != i]) for i, mask in enumerate(masks)]
    return {"n": n, "hit": float(np.mean(hits)), "area": float(np.mean([m.mean() for m in masks])),
            "other_peaks": float(np.mean(other))}


def constructed(n: int = 400) -> torch.nn.Module:
    """A ResNet-10 (output stride 8: a 12x12 map at 96 px) whose defect evidence is set, not
    trained: the body keeps its random initialisation (seed TEST_SEED) and the classifier's defect
    row is solved for (ridge least squares, float64) so that, at each cell of the last feature map,
    it reads how much of the cell the defect boxes cover, on ``n`` rendered defect beads (not the
    ones localisation() is scored on). After pooling, that row is the model's defect logit, so the
    evidence for the defect lies where the boxes are, as far as a linear read of random features
    can put it. Measured over init seeds 0, 2, 3, 7: peaks in the box on 0.72-0.76 of held-out beads,
    13-15 beads above the stricter chance line; a few training steps instead would leave whether
    the model learned anything to the CPU's rounding."""
    torch.manual_seed(TEST_SEED)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=2, stem_width=16, channels=(64, 96, 128, 256),
                            output_stride=8).eval()
    beads = _beads(0, n, 1.0)
    with torch.no_grad():
        maps = net.forward_features(_tensor(beads)).double()  # N, C, 12, 12
    boxes = torch.from_numpy(np.stack([_box_mask(b.boxes) for b in beads])).double()
    cover = F.avg_pool2d(boxes[:, None], SIZE // maps.shape[-1])  # N, 1, 12, 12: box share of each cell
    cells = torch.cat([maps.permute(0, 2, 3, 1).flatten(0, 2), torch.ones(cover.numel(), 1, dtype=maps.dtype)], 1)
    gram = cells.T @ cells
    row = torch.linalg.solve(gram + 1e-6 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype),
                             cells.T @ cover.flatten())
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        net.fc.weight[1] = row[:-1].float()
        net.fc.bias[1] = row[-1].float()
    return net


def test_gradcam_of_a_pooled_linear_head_is_its_class_activation_map():
    """Global average pooling then a linear layer: the gradient of the defect logit at every cell of
    the last map is fc.weight[1] / cells, so Grad-CAM is ReLU(sum_c w_c A_c) (Zhou et al.'s CAM),
    resized to the input and scaled to [0, 1]. Checks the layer, the class and the orientation."""
    net = constructed(n=40)
    x = _tensor(_beads(3, 4, 1.0))
    with torch.no_grad():
        cam = torch.einsum("c,nchw->nhw", net.fc.weight[1], net.forward_features(x)).clamp(min=0)
    big = F.interpolate(cam[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    low, high = big.amin((1, 2), keepdim=True), big.amax((1, 2), keepdim=True)
    expected = ((big - low) / (high - low)).numpy()  # the library scales before and after resizing: the same
    got = gradcam(net, x)
    assert got.shape == (4, SIZE, SIZE) and (got.max((1, 2)) > 0.99).all()
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_heat_peaks_inside_the_planted_defect():
    """A model whose defect evidence lies in the planted defects (constructed()) gets its heat there."""
    r = localisation(constructed())
    print(f"\nGrad-CAM peak in the defect box: {r['hit']:.2f} of {r['n']} defect images; chance: {r['area']:.2f} "
          f"(box area), {r['other_peaks']:.2f} (other images' peaks)")
    # More often than chance by three binomial standard errors: a test that can fail.
    for name in ("area", "other_peaks"):
        p = r[name]
        assert r["hit"] > p + 3 * np.sqrt(p * (1 - p) / r["n"]), (name, r)
