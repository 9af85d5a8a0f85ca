"""A pruned network's structure as data, and how to rebuild it on a fresh timm model.

Torch-Pruning removes channels in place; the pruned network's ``state_dict`` then no longer fits
its timm class. The pruning is saved as JSON-able data instead (torch-pruning's pruning history:
root layer name, out/in-channel flag and the removed channel indices, round after round, plus the
changed tensor shapes), and :func:`rebuild_pruned` replays it on a freshly created model of the
same arch, so the safetensors weights load strictly. Nothing is pickled (``torch.save(model)``
and ``tp.state_dict`` would need ``weights_only=False``).

Finding *which* channels to remove is the student's business (``student/prune.py``); rebuilding a
saved structure is everybody's (the runner, the report, ``predict``), so it lives here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from core.errors import UserError
from training.modeling import eval_mode

__all__ = ["FORMAT", "arch_of", "feature_dim", "on_device", "rebuild_pruned", "replay", "shapes", "sync_widths",
           "traced"]

FORMAT = "torch-pruning-history/1"


@contextlib.contextmanager
def traced(net: nn.Module) -> Iterator[None]:
    """Eval mode (tracing must not update BatchNorm statistics) with autograd on (torch-pruning
    traces the graph through ``grad_fn``)."""
    with eval_mode(net), torch.enable_grad():
        yield


def on_device(net: nn.Module, example: Tensor) -> Tensor:
    param = next(net.parameters(), None)
    return example if param is None else example.to(param.device)



@torch.no_grad()
def feature_dim(net: nn.Module, example: Tensor, *, pre_logits: bool = False) -> int:
    """Channels of a real ``forward_features`` call (or, with ``pre_logits``, the width the
    classifier takes, from ``forward_head(pre_logits=True)``): ``num_features`` is stale after
    pruning. CNN maps (B, C, H, W) give C, token sequences (B, N, C) and vectors give the last dim."""
    with eval_mode(net):
        out = net.forward_features(on_device(net, example))
        if pre_logits:
            out = net.forward_head(out, pre_logits=True)
    return int(out.shape[1] if out.dim() == 4 else out.shape[-1])


def sync_widths(net: nn.Module, example: Tensor) -> None:
    """Make timm's width attributes true again, so ``reset_classifier`` builds a fitting head."""
    if hasattr(net, "num_features"):
        net.num_features = feature_dim(net, example)
    if hasattr(net, "head_hidden_size"):
        net.head_hidden_size = feature_dim(net, example, pre_logits=True)



def replay(net: nn.Module, example: Tensor, history: list[list[Any]]) -> None:
    """Prune ``net`` exactly as ``history`` says (the same channels, in the same order)."""
    with traced(net):
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=on_device(net, example))
        graph.load_pruning_history(history)



def arch_of(net: nn.Module) -> str | None:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def shapes(net: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in net.state_dict().items()}



def rebuild_pruned(net_fresh: nn.Module, example: Tensor, structure: dict[str, Any]) -> nn.Module:
    """Apply a saved :meth:`StudentPruner.structure` to a freshly created timm model of the same
    arch, in place, so that the pruned model's ``state_dict`` then loads strictly."""
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        found = structure.get("format") if isinstance(structure, dict) else type(structure).__name__
        raise UserError(f"pruning structure: expected format '{FORMAT}', found {found!r}; "
                        "rerun the prune stage with --force")
    arch, saved_arch = arch_of(net_fresh), structure.get("arch")
    if arch and saved_arch and arch != saved_arch:
        raise UserError(f"pruning structure is for '{saved_arch}' but the model is '{arch}'")
    before = shapes(net_fresh)
    try:
        replay(net_fresh, example, structure["history"])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"pruning structure does not fit this '{arch}' model ({type(exc).__name__}: {exc}); "
                        "was it saved for another architecture or model_kwargs?") from None
    changed = {k: v for k, v in shapes(net_fresh).items() if v != before.get(k)}
    saved = structure.get("shapes", {})
    if changed != saved:
        name = min(k for k in changed.keys() | saved.keys() if changed.get(k) != saved.get(k))
        raise UserError(f"pruning structure replays to other shapes than were saved (first: '{name}' "
                        f"{changed.get(name)} vs saved {saved.get(name)}); rerun the prune stage with --force")
    sync_widths(net_fresh, example)
    return net_fresh
