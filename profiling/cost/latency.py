"""Latency per runtime, batch size and thread count, and the limits to read it against.

Every figure carries its runtime, batch, threads and device, and comes from warm-up calls followed
by timed runs (median, p90 and spread, not a single call). Timing on a CPU that other processes are
using is worse than no figure (measured here: contention skewed timings 0.6-12x), so the load from
other processes is read before and during each measurement and a busy machine gives a warning and
no figure, unless ``allow_busy=True`` (the load reading and machine info live in
:mod:`profiling.cost.machine`).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploy.runtime import onnx_session
from profiling.cost.machine import (
    cpu_model,
    cpu_times,
    other_cpu_load,
    other_load,
    usable_cores,
)

__all__ = [
    "RUNTIMES",
    "BusyCpuWarning",
    "CudaRunner",
    "EagerRunner",
    "LatencyStats",
    "OnnxRunner",
    "Runtime",
    "RuntimeUnavailable",
    "ideal_ms",
    "matmul_peak_gflops",
    "measure",
    "measure_cuda",
    "profile_latency",
    "summarize",
]


class BusyCpuWarning(RuntimeWarning):
    """Other processes loaded the CPU, so a latency figure was withheld."""


class RuntimeUnavailable(Exception):
    """A runtime that does not apply here (no int8 file, no CUDA); the message says why."""


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per call of one batch; the figures are None when ``skipped`` says why."""

    runtime: str
    batch: int
    threads: int
    device: str  # "cpu (<model>)" or "cuda (<GPU name>)"
    median_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    runs: int = 0
    images_per_s: float | None = None  # batch / median
    other_cpu_load: float | None = None  # cores other processes kept busy while timing; None: not read
    skipped: str | None = None


def summarize(
    times_ms: Sequence[float],
    *,
    runtime: str,
    batch: int,
    threads: int,
    device: str,
    other_cpu_load: float | None = None,
) -> LatencyStats:
    """Median, p90 and spread of timed runs; images/s from the median, which one slow run cannot move."""
    t = np.asarray(times_ms, dtype=float)
    median = float(np.median(t))
    return LatencyStats(
        runtime=runtime,
        batch=batch,
        threads=threads,
        device=device,
        median_ms=median,
        p90_ms=float(np.percentile(t, 90)),
        mean_ms=float(t.mean()),
        std_ms=float(t.std(ddof=1)) if t.size > 1 else 0.0,
        min_ms=float(t.min()),
        max_ms=float(t.max()),
        runs=int(t.size),
        images_per_s=batch / (median / 1e3),
        other_cpu_load=other_cpu_load,
    )


# --- timing -------------------------------------------------------------------------------------


def measure(
    fn: Callable[[], Any], *, warmup: int = 10, runs: int = 30, sync: Callable[[], Any] | None = None
) -> list[float]:
    """Milliseconds per call of ``fn`` (wall clock, ``perf_counter``) after ``warmup`` untimed calls.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before the clock starts and before it
    stops, so work ``fn`` only enqueued is timed too.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_cuda(fn: Callable[[], Any], *, warmup: int = 10, runs: int = 30) -> list[float]:
    """Milliseconds per call of ``fn`` between CUDA events on the current stream, waiting for each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


# --- runners: one zero-argument call = one batch ---------------------------------------------------


class EagerRunner:
    """A copy of the model in eager PyTorch, fp32, under ``inference_mode`` (the caller's model is untouched)."""

    device = "cpu"

    def __init__(self, model: nn.Module, x: torch.Tensor, *, channels_last: bool = False) -> None:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = copy.deepcopy(model).eval().to(device="cpu", dtype=torch.float32, memory_format=layout)
        self.x = x.to(device="cpu", dtype=torch.float32).contiguous(memory_format=layout)

    def __call__(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(self.x)


class OnnxRunner:
    """An ONNX file (fp32 or int8) in ONNX Runtime on the CPU with ``threads`` intra-op threads.

    Picklable (the session is rebuilt from the path), so :func:`profiling.cost.memory.peak_memory_mb` can run it in a
    fresh process.
    """

    device = "cpu"

    def __init__(self, path: str | os.PathLike[str], x: np.ndarray | torch.Tensor, threads: int) -> None:
        self.path, self.threads = Path(path), threads
        self.x = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        self.session = onnx_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self) -> np.ndarray:
        return self.session.run(None, {self.input_name: self.x})[0]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "x": self.x, "threads": self.threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


class CudaRunner:
    """A copy of the model on the GPU under ``torch.autocast`` to ``dtype`` (fp16 or bf16), inference mode."""

    device = "cuda"

    def __init__(self, model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
        self.model = copy.deepcopy(model).eval().to(device="cuda", dtype=torch.float32)
        self.x = x.to(device="cuda", dtype=torch.float32)
        self.dtype = dtype

    def __call__(self) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=self.dtype):
            return self.model(self.x)


@dataclass(frozen=True)
class _Target:
    model: nn.Module | None
    onnx: Path | None
    onnx_int8: Path | None


def _need_model(t: _Target) -> nn.Module:
    if t.model is None:
        raise RuntimeUnavailable("needs the nn.Module; only an ONNX file was given")
    return t.model


def _need_cuda(t: _Target, dtype: torch.dtype) -> nn.Module:
    model = _need_model(t)
    if not torch.cuda.is_available():
        raise RuntimeUnavailable("no CUDA device")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise RuntimeUnavailable(f"{torch.cuda.get_device_name()} has no native bf16 (emulated, it would only be slow)")
    return model


def _onnx(t: _Target, x: torch.Tensor, threads: int) -> OnnxRunner:
    if t.onnx is None:
        raise RuntimeUnavailable("no fp32 ONNX file given")
    return OnnxRunner(t.onnx, x, threads)


def _onnx_int8(t: _Target, x: torch.Tensor, threads: int) -> OnnxRunner:
    if t.onnx_int8 is None:
        raise RuntimeUnavailable("no int8 ONNX file given (not quantised?)")
    return OnnxRunner(t.onnx_int8, x, threads)


@dataclass(frozen=True)
class Runtime:
    """Where a runtime runs and how to build its runner (raising RuntimeUnavailable if it cannot)."""

    device: str
    build: Callable[[_Target, torch.Tensor, int], Callable[[], Any]]


RUNTIMES: dict[str, Runtime] = {
    "eager": Runtime("cpu", lambda t, x, threads: EagerRunner(_need_model(t), x)),
    "eager_channels_last": Runtime("cpu", lambda t, x, threads: EagerRunner(_need_model(t), x, channels_last=True)),
    "onnx": Runtime("cpu", _onnx),
    "onnx_int8": Runtime("cpu", _onnx_int8),
    "cuda_fp16": Runtime("cuda", lambda t, x, threads: CudaRunner(_need_cuda(t, torch.float16), x, torch.float16)),
    "cuda_bf16": Runtime("cuda", lambda t, x, threads: CudaRunner(_need_cuda(t, torch.bfloat16), x, torch.bfloat16)),
}


# --- the measurement -----------------------------------------------------------------------------


def _device_name(kind: str) -> str:
    if kind == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cuda"
    return f"cpu ({cpu_model()})"


def _existing(path: str | os.PathLike[str] | None, what: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return Path(path)


def profile_latency(
    model_or_onnx: nn.Module | str | os.PathLike[str],
    img_size: int,
    runtimes: Sequence[str] = ("eager", "eager_channels_last", "onnx", "onnx_int8"),
    batch_sizes: Sequence[int] = (1,),
    threads: int | Sequence[int] | None = None,
    warmup: int = 10,
    runs: int = 30,
    *,
    onnx_path: str | os.PathLike[str] | None = None,
    onnx_int8_path: str | os.PathLike[str] | None = None,
    allow_busy: bool = False,
    max_other_load: float = 0.25,
) -> list[LatencyStats]:
    """Time each runtime x batch size x thread count on random ``3 x img_size x img_size`` images.

    ``model_or_onnx`` is an ``nn.Module`` (eager and CUDA runtimes; ONNX ones too when
    ``onnx_path`` / ``onnx_int8_path`` are given) or an fp32 ``.onnx`` file. ``threads`` None
    means every core this process may use. A runtime that does not apply comes back with
    ``skipped`` set, never with a made-up figure; so does a measurement during which other
    processes used more than ``max_other_load`` cores (with a :class:`BusyCpuWarning`).
    PyTorch's thread count is restored afterwards.
    """
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; valid: {sorted(RUNTIMES)}")
    thread_counts = [usable_cores()] if threads is None else [threads] if isinstance(threads, int) else list(threads)
    if runs < 1 or warmup < 0 or min(batch_sizes, default=0) < 1 or min(thread_counts, default=0) < 1:
        raise ValueError(
            f"need runs >= 1, warmup >= 0, batch sizes >= 1 and threads >= 1; "
            f"got {runs}, {warmup}, {list(batch_sizes)}, {thread_counts}"
        )
    if isinstance(model_or_onnx, nn.Module):
        target = _Target(model_or_onnx, _existing(onnx_path, "ONNX file"), _existing(onnx_int8_path, "int8 ONNX file"))
    else:
        if onnx_path is not None:
            raise ValueError("give the fp32 ONNX file once: as model_or_onnx or as onnx_path")
        target = _Target(None, _existing(model_or_onnx, "ONNX file"), _existing(onnx_int8_path, "int8 ONNX file"))

    results = []
    previous_threads = torch.get_num_threads()
    try:
        for n_threads in thread_counts:
            torch.set_num_threads(n_threads)
            for name in runtimes:
                for batch in batch_sizes:
                    results.append(
                        _measure_one(name, target, img_size, batch, n_threads, warmup, runs, allow_busy, max_other_load)
                    )
    finally:
        torch.set_num_threads(previous_threads)
    return results


def _withheld(where: dict[str, Any], load: float, when: str, max_other_load: float) -> LatencyStats:
    reason = f"CPU busy {when}: other processes used {load:.2f} cores (limit {max_other_load})"
    warnings.warn(
        f"{where['runtime']} batch {where['batch']} threads {where['threads']}: {reason}; no figure. "
        "Free the machine, or pass allow_busy=True to measure anyway.",
        BusyCpuWarning,
        stacklevel=4,
    )
    return LatencyStats(**where, other_cpu_load=load, skipped=reason)


def _measure_one(
    name: str,
    target: _Target,
    img_size: int,
    batch: int,
    threads: int,
    warmup: int,
    runs: int,
    allow_busy: bool,
    max_other_load: float,
) -> LatencyStats:
    runtime = RUNTIMES[name]
    where = {"runtime": name, "batch": batch, "threads": threads, "device": _device_name(runtime.device)}
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    try:
        runner = runtime.build(target, x, threads)
    except RuntimeUnavailable as exc:
        return LatencyStats(**where, skipped=str(exc))
    if not allow_busy:
        load = other_cpu_load()
        if load is not None and load > max_other_load:
            return _withheld(where, load, "before timing", max_other_load)

    before = cpu_times()
    if runtime.device == "cuda":
        times = measure_cuda(runner, warmup=warmup, runs=runs)
    else:
        times = measure(runner, warmup=warmup, runs=runs)
    after = cpu_times()
    load = None if before is None or after is None else other_load(before, after)

    if not allow_busy and load is None:
        warnings.warn("cannot read the CPU load here (no /proc): measured unchecked", BusyCpuWarning, stacklevel=3)
    elif not allow_busy and load > max_other_load:
        return _withheld(where, load, "while timing", max_other_load)
    return summarize(times, **where, other_cpu_load=load)


# --- the machine's limit ------------------------------------------------------------------------


def matmul_peak_gflops(threads: int, size: int = 1024, repeats: int = 10) -> float:
    """This machine's fp32 matmul GFLOP/s (2·n³ per n x n product, best of ``repeats``) with ``threads``.

    A practical ceiling for dense inference on this CPU; not checked for load, so measure it on an
    idle machine like the latencies it is compared with. PyTorch's thread count is restored.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
        out = torch.empty(size, size)
        best = min(measure(lambda: torch.mm(a, b, out=out), warmup=2, runs=repeats))
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / (best / 1e3) / 1e9


def ideal_ms(macs: int, batch: int, peak_gflops: float) -> float:
    """Milliseconds a batch would take at ``peak_gflops``: 2 FLOPs per MAC, ``macs`` per image."""
    return 2 * macs * batch / (peak_gflops * 1e9) * 1e3
