"""The sentences and tables benchmarks compute from their figures (no benchmark is run here)."""

from __future__ import annotations

from profiling.cost.ort_breakdown import Breakdown, OpTime


def _breakdown(ops: list[OpTime]) -> Breakdown:
    return Breakdown("m.onnx", (1, 3, 64, 64), threads=2, warmup=1, runs=3, run_ms=1.0, kernel_ms=0.8,
                     overhead_ms=0.2, plain_ms=0.9, total_macs=1_000_000, ops=ops, top=[], nodes_per_run=10)


def test_breakdown_sentences_are_computed_from_the_breakdown():
    from benchmarks.bench_models import breakdown_sentences

    ops = [OpTime("Conv 1×1", 5, 0.4, 0.5, 600_000, 0.6, ["Conv"]),
           OpTime("Conv depthwise", 3, 0.24, 0.3, 250_000, 0.25, ["Conv"]),
           OpTime("ReorderInput", 4, 0.16, 0.2, 0, 0.0, ["ReorderInput (nchwc)"])]
    text = " ".join(breakdown_sentences(_breakdown(ops), peak=50.0))
    # 2 x 250k MACs in 0.24 ms = 2.08 GFLOP/s, 4% of 50
    assert "Depthwise convolutions hold 25% of the MACs and 30% of the kernel time, reaching 2.1 GFLOP/s (4%" in text
    assert "The slowest kind is Conv 1×1 (5 nodes): 50% of the kernel time for 60% of the MACs." in text
    # FLOP limit of 1 M MACs at 50 GFLOP/s: 0.04 ms; kernels 0.8 ms = 20x; MAC-free nodes 20%; outside 20% of 1 ms
    assert "The kernels alone take 20.0× the FLOP-limit time" in text
    assert "take 20% of the kernel time, and 20% of a profiled run" in text


def test_breakdown_sentences_without_depthwise_convolutions():
    from benchmarks.bench_models import breakdown_sentences

    text = breakdown_sentences(_breakdown([OpTime("Conv k×k", 2, 0.8, 1.0, 1_000_000, 1.0, ["Conv"])]), peak=50.0)
    assert text[0] == "The graph has no depthwise convolutions."
