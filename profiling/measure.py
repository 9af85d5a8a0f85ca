"""Measure what each model of a run costs, the same way for every model, into ``profile.json``.

For every model: parameters, MACs per image (fvcore, with attention counted), median and p90
latency per runtime x batch at an explicit thread count, peak inference memory, file sizes, and
the limit beside it all: this machine's fp32 matmul GFLOP/s and each model's ideal time
``2 x macs x batch / peak``, so the report shows how far every runtime is from what the hardware
could do.

MACs and BatchNorm: fvcore counts a BatchNorm as one MAC per element. On export every BatchNorm
folds into the convolution before it (MEASURED.md; ONNX Runtime matches PyTorch within 1e-6), so
the deployed model never computes them. ``macs`` here therefore *excludes* BatchNorm;
``macs_fvcore`` (fvcore's total) and ``macs_batchnorm`` are kept beside it so nothing is hidden.
LayerNorm does not fold and stays counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.files import atomic_write_text
from profiling.config import ConstraintsConfig, ProfileConfig
from profiling.cost import count_macs, count_params, file_size_mb
from profiling.latency import (
    RUNTIMES,
    CudaRunner,
    EagerRunner,
    OnnxRunner,
    ideal_ms,
    matmul_peak_gflops,
    peak_memory_mb,
    profile_latency,
)
from profiling.machine import machine_info, usable_cores
from profiling.runfiles import json_ready

__all__ = ["MACS_NOTE", "PROFILE_FILE", "ModelEntry", "latency_key", "measure", "profile_model"]

PROFILE_FILE = "profile.json"
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
        allow_busy=allow_busy, max_other_load=max_other_load,
    )
    out["latency"] = {latency_key(s.runtime, s.batch): asdict(s) for s in stats}
    if peak_memory:
        out["peak_memory_mb"] = _peak_memory(entry, runtimes, batch_sizes, threads)
    if peak_gflops and out.get("macs"):
        out["ideal_ms"] = {f"b{b}": ideal_ms(out["macs"], b, peak_gflops) for b in batch_sizes}
    return out


def _plan(profile_cfg: ProfileConfig, constraints_cfg: ConstraintsConfig) -> tuple[list[str], list[int], int]:
    """Runtimes, batch sizes and threads to measure: the profile's, plus what the constraint reads."""
    runtimes = list(dict.fromkeys([*profile_cfg.runtimes, constraints_cfg.runtime]))
    if constraints_cfg.runtime == "onnx":
        runtimes = list(dict.fromkeys([*runtimes, "onnx_int8"]))  # an int8 model meets `onnx` through its own file
    batches = sorted({*profile_cfg.batch_sizes, constraints_cfg.batch})
    return runtimes, batches, profile_cfg.threads or usable_cores()


def measure(
    run_dir: str | Path,
    models: dict[str, ModelEntry],
    profile_cfg: ProfileConfig,
    constraints_cfg: ConstraintsConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Profile every model of a run the same way and write ``run_dir/profile.json``; returns its content.

    ``models`` maps the run's model names (``teacher``, ``student``, ``student_baseline``,
    ``student_pruned``) to what to measure; give the deployed model's int8 file as
    ``onnx_int8`` of its fp32 entry. The constraint's runtime and batch are always measured.
    Threads are ``profile.threads`` or every core this process may use, set explicitly.
    """
    runtimes, batches, threads = _plan(profile_cfg, constraints_cfg)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; valid: {sorted(RUNTIMES)}")
    log(f"[report] measuring the fp32 matmul limit with {threads} thread(s)")
    peak = matmul_peak_gflops(threads)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"runtimes": runtimes, "batch_sizes": batches, "threads": threads, "warmup": profile_cfg.warmup,
                     "runs": profile_cfg.runs, "allow_busy": profile_cfg.allow_busy,
                     "max_other_load": profile_cfg.max_other_load},
        "limit": {"matmul_peak_gflops": peak, "threads": threads, "dtype": "fp32",
                  "what": "best of 10 1024x1024 matmuls (2 n^3 FLOPs each); ideal_ms = 2 x macs x batch / peak"},
        "macs_note": MACS_NOTE,
        "models": {},
    }
    for name, entry in models.items():
        log(f"[report] profiling {name}: {', '.join(runtimes)} at batch {batches}, {threads} thread(s)")
        result["models"][name] = profile_model(
            entry, runtimes=runtimes, batch_sizes=batches, threads=threads, warmup=profile_cfg.warmup,
            runs=profile_cfg.runs, allow_busy=profile_cfg.allow_busy, max_other_load=profile_cfg.max_other_load,
            peak_memory=profile_cfg.peak_memory, peak_gflops=peak,
        )
    result = json_ready(result)
    atomic_write_text(Path(run_dir) / PROFILE_FILE, json.dumps(result, indent=2))
    return result
