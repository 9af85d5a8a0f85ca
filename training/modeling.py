"""A classifier as the pipeline sees it: its own input view plus a timm network; saved safely.

:class:`Classifier` takes float images in [0, 1] at any size, resizes and normalises them as its
network expects (:class:`data.transforms.ModelView`), and returns logits. Teacher and student
are both Classifiers, so one batch can feed both.

A finished model is ``model.safetensors`` (the network's weights) plus ``meta.json`` (arch,
classes, input size, mean/std, decision threshold, metrics, config hash, and for a pruned
student its channel structure). Loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data import CLASS_NAMES
from data.errors import UserError
from data.files import atomic_write, atomic_write_text
from data.transforms import ModelView
from training.pretrained import full_load_check, is_shortcut, load_error_summary, shortcut_file, timm_overlay

__all__ = ["eval_mode", "Classifier", "save_artifact", "load_meta", "load_weights", "is_finished", "ARTIFACT", "META"]

ARTIFACT, META = "model.safetensors", "meta.json"


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[None]:
    """Eval mode for a while; each module's own train/eval flag (a frozen BatchNorm, say) is restored."""
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


class Classifier(nn.Module):
    """``view`` (resize + normalise) followed by ``net`` (a timm model)."""

    def __init__(self, net: nn.Module, view: ModelView, arch: str, model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net
        self.view = view
        self.arch = arch
        self.model_kwargs = dict(model_kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.view(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The network's last feature map (CNN: B,C,H,W) or tokens (ViT: B,N,C), for hint losses."""
        return self.net.forward_features(self.view(x))

    @property
    def img_size(self) -> int:
        return self.view.size

    def describe(self) -> dict[str, Any]:
        """What meta.json records about the architecture and its input."""
        return {
            "arch": self.arch,
            "model_kwargs": self.model_kwargs,
            "num_classes": 2,
            "class_names": list(CLASS_NAMES),
            "img_size": self.view.size,
            "mean": self.view.mean.flatten().tolist(),
            "std": self.view.std.flatten().tolist(),
        }


def save_artifact(stage_dir: Path, model: Classifier, meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` then ``meta.json`` (whose presence marks the stage finished)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.net.state_dict().items()}
    atomic_write(stage_dir / ARTIFACT, lambda p: save_file(state, str(p)))
    full = {**model.describe(), **meta}
    atomic_write_text(stage_dir / META, json.dumps(full, indent=2, default=float))


def is_finished(stage_dir: Path) -> bool:
    return (stage_dir / META).is_file() and (stage_dir / ARTIFACT).is_file()


def load_meta(stage_dir: Path) -> dict[str, Any]:
    path = stage_dir / META
    if not path.is_file():
        raise UserError(f"no finished model in '{stage_dir}' ({META} is missing); run its stage first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); rerun the stage with --force") from None


def load_weights(net: nn.Module, stage_dir: Path) -> nn.Module:
    """Load ``model.safetensors`` into a network of the right shape (strict)."""
    path = stage_dir / ARTIFACT
    if not path.is_file():
        raise UserError(f"'{path}' is missing; run the stage that makes it first")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UserError(f"'{path}' cannot be read as safetensors ({exc}); rerun the stage with --force") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"'{path}' does not fit the architecture in its meta.json: {first}") from None
    return net


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
    """
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

