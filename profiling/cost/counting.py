"""What a model costs to store and to run once: parameters, multiply-accumulates, bytes on disk.

MACs are counted with fvcore's ``FlopCountAnalysis``, which traces the model and counts one fused
multiply-add as one (so what it calls "flops" is MACs here; ``flops = 2 * macs``). fvcore has no
handler for ``aten::scaled_dot_product_attention``, so a ViT with fused attention loses its
QKᵀ and AV products (~14% of ``vit_tiny_patch16_224`` at 224 px); :data:`MAC_HANDLES` adds it.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():
    # importing fvcore.nn scripts its focal loss, and torch.jit.script is deprecated
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import Handle, get_shape

__all__ = ["MAC_HANDLES", "MacCount", "count_macs", "count_params", "file_size_mb", "sdpa_macs"]


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one forward pass on the given inputs (whole batch)."""

    macs: int
    by_operator: dict[str, int]  # fvcore's short op name ("conv", "linear", ...) -> MACs
    # traced op fvcore has no handler for ("aten::add", "aten::gelu", ...) -> number of calls; not
    # listed: the ops fvcore ignores on purpose (reshapes, copies, relu, clamp, max)
    skipped: dict[str, int]

    @property
    def flops(self) -> int:
        """Floating-point operations, counting a multiply-add as two."""
        return 2 * self.macs

    @property
    def macs_bn_folded(self) -> int:
        """MACs of the deployed model: BatchNorm folds into the convolution before it on export, so
        fvcore's count for it is left out. The report's ``macs`` and the prune target both use this."""
        return self.macs - self.by_operator.get("batch_norm", 0)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of ``aten::scaled_dot_product_attention``: the products QKᵀ and AV.

    With query ``(..., L, D)``, key ``(..., S, D)`` and value ``(..., S, Dv)`` that is
    ``prod(...) * L * S * (D + Dv)`` (= 2·B·H·L·S·D when Dv = D). The leading dims are the
    query's, so grouped-query attention (fewer key/value heads) is counted per query head, as the
    kernel computes it. Scaling, masking and softmax are elementwise and not counted, as fvcore
    does not count them in unfused attention either.
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    if q is None or k is None or v is None:
        raise ValueError("scaled_dot_product_attention traced without complete shapes for query, key and value")
    *lead, length, dim = q
    source, value_dim = v[-2], v[-1]
    if k[-1] != dim or k[-2] != source:
        raise ValueError(f"scaled_dot_product_attention: key {k} does not fit query {q} and value {v}")
    return math.prod(lead) * length * source * (dim + value_dim)


# fvcore's defaults plus these; a plain dict so the additions are visible in one place.
MAC_HANDLES: dict[str, Handle] = {
    "aten::scaled_dot_product_attention": sdpa_macs,
}


def count_macs(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> MacCount:
    """Trace ``model(inputs)`` in eval mode without grad and count MACs (the model's mode is restored).

    fvcore's defaults also count BatchNorm and LayerNorm (BatchNorm folds into the convolution on
    export), and skip activations, adds, multiplies and softmax: those are listed in ``skipped``.
    """
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**MAC_HANDLES)
    # fvcore logs skipped ops and uncalled modules itself; we return them instead of printing them.
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    was_training = model.training
    fvcore_logger = logging.getLogger("fvcore.nn.jit_analysis")
    previous_level = fvcore_logger.level
    fvcore_logger.setLevel(logging.ERROR)
    try:
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit tracing's deprecation and tracer warnings
            total = analysis.total()
            by_operator = dict(analysis.by_operator())
            skipped = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
        fvcore_logger.setLevel(previous_level)
    return MacCount(macs=int(total), by_operator={k: int(v) for k, v in by_operator.items()}, skipped=skipped)


def file_size_mb(path: str | os.PathLike[str]) -> float:
    """Size of a file on disk in megabytes (10⁶ bytes), e.g. an exported ONNX model."""
    return Path(path).stat().st_size / 1e6
