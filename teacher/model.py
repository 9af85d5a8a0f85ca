"""The teacher: a timm vision transformer by default (any timm model works), from hub weights, a
local file, or from scratch; and its fine-tuning optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from data.transforms import model_view
from teacher.config import TeacherConfig
from training.modeling import Classifier
from training.networks import teacher_network

__all__ = ["build_teacher", "teacher_optimizer"]


def build_teacher(cfg: TeacherConfig) -> Classifier:
    """A two-class timm model with its own view (size, mean/std from its data config).

    With ``teacher.img_size`` different from the pretrained size, timm resamples the position
    embedding of the loaded weights. The head is always new (two classes).
    """
    net = teacher_network(cfg.arch, conv_stem=cfg.conv_stem, pretrained=cfg.pretrained, weights=cfg.weights,
                          img_size=cfg.img_size, drop_path=cfg.drop_path, model_kwargs=cfg.model_kwargs)
    size = cfg.img_size or _native_size(net)
    return Classifier(net, model_view(net, size), cfg.arch, cfg.model_kwargs)


def _native_size(net: nn.Module) -> int:
    patch_embed = getattr(net, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        return int(patch_embed.img_size[0])
    return int(net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def teacher_optimizer(cfg: TeacherConfig) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """AdamW for fine-tuning; with pretrained weights, layer-wise lr decay (deeper blocks learn faster).

    Layer decay only makes sense when the lower layers hold pretrained features worth keeping;
    from scratch every layer starts equally ignorant, so it is off.
    """
    use_decay = cfg.layer_decay is not None and (cfg.pretrained or cfg.weights is not None)

    def make(model: nn.Module) -> torch.optim.Optimizer:
        net = model.net if isinstance(model, Classifier) else model
        return create_optimizer_v2(net, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   layer_decay=cfg.layer_decay if use_decay else None)

    return make
