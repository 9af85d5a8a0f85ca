"""A classifier as the pipeline sees it: its own input view plus a timm network; saved safely.

:class:`Classifier` takes float images in [0, 1] at any size, resizes and normalises them as its
network expects (:class:`data.transforms.ModelView`), and returns logits. Teacher and student
are both Classifiers, so one batch can feed both.

A finished model is ``model.safetensors`` (the network's weights) plus ``meta.json`` (arch,
classes, input size, mean/std, decision threshold, metrics, and for a pruned student its channel
structure). :func:`load_model` is the one way to rebuild a finished model directory, used by the
runner, the report, ``profiling.profile`` and ``predict``; it never unpickles anything.
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

from core.errors import UserError
from core.files import atomic_write, atomic_write_text
from core.rundir import META, WEIGHTS, read_json
from data import CLASS_NAMES
from data.transforms import ModelView

__all__ = ["eval_mode", "Classifier", "save_artifact", "load_meta", "load_weights", "load_model"]


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
    atomic_write(stage_dir / WEIGHTS, lambda p: save_file(state, str(p)))
    full = {**model.describe(), **meta}
    atomic_write_text(stage_dir / META, json.dumps(full, indent=2, default=float))


def load_meta(stage_dir: Path) -> dict[str, Any]:
    path = stage_dir / META
    if not path.is_file():
        raise UserError(f"no finished model in '{stage_dir}' ({META} is missing); run its stage first")
    return read_json(path)


def load_weights(net: nn.Module, stage_dir: Path) -> nn.Module:
    """Load ``model.safetensors`` into a network of the right shape (strict)."""
    path = stage_dir / WEIGHTS
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


def load_model(stage_dir: Path) -> Classifier:
    """A finished model directory rebuilt from ``meta.json`` and ``model.safetensors``, no pickle:
    the timm network (with the ViT's convolutional stem when it had one), its pruning replayed when
    it was pruned, then the weights loaded strictly."""
    from training.networks import create_network, teacher_network

    stage_dir = Path(stage_dir)
    meta = load_meta(stage_dir)
    try:
        arch, size = meta["arch"], int(meta["img_size"])
        view = ModelView(size, meta["mean"], meta["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{stage_dir / META} lacks {exc} (arch, img_size, mean, std); it was not written by this "
                        "project's pipeline, or is damaged: rerun its stage with --force") from None
    kwargs = meta.get("model_kwargs")
    if meta.get("conv_stem"):
        net = teacher_network(arch, conv_stem=True, img_size=size, model_kwargs=kwargs)
    else:
        net = create_network(arch, img_size=size, model_kwargs=kwargs)
    if meta.get("pruning"):
        from training.pruned import rebuild_pruned

        net = rebuild_pruned(net, torch.zeros(1, 3, size, size), meta["pruning"])
    load_weights(net, stage_dir)
    return Classifier(net, view, arch, kwargs).eval()
