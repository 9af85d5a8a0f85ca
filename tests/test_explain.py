"""Grad-CAM: the layer chosen per architecture, shapes for ViT grids and pruned students, the
overlay's colours, and that a model which learned the synthetic defects looks at them."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

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


def _train(seed: int, steps: int = 150) -> torch.nn.Module:
    """A narrow ResNet-10 (0.2 M parameters) trained from scratch on rendered beads (30% defects, severity 1)."""
    torch.manual_seed(seed)
    beads = _beads(seed, 600, 0.3)
    x, y = _tensor(beads), torch.tensor([b.defect is not None for b in beads]).long()
    net = timm.create_model("resnet10t", pretrained=False, num_classes=2, stem_width=16, channels=(16, 32, 48, 64),
                            output_stride=8)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.tensor([1.0, 7 / 3])  # balance the 30% defects
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        flip = (torch.rand(32, generator=gen) < 0.5).view(-1, 1, 1, 1)
        batch = torch.where(flip, x[idx].flip(-1), x[idx])
        loss = F.cross_entropy(net(batch), y[idx], weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return net.eval()


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


def _detects(net: torch.nn.Module, seed: int = 2) -> float:
    """Held-out accuracy at 0.5 on balanced normal/defect beads: did training work at all?"""
    beads = _beads(seed, 60, 0.5)
    y = torch.tensor([b.defect is not None for b in beads])
    with torch.no_grad():
        return float(((net(_tensor(beads)).softmax(1)[:, 1] >= 0.5) == y).float().mean())


def test_heat_peaks_inside_the_planted_defect():
    net = _train(seed=0)
    accuracy = _detects(net)
    assert accuracy >= 0.75, f"the model did not learn the defects (accuracy {accuracy:.2f}); nothing to explain"
    r = localisation(net)
    print(f"\nGrad-CAM peak in the defect box: {r['hit']:.2f} of {r['n']} defect images; chance: {r['area']:.2f} "
          f"(box area), {r['other_peaks']:.2f} (other images' peaks); detection accuracy {accuracy:.2f}")
    # More often than chance by three binomial standard errors: a test that can fail.
    for name in ("area", "other_peaks"):
        p = r[name]
        assert r["hit"] > p + 3 * np.sqrt(p * (1 - p) / r["n"]), (name, r)
