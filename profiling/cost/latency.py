"""Latency per runtime, batch size and thread count, and the limits to read it against.

Every figure carries its runtime, batch, threads and device, and comes from warm-up calls followed
by timed runs (median, p90 and spread, not a single call). Timing on a CPU that other processes are
using skews the figure (measured here: contention skewed timings 0.6-12x), so the load from other
processes is read before and during each measurement (the load reading and machine info live in
:mod:`profiling.cost.machine`). On a busy CPU a quiet window is looked for, ``quiet_tries`` short
attempts ``quiet_wait_s`` apart; if none comes, the figure is measured anyway and marked
``under_load`` ("measured under load (N cores busy)", with a :class:`BusyCpuWarning`) rather than
left out. ``strict=True`` (the benchmarks, the pruning latency search) keeps the refusal: a busy
CPU gives a warning and no figure. ``allow_busy=True`` measures at once without looking.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    "OpenVinoRunner",
    "Runtime",
    "RuntimeUnavailable",
    "ideal_ms",
    "matmul_peak_gflops",
    "measure",
    "measure_cuda",
    "profile_latency",
    "summarize",
    "under_load_note",
]


class BusyCpuWarning(RuntimeWarning):
    """Other processes loaded the CPU while a latency figure was measured: it is withheld (strict) or marked."""


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
    #: "measured under load (N cores busy)" when no quiet window came and the figure was timed anyway
    under_load: str | None = None


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


class OpenVinoRunner:
    """An ONNX (or IR) file compiled by OpenVINO for the CPU, fp32, latency hint, ``threads`` inference
    threads (:func:`deploy.openvino_runtime.compile_openvino`). Picklable like :class:`OnnxRunner`."""

    device = "cpu"

    def __init__(self, path: str | os.PathLike[str], x: np.ndarray | torch.Tensor, threads: int) -> None:
        from deploy.openvino_runtime import compile_openvino

        self.path, self.threads = Path(path), threads
        self.x = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        self.compiled = compile_openvino(self.path, threads)
        self.request = self.compiled.create_infer_request()

    def __call__(self) -> np.ndarray:
        return self.request.infer([self.x])[0]

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


def _openvino(t: _Target, x: torch.Tensor, threads: int) -> OpenVinoRunner:
    if t.onnx is None:
        raise RuntimeUnavailable("no fp32 ONNX file given")
    return OpenVinoRunner(t.onnx, x, threads)  # without the openvino package: a UserError naming the extra


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
    "openvino": Runtime("cpu", _openvino),
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
    strict: bool = False,
    quiet_tries: int = 5,
    quiet_wait_s: float = 1.0,
) -> list[LatencyStats]:
    """Time each runtime x batch size x thread count on random ``3 x img_size x img_size`` images.

    ``model_or_onnx`` is an ``nn.Module`` (eager and CUDA runtimes; ONNX ones too when
    ``onnx_path`` / ``onnx_int8_path`` are given) or an fp32 ``.onnx`` file. ``threads`` None
    means every core this process may use. A runtime that does not apply comes back with
    ``skipped`` set, never with a made-up figure. When other processes use more than
    ``max_other_load`` cores, up to ``quiet_tries`` attempts ``quiet_wait_s`` apart look for a quiet
    window; without one the figure is measured anyway and ``under_load`` says so (with a
    :class:`BusyCpuWarning`); with ``strict`` the first busy reading withholds the figure
    (``skipped``) instead. PyTorch's thread count is restored afterwards.
    """
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; valid: {sorted(RUNTIMES)}")
    thread_counts = [usable_cores()] if threads is None else [threads] if isinstance(threads, int) else list(threads)
    if quiet_tries < 1 or quiet_wait_s < 0:
        raise ValueError(f"need quiet_tries >= 1 and quiet_wait_s >= 0; got {quiet_tries}, {quiet_wait_s}")
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

    policy = _LoadPolicy(allow_busy, strict, max_other_load, quiet_tries, quiet_wait_s)
    results = []
    previous_threads = torch.get_num_threads()
    try:
        for n_threads in thread_counts:
            torch.set_num_threads(n_threads)
            for name in runtimes:
                for batch in batch_sizes:
                    results.append(_measure_one(name, target, img_size, batch, n_threads, warmup, runs, policy))
    finally:
        torch.set_num_threads(previous_threads)
    return results


@dataclass(frozen=True)
class _LoadPolicy:
    """What a busy CPU does to a measurement (see :func:`profile_latency`)."""

    allow_busy: bool
    strict: bool
    max_other_load: float
    quiet_tries: int
    quiet_wait_s: float


def under_load_note(load: float) -> str:
    """How a figure measured on a busy CPU is marked, in profile.json, report.json and report.md."""
    return f"measured under load ({load:.2f} cores busy)"


def _withheld(where: dict[str, Any], load: float, when: str, max_other_load: float) -> LatencyStats:
    reason = f"CPU busy {when}: other processes used {load:.2f} cores (limit {max_other_load})"
    warnings.warn(
        f"{where['runtime']} batch {where['batch']} threads {where['threads']}: {reason}; no figure (strict). "
        "Free the machine, or measure without strict to get a figure marked as measured under load.",
        BusyCpuWarning,
        stacklevel=4,
    )
    return LatencyStats(**where, other_cpu_load=load, skipped=reason)


def _timed(runner: Callable[[], Any], kind: str, warmup: int, runs: int) -> tuple[list[float], float | None]:
    """One measurement, and the cores other processes used while it ran (None: cannot be read here)."""
    before = cpu_times()
    timer = measure_cuda if kind == "cuda" else measure
    times = timer(runner, warmup=warmup, runs=runs)
    after = cpu_times()
    return times, None if before is None or after is None else other_load(before, after)


def _measure_one(
    name: str,
    target: _Target,
    img_size: int,
    batch: int,
    threads: int,
    warmup: int,
    runs: int,
    policy: _LoadPolicy,
) -> LatencyStats:
    runtime = RUNTIMES[name]
    where = {"runtime": name, "batch": batch, "threads": threads, "device": _device_name(runtime.device)}
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    try:
        runner = runtime.build(target, x, threads)
    except RuntimeUnavailable as exc:
        return LatencyStats(**where, skipped=str(exc))
    limit = policy.max_other_load
    if policy.allow_busy:
        times, load = _timed(runner, runtime.device, warmup, runs)
        return _figure(times, where, load, limit)

    busiest_before: float | None = None
    least_loaded: tuple[list[float], float] | None = None  # the calmest of the measurements made on a busy CPU
    for attempt in range(policy.quiet_tries):
        if attempt:
            time.sleep(policy.quiet_wait_s)
        load = other_cpu_load()
        if load is not None and load > limit:
            if policy.strict:
                return _withheld(where, load, "before timing", limit)
            busiest_before = max(load, busiest_before or 0.0)
            continue
        times, load = _timed(runner, runtime.device, warmup, runs)
        if load is None:
            warnings.warn("cannot read the CPU load here (no /proc): measured unchecked", BusyCpuWarning,
                          stacklevel=3)
            return summarize(times, **where)
        if load <= limit:
            return summarize(times, **where, other_cpu_load=load)
        if policy.strict:
            return _withheld(where, load, "while timing", limit)
        if least_loaded is None or load < least_loaded[1]:
            least_loaded = (times, load)
    if least_loaded is None:  # never quiet enough to start: measure now
        times, load = _timed(runner, runtime.device, warmup, runs)
        least_loaded = (times, load if load is not None else busiest_before or 0.0)
    times, load = least_loaded
    return _figure(times, where, load, limit, tries=policy.quiet_tries)


def _figure(times: list[float], where: dict[str, Any], load: float | None, limit: float,
            tries: int | None = None) -> LatencyStats:
    """The statistics of a measurement, marked as measured under load where others used over ``limit`` cores."""
    if load is None or load <= limit:
        return summarize(times, **where, other_cpu_load=load)
    note = under_load_note(load)
    looked = f"no quiet window in {tries} tries; " if tries else ""
    warnings.warn(f"{where['runtime']} batch {where['batch']} threads {where['threads']}: {looked}{note} "
                  f"(limit {limit}); the figure is inflated", BusyCpuWarning, stacklevel=4)
    return replace(summarize(times, **where, other_cpu_load=load), under_load=note)


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
