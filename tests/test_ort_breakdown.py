"""The ONNX Runtime profiler breakdown: kinds, counts, shares, MACs by hand and by fvcore, no trace left behind."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from profiling.cost.counting import count_macs
from profiling.cost.ort_breakdown import (
    MATMUL_KIND,
    breakdown_markdown,
    graph_macs,
    op_kind,
    ort_breakdown,
    overhead_line,
)

# The hand count of the test graph (one image 4x8x8):
DENSE = 8 * 8 * 8 * (4 * 3 * 3)  # 3x3 conv 4 -> 8 channels, 8x8 out: 18,432
DEPTHWISE = 8 * 8 * 8 * (1 * 3 * 3)  # 3x3 depthwise on 8 channels: 4,608
GEMM = 2 * 8  # 8 features -> 2 logits: 16
TOTAL = DENSE + DEPTHWISE + GEMM


def _tiny(path, *, batch="N") -> str:
    """X -> 3x3 conv -> Relu -> 3x3 depthwise conv -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="dense", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="depthwise", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         group=8),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])],
        [init("w1", 8, 4, 3, 3), init("b1", 8), init("w2", 8, 1, 3, 3), init("w3", 2, 8), init("b3", 2)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def test_op_kind_tells_convolutions_apart():
    assert op_kind("Conv", 16, [16, 1, 3, 3]) == "Conv depthwise"
    assert op_kind("QLinearConv", 16, [16, 1, 5, 5]) == "Conv depthwise"
    assert op_kind("Conv", 4, [16, 4, 3, 3]) == "Conv grouped"
    assert op_kind("Conv", 1, [16, 8, 1, 1]) == "Conv 1×1"
    assert op_kind("FusedConv", 1, [16, 3, 3, 3]) == "Conv k×k"
    assert op_kind("Conv", 1, [16, 1, 3, 3]) == "Conv k×k"  # one input channel, one group: dense
    assert op_kind("QLinearConv", 1, None, [1, 1]) == "Conv 1×1"  # a pre-packed weight: the kernel_shape attribute
    assert op_kind("QLinearConv", 8, None, [3, 3]) == "Conv grouped (weight not seen)"
    assert op_kind("Conv") == "Conv (kernel not seen)"
    assert op_kind("MatMul") == op_kind("Gemm") == MATMUL_KIND
    assert op_kind("HardSwish") == "HardSwish"


def test_graph_macs_by_hand(tmp_path):
    path = _tiny(tmp_path / "tiny.onnx")
    assert graph_macs(path, (1, 4, 8, 8)) == {"Conv k×k": DENSE, "Conv depthwise": DEPTHWISE, MATMUL_KIND: GEMM}
    assert sum(graph_macs(path, (3, 4, 8, 8)).values()) == 3 * TOTAL  # the batch is part of the input shape


def test_graph_macs_rejects_a_wrong_rank(tmp_path):
    with pytest.raises(ValueError, match="rank"):
        graph_macs(_tiny(tmp_path / "tiny.onnx"), (1, 4, 8))


def test_graph_macs_agrees_with_fvcore(tmp_path):
    from deploy.export import export_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2, groups=8),
                        nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 2)).eval()
    path = export_onnx(net, tmp_path / "net.onnx", 16)
    macs = graph_macs(path, (1, 3, 16, 16))
    fv = count_macs(net, torch.zeros(1, 3, 16, 16)).by_operator
    assert sum(macs.values()) == fv["conv"] + fv["linear"]
    assert set(macs) == {"Conv k×k", "Conv depthwise", "Conv 1×1", "Conv grouped", MATMUL_KIND}
    assert macs["Conv depthwise"] == 8 * 8 * 8 * 25


def test_breakdown_as_the_file_holds_it(tmp_path):
    """Graph optimizations off: one profiled node per graph node, counts per kind as in the graph."""
    path = _tiny(tmp_path / "tiny.onnx")
    work = tmp_path / "work"
    work.mkdir()
    b = ort_breakdown(path, (1, 4, 8, 8), threads=1, warmup=2, runs=4, top=3, plain=False, work_dir=work,
                      optimize=False)
    assert list(work.iterdir()) == []  # trace and optimized graph deleted
    counts = {o.kind: o.nodes for o in b.ops}
    assert counts == {"Conv k×k": 1, "Relu": 1, "Conv depthwise": 1, "GlobalAveragePool": 1, "Flatten": 1,
                      MATMUL_KIND: 1}
    assert b.nodes_per_run == 6 and b.runs == 4 and b.warmup == 2
    assert math.isclose(sum(o.time_share for o in b.ops), 1.0, rel_tol=1e-9)
    assert math.isclose(sum(o.mac_share for o in b.ops), 1.0, rel_tol=1e-9)
    assert b.total_macs == TOTAL
    shares = {o.kind: o.mac_share for o in b.ops}
    assert math.isclose(shares["Conv depthwise"], DEPTHWISE / TOTAL)
    assert math.isclose(shares["Conv k×k"], DENSE / TOTAL)
    assert shares["Relu"] == 0.0
    assert b.share("Conv depthwise")[0] == pytest.approx(DEPTHWISE / TOTAL)
    assert math.isclose(sum(o.ms for o in b.ops), b.kernel_ms, rel_tol=1e-9)
    assert b.run_ms > 0 and b.kernel_ms > 0 and b.overhead_ms >= 0  # a run holds its kernels
    assert len(b.top) == 3 and [t.ms for t in b.top] == sorted((t.ms for t in b.top), reverse=True)
    assert b.plain_ms is None


def test_breakdown_of_the_deployed_graph(tmp_path):
    """Default optimizations (as deployed): fusions change the nodes, not the kinds of convolution or their MACs."""
    path = _tiny(tmp_path / "tiny.onnx", batch=2)
    b = ort_breakdown(path, (2, 4, 8, 8), threads=1, warmup=1, runs=3, plain=True, work_dir=tmp_path)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    by_kind = {o.kind: o for o in b.ops}
    assert by_kind["Conv depthwise"].nodes == 1 and by_kind["Conv k×k"].nodes == 1
    assert by_kind["Conv depthwise"].macs == 2 * DEPTHWISE and b.total_macs == 2 * TOTAL
    assert "Relu" not in by_kind or by_kind["Relu"].nodes == 1  # fused into the conv, or run on its own
    assert math.isclose(sum(o.time_share for o in b.ops), 1.0, rel_tol=1e-9)
    assert b.plain_ms is not None and b.plain_ms > 0
    text = breakdown_markdown(b, peak_gflops=10.0)
    assert "| Conv depthwise | 1 |" in text and "of fp32 matmul peak" in text
    assert overhead_line(b) in text
    assert b.to_dict()["total_macs"] == 2 * TOTAL


def test_breakdown_of_an_int8_graph(tmp_path):
    """Static int8: ONNX Runtime runs QLinearConv with a pre-packed weight the profiler does not show;
    the kinds come from the optimized graph, the MACs from the QDQ graph's convolutions."""
    from deploy.export import quantize_int8

    path = _tiny(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    int8 = quantize_int8(path, tmp_path / "tiny_int8.onnx", [rng.standard_normal((2, 4, 8, 8), dtype=np.float32)])
    b = ort_breakdown(int8, (1, 4, 8, 8), threads=1, warmup=1, runs=2, plain=False, work_dir=tmp_path)
    by_kind = {o.kind: o for o in b.ops}
    assert by_kind["Conv depthwise"].nodes == 1 and by_kind["Conv k×k"].nodes == 1
    assert by_kind["Conv depthwise"].macs == DEPTHWISE and b.total_macs == TOTAL
    assert by_kind["Conv depthwise"].runs_as == ["QLinearConv (NHWC)"]  # the pre-packed path was the one tested
    assert math.isclose(sum(o.time_share for o in b.ops), 1.0, rel_tol=1e-9)
