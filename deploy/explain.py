"""Grad-CAM heatmaps for the defect class, for the ViT teacher and the CNN students alike.

A defect call is only trusted when the heat lies on the bead where the defect is; a model that
decides from the fixture, the lighting or the image border shows it here first. The maps come
from the ``grad-cam`` package (pytorch-grad-cam: ``GradCAM``, ``ClassifierOutputTarget``,
``show_cam_on_image``); this module only chooses the layer and shapes its output.

Which layer (:func:`target_layer`), from the network's own structure:

* a timm ViT (it has ``blocks`` and ``patch_embed``): the last block's ``norm1``. The head reads
  the class token after the last block, so the patch tokens *leaving* it get no gradient; one
  step earlier they still reach the class token through the last attention. Its tokens are
  reshaped to the patch grid (``patch_embed.grid_size``, not necessarily square) after dropping
  the class and register tokens (``num_prefix_tokens``).
* a CNN (MobileNetV3, EfficientNet, ResNet, ...): the module that outputs the last spatial
  feature map, i.e. the tensor ``forward_features`` returns (MobileNetV3: ``blocks``, ending in
  its last convolutional block; EfficientNet: ``bn2`` after ``conv_head``; ResNet: ``layer4``).
  It is found by running ``forward_features`` once with hooks, not by name, so a pruned student
  with narrower channels needs nothing special.

Takes any ``nn.Module`` as an argument (it imports nothing of ours but ``data``), so the report
can put heatmaps on its grid of worst errors as well.

    Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization, ICCV 2017, https://arxiv.org/abs/1610.02391
"""

from __future__ import annotations

from collections.abc import Callable
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from data import DEFECT

__all__ = ["CamLayer", "target_layer", "gradcam", "overlay", "tile_overlay"]


@dataclass(frozen=True)
class CamLayer:
    """The layer whose activations and gradients make the map, and how to make them B,C,H,W."""

    name: str
    module: nn.Module
    grid: tuple[int, int]  # cells of the map before it is resized to the image: its real resolution
    reshape: Callable[[Tensor], Tensor] | None = None


def _is_vit(net: nn.Module) -> bool:
    return hasattr(net, "blocks") and hasattr(net, "patch_embed")


def _tokens_to_grid(net: nn.Module) -> Callable[[Tensor], Tensor]:
    """B,N,C tokens -> B,C,gh,gw patch map, without the class/register tokens."""
    gh, gw = (int(g) for g in net.patch_embed.grid_size)
    prefix = int(getattr(net, "num_prefix_tokens", 1))

    def to_grid(tokens: Tensor) -> Tensor:
        patches = tokens[:, prefix:, :]
        if patches.shape[1] != gh * gw:
            raise ValueError(f"{patches.shape[1]} patch tokens do not fill the {gh}x{gw} patch grid; "
                             f"feed images of the size the ViT was built for")
        return patches.reshape(tokens.shape[0], gh, gw, tokens.shape[-1]).permute(0, 3, 1, 2)

    return to_grid


def _feature_map_layer(net: nn.Module, example: Tensor) -> CamLayer:
    """The outermost module whose output is the very tensor ``forward_features`` returns."""
    names = {id(m): n for n, m in net.named_modules()}
    finished: list[tuple[nn.Module, Tensor]] = []  # outputs kept alive, so identity checks are sound
    hooks = [m.register_forward_hook(lambda m, _i, out: finished.append((m, out)))
             for m in net.modules() if m is not net]
    try:
        with torch.no_grad():
            features = net.forward_features(example)
    finally:
        for h in hooks:
            h.remove()
    if features.dim() != 4:
        raise ValueError(f"{type(net).__name__}.forward_features gives shape {tuple(features.shape)}, not a "
                         "B,C,H,W feature map; pass a CamLayer for this architecture")
    # Hooks fire innermost first, so the last match is the outermost module (e.g. `blocks`, not
    # the activation inside its last block that an in-place op shares the tensor with).
    module = next((m for m, out in reversed(finished) if out is features), None)
    if module is None:
        raise ValueError(f"no module of {type(net).__name__} outputs the tensor forward_features returns; "
                         "pass a CamLayer for this architecture")
    return CamLayer(names[id(module)], module, (int(features.shape[2]), int(features.shape[3])))


def target_layer(net: nn.Module, example: Tensor) -> CamLayer:
    """The Grad-CAM layer of a timm ViT or CNN (see the module docstring); ``example`` is one
    normalised input batch (a single image is enough) used to find a CNN's feature map."""
    if _is_vit(net):
        grid = tuple(int(g) for g in net.patch_embed.grid_size)
        return CamLayer(f"blocks.{len(net.blocks) - 1}.norm1", net.blocks[-1].norm1, grid, _tokens_to_grid(net))
    return _feature_map_layer(net, example)


def gradcam(net: nn.Module, images: Tensor, target_class: int = DEFECT, layer: CamLayer | None = None) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] at the input size, for ``target_class``'s logit.

    ``images`` are what ``net`` takes: normalised N,C,H,W. Each map is scaled to its own maximum
    (pytorch-grad-cam's convention), so maps show *where*, not how strongly; an all-zero map
    means no evidence for the class anywhere. The network is left in the train/eval mode it was
    in, with every ``.grad`` cleared (the library sets eval mode and back-propagates into the
    parameters), and frozen parameters (``requires_grad=False``) are fine.
    """
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty N,C,H,W batch, got shape {tuple(images.shape)}")
    layer = layer or target_layer(net, images[:1])
    if layer.grid == (1, 1):
        warnings.warn(f"Grad-CAM on {layer.name} has a single cell at {images.shape[-1]} px input: the maps say "
                      "nothing about where; use a larger input size", stacklevel=2)
    modes = {m: m.training for m in net.modules()}
    cam = GradCAM(net, [layer.module], reshape_transform=layer.reshape)
    # An input that asks for its gradient makes every activation need one, even in a network
    # whose parameters are frozen; otherwise the library would find no gradient to read.
    x = images.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            maps = cam(x, targets=[ClassifierOutputTarget(target_class)] * len(images))
    finally:
        # Not `with GradCAM(...)`: its __exit__ swallows IndexError and would hide a failure.
        cam.activations_and_grads.release()
        net.zero_grad(set_to_none=True)
        for m, training in modes.items():
            m.training = training
    return np.clip(maps, 0.0, 1.0)


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The map drawn over the image (uint8 H,W,3 RGB), as a jet colour map; a map of another size
    is resized to the image first."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 H,W,3, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if cam.shape != (h, w):
        cam = scale_cam_image(cam[None], (w, h))[0]
    return show_cam_on_image(image.astype(np.float32) / 255.0, np.clip(cam, 0.0, 1.0), use_rgb=True,
                             image_weight=image_weight)


def tile_overlay(image: np.ndarray, rects: list[tuple[int, int, int, int]], probs: np.ndarray, worst: int,
                 cam: np.ndarray | None = None, image_weight: float = 0.6) -> np.ndarray:
    """A tiled model's view of a whole image (uint8 H,W,3): each tile's probability of defect drawn
    over it (jet, absolute: 0 blue, 1 red; where tiles overlap, the higher score), its score written
    in its corner, and inside the worst tile (``worst``, outlined) the Grad-CAM map ``cam`` of that
    tile (any size; resized to the tile), so the image shows which tile decided and where in it."""
    from PIL import Image, ImageDraw

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 H,W,3, got {image.dtype} {image.shape}")
    if len(rects) != len(probs) or not 0 <= worst < len(rects):
        raise ValueError(f"{len(rects)} tiles, {len(probs)} scores and worst tile {worst} do not match")
    heat = np.zeros(image.shape[:2], dtype=np.float32)
    for (x0, y0, x1, y1), p in zip(rects, probs):
        heat[y0:y1, x0:x1] = np.maximum(heat[y0:y1, x0:x1], float(p))
    out = show_cam_on_image(image.astype(np.float32) / 255.0, np.clip(heat, 0.0, 1.0), use_rgb=True,
                            image_weight=image_weight)
    x0, y0, x1, y1 = rects[worst]
    if cam is not None:
        out[y0:y1, x0:x1] = overlay(np.ascontiguousarray(image[y0:y1, x0:x1]), cam)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    for (a, b, _, _), p in zip(rects, probs):
        draw.text((a + 2, b + 1), f"{float(p):.2f}", fill=(255, 255, 255))
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255), width=max(1, min(image.shape[:2]) // 200))
    return np.asarray(canvas)
