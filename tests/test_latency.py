"""Latency tooling: structure, consistent statistics, threads, skipped runtimes, the busy-CPU guard, ONNX.

No test asserts on how fast anything is: timings are measured by benchmarks, not by tests.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import quantize_dynamic
from torch import nn

from profiling.cost import latency
from profiling.cost.latency import (BusyCpuWarning, EagerRunner, LatencyStats, OnnxRunner, ideal_ms, matmul_peak_gflops, measure, profile_latency, summarize)
from profiling.cost.memory import peak_memory_mb
from profiling.cost.machine import CpuTimes, cpu_times, machine_info, other_load

FAST = {"warmup": 1, "runs": 5}


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny CNN exported with a dynamic batch, and a dynamically quantised int8 copy."""
    folder = tmp_path_factory.mktemp("onnx")
    fp32, int8 = folder / "model.onnx", folder / "model_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its retirement
        torch.onnx.export(
            tiny_cnn(),
            (torch.randn(1, 3, 16, 16),),
            str(fp32),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    quantize_dynamic(str(fp32), str(int8))
    return fp32, int8


def assert_consistent(s: LatencyStats) -> None:
    assert s.skipped is None
    assert s.min_ms <= s.median_ms <= s.p90_ms <= s.max_ms
    assert s.min_ms <= s.mean_ms <= s.max_ms and s.std_ms >= 0
    assert s.images_per_s == pytest.approx(s.batch / (s.median_ms / 1e3))


def test_measure_times_every_run_after_warmup() -> None:
    calls, syncs = [], []
    times = measure(lambda: calls.append(1), warmup=3, runs=7, sync=lambda: syncs.append(1))
    assert len(calls) == 10 and len(times) == 7 and all(t >= 0 for t in times)
    assert len(syncs) == 2 * 7  # before the clock starts and before it stops, on timed runs


def test_summarize_by_hand() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0, 10.0], runtime="eager", batch=8, threads=2, device="cpu (x)")
    assert (s.median_ms, s.min_ms, s.max_ms, s.mean_ms, s.runs) == (3.0, 1.0, 10.0, 4.0, 5)
    assert s.p90_ms == pytest.approx(4.0 + 0.6 * (10.0 - 4.0))  # linear between the 4th and 5th sorted runs
    assert s.std_ms == pytest.approx(np.std([4, 1, 3, 2, 10], ddof=1))
    assert s.images_per_s == pytest.approx(8 / 3e-3)
    assert_consistent(s)


def test_eager_runtimes_per_batch_and_threads() -> None:
    stats = profile_latency(
        tiny_cnn(), 16, ["eager", "eager_channels_last"], batch_sizes=[1, 3], threads=[1, 2], allow_busy=True, **FAST
    )
    assert [(s.threads, s.runtime, s.batch) for s in stats] == [
        (t, r, b) for t in (1, 2) for r in ("eager", "eager_channels_last") for b in (1, 3)
    ]
    for s in stats:
        assert_consistent(s)
        assert s.runs == 5 and s.device.startswith("cpu (")


def test_threads_are_restored_even_on_error() -> None:
    torch.set_num_threads(2)
    profile_latency(tiny_cnn(), 16, ["eager"], threads=1, allow_busy=True, **FAST)
    assert torch.get_num_threads() == 2

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        profile_latency(Broken(), 16, ["eager"], threads=1, allow_busy=True, **FAST)
    assert torch.get_num_threads() == 2


def test_runtimes_that_do_not_apply_are_skipped_not_faked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stats = profile_latency(tiny_cnn(), 16, ["onnx", "onnx_int8", "cuda_fp16", "cuda_bf16"], allow_busy=True, **FAST)
    reasons = {s.runtime: s.skipped for s in stats}
    assert reasons == {
        "onnx": "no fp32 ONNX file given",
        "onnx_int8": "no int8 ONNX file given (not quantised?)",
        "cuda_fp16": "no CUDA device",
        "cuda_bf16": "no CUDA device",
    }
    assert all(s.median_ms is None and s.images_per_s is None and s.runs == 0 for s in stats)


def test_eager_needs_a_module(onnx_files: tuple[Path, Path]) -> None:
    (stats,) = profile_latency(onnx_files[0], 16, ["eager"], allow_busy=True, **FAST)
    assert stats.skipped == "needs the nn.Module; only an ONNX file was given"


def test_bad_arguments_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown runtime\(s\) \['tensorrt'\]; valid: \['cuda_bf16'"):
        profile_latency(tiny_cnn(), 16, ["tensorrt"])
    with pytest.raises(FileNotFoundError, match="int8 ONNX file not found"):
        profile_latency(tiny_cnn(), 16, ["eager"], onnx_int8_path=tmp_path / "missing.onnx")


def _scripted(monkeypatch: pytest.MonkeyPatch, before: list[float], during: list[float]) -> dict[str, int]:
    """A fake load reader: the cores other processes use before each try and while each measurement
    runs, read from the lists in turn (the last value repeats). Returns how often each was read."""
    reads = {"before": 0, "during": 0}

    def reader(kind: str, values: list[float]):
        def read(*_args: object) -> float:
            reads[kind] += 1
            return values[min(reads[kind], len(values)) - 1]
        return read

    monkeypatch.setattr(latency, "other_cpu_load", reader("before", before))
    monkeypatch.setattr(latency, "other_load", reader("during", during))
    return reads


NO_WAIT = {**FAST, "quiet_wait_s": 0.0}  # the tries come one after another: no test sleeps


def test_strict_busy_cpu_before_timing_gives_no_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _scripted(monkeypatch, before=[1.5], during=[0.0])
    with pytest.warns(BusyCpuWarning, match="other processes used 1.50 cores"):
        (stats,) = profile_latency(tiny_cnn(), 16, ["eager"], strict=True, **NO_WAIT)
    assert stats.median_ms is None and stats.other_cpu_load == 1.5 and stats.under_load is None
    assert stats.skipped == "CPU busy before timing: other processes used 1.50 cores (limit 0.25)"
    assert reads == {"before": 1, "during": 0}  # strict: no second look, nothing timed


def test_strict_busy_cpu_while_timing_gives_no_figure_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, before=[0.0], during=[0.8])
    with pytest.warns(BusyCpuWarning):
        (stats,) = profile_latency(tiny_cnn(), 16, ["eager"], strict=True, **NO_WAIT)
    assert stats.skipped.startswith("CPU busy while timing") and stats.median_ms is None

    with pytest.warns(BusyCpuWarning, match="measured under load"):
        (stats,) = profile_latency(tiny_cnn(), 16, ["eager"], allow_busy=True, **NO_WAIT)
    assert_consistent(stats)
    assert stats.other_cpu_load == 0.8  # measured anyway, and the load is kept beside the figure
    assert stats.under_load == "measured under load (0.80 cores busy)"


def test_a_busy_cpu_is_waited_out_when_a_quiet_window_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _scripted(monkeypatch, before=[1.5, 1.2, 0.1], during=[0.05])
    with warnings.catch_warnings():
        warnings.simplefilter("error", BusyCpuWarning)  # a quiet figure warns of nothing
        (stats,) = profile_latency(tiny_cnn(), 16, ["eager"], **NO_WAIT)
    assert_consistent(stats)
    assert stats.under_load is None and stats.other_cpu_load == 0.05
    assert reads == {"before": 3, "during": 1}


def test_no_quiet_window_measures_anyway_and_marks_the_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _scripted(monkeypatch, before=[1.5], during=[1.2])
    with pytest.warns(BusyCpuWarning, match=r"no quiet window in 5 tries; measured under load \(1.20 cores busy\)"):
        (stats,) = profile_latency(tiny_cnn(), 16, ["eager"], **NO_WAIT)
    assert_consistent(stats)  # a figure, not a blank
    assert stats.under_load == "measured under load (1.20 cores busy)" and stats.other_cpu_load == 1.2
    assert reads == {"before": 5, "during": 1}  # five looks, then one measurement


def test_busy_while_timing_keeps_the_least_loaded_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _scripted(monkeypatch, before=[0.0], during=[0.9, 0.6, 0.7, 0.8, 1.0])
    with pytest.warns(BusyCpuWarning, match=r"0.60 cores busy"):
        (stats,) = profile_latency(tiny_cnn(), 16, ["eager"], quiet_tries=5, **NO_WAIT)
    assert stats.under_load == "measured under load (0.60 cores busy)" and stats.median_ms is not None
    assert reads == {"before": 5, "during": 5}


def test_quiet_tries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="quiet_tries >= 1"):
        profile_latency(tiny_cnn(), 16, ["eager"], quiet_tries=0)


def test_other_load_by_hand() -> None:
    before = CpuTimes(busy=100, total=1000, cpus=2, own=50)
    after = CpuTimes(busy=300, total=1400, cpus=2, own=150)
    # 200 ticks per CPU elapsed; 200 busy ticks, 100 of them ours: others used half a core
    assert other_load(before, after) == pytest.approx(0.5)
    assert other_load(before, CpuTimes(busy=200, total=1400, cpus=2, own=200)) == 0.0  # never negative


def test_cpu_times_reads_usable_cpus() -> None:
    now = cpu_times()
    assert now is not None and now.cpus == len(os.sched_getaffinity(0))
    assert 0 <= now.busy <= now.total and now.own >= 0


def test_onnx_matches_eager_and_uses_the_threads_asked_for(onnx_files: tuple[Path, Path]) -> None:
    x = torch.randn(3, 3, 16, 16)
    runner = OnnxRunner(onnx_files[0], x, threads=1)
    options = runner.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    eager = EagerRunner(tiny_cnn(), x)().numpy()
    np.testing.assert_allclose(runner(), eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pickle.loads(pickle.dumps(runner))(), eager, rtol=1e-5, atol=1e-5)


def test_onnx_runtimes_are_measured(onnx_files: tuple[Path, Path]) -> None:
    fp32, int8 = onnx_files
    stats = profile_latency(
        tiny_cnn(),
        16,
        ["onnx", "onnx_int8"],
        batch_sizes=[2],
        threads=1,
        onnx_path=fp32,
        onnx_int8_path=int8,
        allow_busy=True,
        **FAST,
    )
    assert [s.runtime for s in stats] == ["onnx", "onnx_int8"]
    for s in stats:
        assert_consistent(s)
    (from_file,) = profile_latency(fp32, 16, ["onnx"], threads=1, allow_busy=True, **FAST)
    assert_consistent(from_file)


def test_channels_last_runner_leaves_the_model_alone() -> None:
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    runner = EagerRunner(model, x, channels_last=True)
    assert runner.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous()
    torch.testing.assert_close(runner(), EagerRunner(model, x)())


def test_peak_memory_counts_the_activations() -> None:
    # one 16 x 256 x 256 float32 map per image, batch 4: 16.8 MB that must be resident at the peak
    model = nn.Conv2d(3, 16, 3, padding=1)
    activation_mb = 4 * 16 * 256 * 256 * 4 / 1e6
    mb = peak_memory_mb(EagerRunner(model, torch.randn(4, 3, 256, 256)))
    assert activation_mb <= mb < 10 * activation_mb


def test_peak_memory_needs_a_picklable_runner() -> None:
    with pytest.raises(TypeError, match="must be picklable"):
        peak_memory_mb(lambda: None)


def test_machine_info() -> None:
    info = machine_info()
    assert info["cpu"] and info["logical_cores"] >= info["usable_cores"] >= 1
    assert info["torch"] == torch.__version__ and info["onnxruntime"] == ort.__version__ and info["timm"]
    assert info["gpu"] is None or isinstance(info["gpu"], str)


def test_matmul_peak_and_ideal_time() -> None:
    torch.set_num_threads(2)
    assert matmul_peak_gflops(threads=1, size=64, repeats=2) > 0
    assert torch.get_num_threads() == 2
    # 1 GMAC per image, batch 2 = 4 GFLOP; at 100 GFLOP/s that is 40 ms
    assert ideal_ms(1_000_000_000, 2, 100.0) == pytest.approx(40.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_runtimes() -> None:
    stats = profile_latency(tiny_cnn(), 16, ["cuda_fp16", "cuda_bf16"], batch_sizes=[1, 4], allow_busy=True, **FAST)
    for s in stats:
        if s.skipped is None:
            assert_consistent(s)
            assert s.device.startswith("cuda (")
    runner = latency.CudaRunner(tiny_cnn(), torch.randn(4, 3, 16, 16), torch.float16)
    assert runner().dtype == torch.float16  # the linear head ran under autocast
    assert peak_memory_mb(runner, device="cuda") > 0
