"""What one model costs, measured the same way for every model.

Per model: parameters, MACs per image (fvcore, with attention counted), median and p90
latency per runtime x batch at an explicit thread count, peak inference memory, file sizes, and
the limit beside it all: this machine's fp32 matmul GFLOP/s and each model's ideal time
``2 x macs x batch / peak``, so the report shows how far every runtime is from what the hardware
could do.

MACs and BatchNorm: fvcore counts a BatchNorm as one MAC per element. On export every BatchNorm
folds into the convolution before it (ONNX Runtime then matches PyTorch within 1e-6), so
the deployed model never computes them. ``macs`` here therefore *excludes* BatchNorm;
``macs_fvcore`` (fvcore's total) and ``macs_batchnorm`` are kept beside it so nothing is hidden.
LayerNorm does not fold and stays counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from profiling.cost.counting import count_macs, count_params, file_size_mb
from profiling.cost.latency import CudaRunner, EagerRunner, OnnxRunner, OpenVinoRunner, ideal_ms, profile_latency
from profiling.cost.memory import peak_memory_mb

__all__ = ["MACS_NOTE", "ModelEntry", "latency_key", "profile_model"]

MACS_NOTE = ("multiply-accumulates per image counted by fvcore (a fused multiply-add is one MAC; flops = 2 x macs), "
             "attention (scaled_dot_product_attention) included, BatchNorm excluded because it folds into the "
             "convolution on export (macs_batchnorm lists what fvcore counted for it)")


@dataclass(frozen=True)
class ModelEntry:
    """One model to profile.

    ``net`` takes normalised NCHW images at ``img_size`` (a timm network, not the wrapper that
    normalises); None when only ONNX files are at hand. ``onnx`` / ``onnx_int8`` are its exported
    files and ``weights`` its safetensors file (for the size on disk), where they exist.
    """

    net: nn.Module | None
    img_size: int
    onnx: Path | None = None
    onnx_int8: Path | None = None
    weights: Path | None = None


def latency_key(runtime: str, batch: int) -> str:
    """How a latency figure is named in profile.json and report.json: ``onnx_b1``."""
    return f"{runtime}_b{batch}"


def _macs(net: nn.Module, img_size: int) -> dict[str, Any]:
    param = next(net.parameters(), None)  # the image goes where the network is (a run may leave it on the GPU)
    counted = count_macs(net, torch.zeros(1, 3, img_size, img_size, device=param.device if param is not None else None))
    batchnorm = counted.by_operator.get("batch_norm", 0)
    return {
        "macs": counted.macs_bn_folded,
        "macs_fvcore": counted.macs,
        "macs_batchnorm": batchnorm,
        "macs_by_operator": counted.by_operator,
        "macs_skipped_ops": counted.skipped,
    }


def _sizes(entry: ModelEntry) -> dict[str, float]:
    files = {"safetensors": entry.weights, "onnx": entry.onnx, "onnx_int8": entry.onnx_int8}
    return {kind: round(file_size_mb(path), 4) for kind, path in files.items() if path is not None and path.is_file()}


def _memory_runners(entry: ModelEntry, runtimes: Sequence[str], batch: int, threads: int) -> dict[str, tuple[Any, str]]:
    """Picklable runners (and their device) for the runtimes whose peak memory can be measured here."""
    x = torch.randn(batch, 3, entry.img_size, entry.img_size, generator=torch.Generator().manual_seed(0))
    runners: dict[str, tuple[Any, str]] = {}
    if "eager" in runtimes and entry.net is not None:
        runners["eager"] = (EagerRunner(entry.net, x), "cpu")
    if "onnx" in runtimes and entry.onnx is not None:
        runners["onnx"] = (OnnxRunner(entry.onnx, x, threads), "cpu")
    if "onnx_int8" in runtimes and entry.onnx_int8 is not None:
        runners["onnx_int8"] = (OnnxRunner(entry.onnx_int8, x, threads), "cpu")
    if "openvino" in runtimes and entry.onnx is not None:
        runners["openvino"] = (OpenVinoRunner(entry.onnx, x, threads), "cpu")
    if "cuda_fp16" in runtimes and entry.net is not None and torch.cuda.is_available():
        runners["cuda_fp16"] = (CudaRunner(entry.net, x, torch.float16), "cuda")
    return runners


def _peak_memory(entry: ModelEntry, runtimes: Sequence[str], batches: Sequence[int], threads: int) -> dict[str, Any]:
    """MB one inference needs beyond the weights, per runtime and batch; failures are listed, not hidden."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    try:
        for batch in batches:
            for runtime, (runner, device) in _memory_runners(entry, runtimes, batch, threads).items():
                key = latency_key(runtime, batch)
                try:
                    out[key] = round(peak_memory_mb(runner, device=device), 3)
                except (RuntimeError, TypeError) as exc:
                    out.setdefault("skipped", {})[key] = str(exc)
    finally:
        torch.set_num_threads(previous)
    return out


def profile_model(
    entry: ModelEntry,
    *,
    runtimes: Sequence[str],
    batch_sizes: Sequence[int],
    threads: int,
    warmup: int = 10,
    runs: int = 30,
    allow_busy: bool = False,
    max_other_load: float = 0.25,
    strict: bool = False,
    peak_memory: bool = True,
    peak_gflops: float | None = None,
) -> dict[str, Any]:
    """Every cost figure of one model as a JSON-ready dict (see the module docstring for ``macs``).

    Params and MACs need ``entry.net`` (None for an ONNX file alone). ``latency`` holds one
    record per runtime x batch, with ``skipped`` saying why a figure is missing; ``ideal_ms`` is
    ``2 x macs x batch / peak_gflops`` per batch when both are known.
    """
    if entry.net is None and entry.onnx is None:
        raise ValueError("a ModelEntry needs a network or an fp32 ONNX file to profile")
    out: dict[str, Any] = {"img_size": entry.img_size, "threads": threads}
    if entry.net is not None:
        out["params"] = count_params(entry.net)
        out.update(_macs(entry.net, entry.img_size))
    else:
        out.update(params=None, macs=None, macs_note="not counted: only an ONNX file was given")
    out["size_mb"] = _sizes(entry)
    stats = profile_latency(
        entry.net if entry.net is not None else entry.onnx, entry.img_size, runtimes, batch_sizes, threads,
        warmup, runs, onnx_path=entry.onnx if entry.net is not None else None, onnx_int8_path=entry.onnx_int8,
        allow_busy=allow_busy, max_other_load=max_other_load, strict=strict,
    )
    out["latency"] = {latency_key(s.runtime, s.batch): asdict(s) for s in stats}
    if peak_memory:
        out["peak_memory_mb"] = _peak_memory(entry, runtimes, batch_sizes, threads)
    if peak_gflops and out.get("macs"):
        out["ideal_ms"] = {f"b{b}": ideal_ms(out["macs"], b, peak_gflops) for b in batch_sizes}
    return out
