"""The teacher: any timm model (a ViT in the recipes), from hub weights, a local file, or from scratch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.optim import create_optimizer_v2
from torch import nn

from data.errors import UserError
from data.transforms import model_view
from teacher.config import TeacherConfig
from training.modeling import Classifier, create_network

__all__ = ["ConvStemEmbed", "teacher_network", "build_teacher", "teacher_optimizer"]


class ConvStemEmbed(PatchEmbed):
    """timm's patch embedding with the single patchify convolution replaced by a convolutional
    stem: log2(patch) stride-2 3x3 convolutions with BatchNorm and ReLU, widths doubling up to the
    embedding width, then a 1x1 projection (Xiao et al. 2021, https://arxiv.org/abs/2106.14881).

    Same grid, same token shape, so everything downstream of the stem is a plain ViT.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        patch, dim, chans = self.patch_size[0], self.proj.out_channels, self.proj.in_channels
        if patch != self.patch_size[1] or patch & (patch - 1) or patch < 2:
            raise ValueError(f"teacher.conv_stem needs a square power-of-two patch size, got {self.patch_size}")
        n = patch.bit_length() - 1
        layers: list[nn.Module] = []
        for i in range(n):
            width = max(16, dim // 2 ** (n - 1 - i))
            layers += [nn.Conv2d(chans, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            chans = width
        layers.append(nn.Conv2d(chans, dim, 1))
        self.proj = nn.Sequential(*layers)


def teacher_network(arch: str, *, conv_stem: bool = False, **kwargs: Any) -> nn.Module:
    """The teacher's timm network; with ``conv_stem`` its patch embedding is a :class:`ConvStemEmbed`."""
    model_kwargs = dict(kwargs.pop("model_kwargs", None) or {})
    if conv_stem:
        model_kwargs["embed_layer"] = ConvStemEmbed
    try:
        return create_network(arch, model_kwargs=model_kwargs, key="teacher.arch", **kwargs)
    except UserError as exc:
        if conv_stem and "embed_layer" in str(exc):  # a CNN (or another model without a patch embedding)
            raise UserError(f"teacher.conv_stem replaces a ViT's patch embedding, and '{arch}' has none; "
                            f"set teacher.conv_stem=false") from None
        raise


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
