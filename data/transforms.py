"""Augmentations drawn from a seed, and each model's own view (size and mean/std) of one crop.

The data pipeline produces one float image in [0, 1] per sample, at a shared size; each model
then resizes and normalises it with its own settings (:class:`ModelView`). So when a ViT teacher
at 224 px with mean/std 0.5 teaches a MobileNet at 160 px with ImageNet mean/std, both see
exactly the same augmented crop.

Augmentations take their randomness from a ``torch.Generator`` seeded per sample and view, never
from global state: the same (image, view seed) always gives the same pixels, which is what lets
a cached teacher output be paired with the very view it was computed on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from data.config import AugmentConfig

__all__ = ["to_float", "augment", "ModelView", "model_view"]


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 CHW -> float CHW in [0, 1]."""
    return pixels.float().div_(255.0)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def augment(pixels: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Flips, a small affine and light colour jitter on a uint8 CHW image -> float [0, 1].

    No random crop: cropping could cut the defect out and leave a 'defect' label on a clean
    image. Every draw happens whatever the settings, so the stream of random numbers, and hence
    a view, does not depend on which augmentations are on.
    """
    draws = torch.rand(4, generator=gen)
    angle = _uniform(gen, -cfg.rotate, cfg.rotate)
    tx = _uniform(gen, -cfg.translate, cfg.translate)
    ty = _uniform(gen, -cfg.translate, cfg.translate)
    scale = _uniform(gen, cfg.scale[0], cfg.scale[1])
    bright = _uniform(gen, 1 - cfg.brightness, 1 + cfg.brightness)
    contrast = _uniform(gen, 1 - cfg.contrast, 1 + cfg.contrast)
    sat = _uniform(gen, 1 - cfg.saturation, 1 + cfg.saturation)

    x = pixels
    if draws[0] < cfg.hflip:
        x = TF.horizontal_flip(x)
    if draws[1] < cfg.vflip:
        x = TF.vertical_flip(x)
    if cfg.rotate or cfg.translate or cfg.scale != (1.0, 1.0):
        h, w = x.shape[-2:]
        fill = [float(v) for v in x.float().mean(dim=(1, 2))]  # corners take the part's colour, not black
        x = TF.affine(x, angle=angle, translate=[round(tx * w), round(ty * h)], scale=scale, shear=[0.0, 0.0],
                      interpolation=InterpolationMode.BILINEAR, fill=fill)
    x = to_float(x)
    if cfg.brightness:
        x = TF.adjust_brightness(x, bright)
    if cfg.contrast:
        x = TF.adjust_contrast(x, contrast)
    if cfg.saturation:
        x = TF.adjust_saturation(x, sat)
    return x.clamp_(0.0, 1.0)


class ModelView(nn.Module):
    """Resize a [0, 1] batch to the model's input size and normalise it with the model's mean/std."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def model_view(model: nn.Module, img_size: int | None = None) -> ModelView:
    """The view a timm model expects, from its own data config (mean/std), at ``img_size``.

    The size comes from ``img_size`` when given: a ViT built at 96 px still reports 224 in its
    pretrained data config.
    """
    from timm.data import resolve_model_data_config

    data_cfg = resolve_model_data_config(model)
    size = img_size or int(data_cfg["input_size"][-1])
    return ModelView(size, data_cfg["mean"], data_cfg["std"])
