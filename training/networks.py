"""timm networks as the pipeline builds them: by name, with a fresh two-class head, from the hub,
a local weights file, or from scratch; and the ViT's optional convolutional stem.

Every model of a run (teacher, students, the one a report or ``predict`` reloads) is made here,
so a stage directory's ``meta.json`` (arch, ``model_kwargs``, ``conv_stem``, input size) is enough
to build the same network again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.layers import PatchEmbed
from torch import nn

from core.errors import UserError
from training.pretrained import full_load_check, is_shortcut, load_error_summary, shortcut_file, timm_overlay

__all__ = ["ConvStemEmbed", "check_arch", "create_network", "teacher_network"]


_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def check_arch(arch: str, key: str) -> None:
    """An unknown timm architecture is an error with the closest names timm knows."""
    import difflib

    import timm

    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models() for the names"
    raise UserError(f"unknown timm architecture '{arch}' ({key}){hint}")


def _read_weights(path: Path, section: str) -> dict[str, torch.Tensor]:
    """A local weights file as a state dict, never unpickling code: safetensors, or
    ``torch.load(weights_only=True)`` (whatever timm version is installed)."""
    if path.suffix.lower() == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for damage
        raise UserError(f"{section}.weights: '{path}' cannot be loaded safely ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); save it as .safetensors") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # common training-script wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{section}.weights: '{path}' holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def create_network(arch: str, *, pretrained: bool = False, weights: str | None = None, img_size: int | None = None,
                   drop_path: float = 0.0, model_kwargs: dict[str, Any] | None = None, key: str = "arch",
                   num_classes: int = 2) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head, from the hub, a local file, or from scratch.

    A local file goes through timm's pretrained-config overlay, so the head is dropped and a ViT's
    position embedding resampled exactly as for hub weights. ``img_size`` is passed to timm only
    to models that take it (ViTs and other transformers); CNNs run at any size.

    The fresh head starts small (truncated normal, std 0.01, zero bias). timm's EfficientNet and
    MobileNet initialise a linear layer uniformly in +-1/sqrt(outputs): meant for 1,000 classes, with
    two it gives weights of std 0.41 and logits of +-10 on pretrained features, so the first
    fine-tuning steps spend themselves undoing the head (measured: a pretrained EfficientNet-Lite0
    fine-tuned on 120 labels reached validation AUROC 0.85 with that head).
    """
    net = _create(arch, pretrained=pretrained, weights=weights, img_size=img_size, drop_path=drop_path,
                  model_kwargs=model_kwargs, key=key, num_classes=num_classes)
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    loaded_head = (pretrained or weights) and num_classes == (getattr(net, "pretrained_cfg", None) or {}).get("num_classes")
    if isinstance(head, nn.Linear) and not loaded_head:
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=0.01)
            if head.bias is not None:
                head.bias.zero_()
    return net


def _create(arch: str, *, pretrained: bool, weights: str | None, img_size: int | None, drop_path: float,
            model_kwargs: dict[str, Any] | None, key: str, num_classes: int) -> nn.Module:
    import timm

    section = key.rsplit(".", 1)[0]
    check_arch(arch, key)
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if weights:
        path = (shortcut_file(weights, arch, f"{section}.weights") if is_shortcut(weights)
                else Path(weights).expanduser())
        if not path.is_file():
            raise UserError(f"{section}.weights: file '{path}' does not exist")
        if path.suffix.lower() not in _WEIGHT_SUFFIXES:
            raise UserError(f"{section}.weights: '{path.name}' is not a weights file ({', '.join(_WEIGHT_SUFFIXES)})")
        if path.suffix.lower() == ".npz":  # big_vision's format: timm's ViT reads it with numpy (no pickle)
            kwargs["pretrained_cfg_overlay"] = {"file": str(path), "custom_load": True}
        else:  # a state dict, adapted by timm (head dropped, position embedding resampled) as hub weights are
            # (a file in EfficientNet-PyTorch's layout is first renamed onto timm's: training/pretrained.py)
            kwargs["pretrained_cfg_overlay"] = timm_overlay(arch, _read_weights(path, section), path,
                                                            f"{section}.weights", kwargs)
        pretrained = True
    with full_load_check(arch, f"{section}.weights: '{path}'" if weights else None):
        try:
            if img_size is not None and "img_size" not in kwargs:
                try:
                    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, img_size=img_size,
                                             **kwargs)
                except TypeError as exc:
                    if "img_size" not in str(exc):
                        raise
                    # A CNN: it takes no img_size and runs at any input size.
            return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)
        except TypeError as exc:
            raise UserError(f"{section}.model_kwargs do not fit '{arch}': {exc}") from None
        except Exception as exc:
            if weights:
                raise UserError(f"{section}.weights: cannot load '{weights}' into '{arch}' (weights of another "
                                f"architecture?): {load_error_summary(exc)}") from None
            if pretrained:
                raise UserError(
                    f"cannot fetch the pretrained weights of '{arch}' from the hub ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Offline? Either give a local file "
                    f"with {section}.weights=PATH (.safetensors/.pth/.bin/.npz), or train from scratch with "
                    f"{section}.pretrained=false"
                ) from None
            raise


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
                            "set teacher.conv_stem=false") from None
        raise
