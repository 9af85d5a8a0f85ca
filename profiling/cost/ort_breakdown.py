"""Where an ONNX model's time goes in ONNX Runtime: per operator kind, per node, and outside the kernels.

:func:`ort_breakdown` runs an ``.onnx`` file in ONNX Runtime on the CPU with the session options
that time it elsewhere (``threads`` intra-op threads, one inter-op thread, sequential execution,
the default graph optimizations), with ``SessionOptions.enable_profiling`` on. The profiler writes
a Chrome-trace JSON file (into a temporary directory, deleted afterwards) holding one
``model_run`` event per ``run()`` and one ``<node>_kernel_time`` event per node per run
(``dur`` in microseconds, ``args.op_name``, ``args.input_type_shape``). The warm-up runs are
dropped; the timed runs are aggregated:

- per operator kind (:func:`op_kind`): nodes per run, ms per run (each node's median over the
  runs, so that one run stalled by another process does not count), share of the summed kernel
  time, share of the model's MACs in those nodes and the GFLOP/s they reach (``2 x MACs / time``).
  Convolutions are told apart by the graph's ``group`` attribute and weight shape: depthwise
  (one input channel per group), grouped, 1x1 (pointwise) and dense k x k.
- the ``top`` slowest single nodes;
- the gap between the ``model_run`` time and the summed kernel times: time outside the kernels
  (executor, memory planning, input/output copies, and the profiler's own bookkeeping), with the
  median of as many runs without the profiler beside it.

The nodes timed are those of the *optimized* graph (ONNX Runtime fuses activations and residual
adds into convolutions and may switch to blocked ``nchwc`` layouts, adding ``Reorder*`` nodes), so
ONNX Runtime saves that graph next to the trace and each node's ``group`` and fused
``activation`` are read from it by name. MACs are counted on the file's own graph (with
:func:`onnx.shape_inference.infer_shapes` at the given input shape), where every node still has its
logical channel counts (blocked layouts pad channels), and are attributed per kind: a depthwise
convolution is one whether or not an activation was fused into it. MACs of a convolution are
``output elements x (input channels / group) x kernel area``; of a Gemm/MatMul ``output
elements x inner dimension``; other operators count none (as fvcore, which the rest of the
project uses: its total includes no BatchNorm, which the export folds away).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Breakdown", "NodeTime", "OpTime", "breakdown_markdown", "graph_macs", "op_kind", "ort_breakdown"]

CONV_OPS = {"Conv": 1, "FusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> index of the weight input
MATMUL_OPS = {"Gemm": 0, "MatMul": 0, "FusedGemm": 0, "FusedMatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0,
              "QGemm": 0}  # op -> index of the A input
MATMUL_KIND = "Gemm / MatMul"


def _conv_kind(group: int, weight_shape: list[int] | None, kernel: list[int] | None = None) -> str:
    """``Conv depthwise | Conv grouped | Conv 1×1 | Conv k×k`` from ``group`` and the weight's
    shape ``[out, in / group, *kernel]``; without the weight's shape, ``kernel`` (the
    ``kernel_shape`` attribute) tells 1×1 from k×k, and a grouped convolution stays unresolved."""
    per_group = weight_shape[1] if weight_shape and len(weight_shape) > 2 else None
    kernel = list(weight_shape[2:]) if per_group is not None else kernel
    if group > 1:
        return "Conv grouped (weight not seen)" if per_group is None else \
            "Conv depthwise" if per_group == 1 else "Conv grouped"
    if not kernel:
        return "Conv (kernel not seen)"
    return "Conv 1×1" if all(k == 1 for k in kernel) else "Conv k×k"


def op_kind(op_type: str, group: int = 1, weight_shape: list[int] | None = None,
            kernel: list[int] | None = None) -> str:
    """The row a node counts under: convolutions by kind (:func:`_conv_kind`; fp32, fused or int8
    alike), every matrix product as one kind, any other operator under its own type."""
    if op_type in CONV_OPS:
        return _conv_kind(group, weight_shape, kernel)
    if op_type in MATMUL_OPS:
        return MATMUL_KIND
    return op_type


# --- MACs on the file's graph --------------------------------------------------------------------


def _dims(value_type: Any) -> list[int] | None:
    if not value_type.HasField("tensor_type") or not value_type.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value_type.tensor_type.shape.dim]
    return None if any(d is None for d in dims) else dims


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def graph_macs(path: str | Path, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs per operator kind (:func:`op_kind`) of the ONNX file at ``path`` for one input of
    ``input_shape`` (batch included), from its graph with shapes inferred at that shape."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"'{path}' has {len(inputs)} graph inputs; graph_macs handles models with one")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"'{path}' takes a rank-{len(dims)} input; input_shape {tuple(input_shape)} has rank "
                         f"{len(input_shape)}")
    for dim, size in zip(dims, input_shape):
        dim.Clear()
        dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes: dict[str, list[int] | None] = {t.name: list(t.dims) for t in inferred.graph.initializer}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shapes.setdefault(v.name, _dims(v.type))
    out: dict[str, int] = defaultdict(int)
    for node in inferred.graph.node:
        if node.op_type not in CONV_OPS and node.op_type not in MATMUL_OPS:
            continue
        y = shapes.get(node.output[0])
        if y is None:
            raise ValueError(f"'{path}': no inferred shape for the output of {node.op_type} node '{node.name}'; "
                             "MACs cannot be counted")
        if node.op_type in CONV_OPS:
            w = shapes.get(node.input[CONV_OPS[node.op_type]])
            if w is None:
                raise ValueError(f"'{path}': no shape for the weight of {node.op_type} node '{node.name}'")
            out[op_kind(node.op_type, int(_attr(node, "group", 1)), w)] += math.prod(y) * math.prod(w[1:])
        else:
            a = shapes.get(node.input[MATMUL_OPS[node.op_type]])
            if a is None:
                raise ValueError(f"'{path}': no shape for the first input of {node.op_type} node '{node.name}'")
            inner = a[0] if node.op_type in ("Gemm", "FusedGemm", "QGemm") and _attr(node, "transA", 0) else a[-1]
            out[MATMUL_KIND] += math.prod(y) * inner
    return dict(out)


# --- the profiled run ----------------------------------------------------------------------------


@dataclass
class OpTime:
    """One operator kind of the profiled graph."""

    kind: str
    nodes: int  # nodes of this kind per run
    ms: float  # per run: the sum of its nodes' median kernel times
    time_share: float  # of the summed kernel time
    macs: int  # in the file's graph, for one input of the profiled shape
    mac_share: float  # of the model's MACs
    runs_as: list[str]  # the kernels ONNX Runtime ran (op type, + fused activation)

    @property
    def gflops(self) -> float | None:
        """``2 x MACs / time``: what these nodes reach (None without MACs or time)."""
        return 2 * self.macs / (self.ms * 1e6) if self.macs and self.ms > 0 else None


@dataclass
class NodeTime:
    name: str
    kind: str
    runs_as: str
    ms: float  # median over the runs
    time_share: float
    output_shape: list[int] | None


@dataclass
class Breakdown:
    path: str
    input_shape: tuple[int, ...]
    threads: int
    warmup: int
    runs: int
    run_ms: float  # median model_run (profiled)
    kernel_ms: float  # the sum over nodes of each node's median kernel time
    overhead_ms: float  # median over runs of (model_run - the run's summed kernel times): time outside the kernels
    plain_ms: float | None  # median run() time of a session without the profiler
    total_macs: int
    ops: list[OpTime]  # slowest first
    top: list[NodeTime]  # slowest single nodes
    nodes_per_run: int
    notes: list[str] = field(default_factory=list)

    def share(self, prefix: str) -> tuple[float, float]:
        """(share of the MACs, share of the kernel time) of the kinds whose name starts with ``prefix``."""
        rows = [o for o in self.ops if o.kind.startswith(prefix)]
        return sum(o.mac_share for o in rows), sum(o.time_share for o in rows)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _options(threads: int, optimize: bool = True):
    import onnxruntime as ort

    from deploy.runtime import session_options

    options = session_options(threads)  # as deploy.runtime.onnx_session, which every timing here uses
    if not optimize:  # the graph as the file holds it, node for node (not how it is deployed)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # saving an nchwc-optimized graph warns that it is machine-specific: it is only read here
    options.log_severity_level = 3
    return options


def _session(path: Path, options):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class _GraphNode:
    """What the profiler does not say about a node of the optimized graph."""

    layout: str | None  # "nchwc" for ONNX Runtime's blocked-layout kernels, "NHWC" for channels-last ones
    group: int
    activation: str | None  # fused into a convolution
    kernel: list[int] | None  # the kernel_shape attribute
    weight: list[int] | None  # the weight initializer's shape, when it is a logical [out, in / group, *kernel] one


def _optimized_nodes(path: Path) -> dict[str, _GraphNode]:
    """Node name -> :class:`_GraphNode` of the optimized graph ONNX Runtime saved (empty if it saved none)."""
    import onnx

    if not path.is_file():
        return {}
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name: list(t.dims) for t in graph.initializer}
    out = {}
    for node in graph.node:
        activation = _attr(node, "activation", None)
        kernel = _attr(node, "kernel_shape", None)
        weight = None
        if node.op_type in CONV_OPS and len(node.input) > CONV_OPS[node.op_type]:
            weight = initializers.get(node.input[CONV_OPS[node.op_type]])
        layout = "nchwc" if node.domain.endswith("nchwc") else "NHWC" if _attr(node, "channels_last", 0) else None
        out[node.name] = _GraphNode(layout, int(_attr(node, "group", 1)),
                                    activation.decode() if isinstance(activation, bytes) else activation,
                                    list(kernel) if kernel else None, _logical(weight, kernel))
    return out


def _logical(weight: list[int] | None, kernel: list[int] | None) -> list[int] | None:
    """``weight`` if it has the logical convolution layout ``[out, in / group, *kernel]`` (blocked
    layouts reorder and pad it; a pre-packed int8 weight may be absent), else None."""
    if not weight or len(weight) < 3:
        return None
    if kernel is not None and (len(weight) != 2 + len(kernel) or list(weight[2:]) != list(kernel)):
        return None
    return list(weight)


def _conv_weight(node: _GraphNode | None, shapes: list[list[int] | None], op: str) -> tuple[int, list[int] | None]:
    """(group, weight shape) of a profiled convolution: the optimized graph's, else what the profiler
    recorded (its input shapes; group = input channels / the weight's input channels)."""
    recorded = shapes[CONV_OPS[op]] if len(shapes) > CONV_OPS[op] else None
    if node is not None:
        return node.group, node.weight or _logical(recorded, node.kernel)
    weight = _logical(recorded, None)
    x = shapes[0] if shapes else None
    group = max(1, x[1] // weight[1]) if weight and weight[1] and x and len(x) > 1 else 1
    return group, weight


def _shape(entry: Any) -> list[int] | None:
    """``{"float": [1, 16, 8, 8]}`` -> ``[1, 16, 8, 8]``."""
    if isinstance(entry, dict) and len(entry) == 1:
        value = next(iter(entry.values()))
        return list(value) if isinstance(value, list) else None
    return None


def _kernel_events(trace: list[dict[str, Any]], warmup: int) -> tuple[list[float], list[list[dict[str, Any]]]]:
    """Per timed run: its ``model_run`` µs and its node kernel events (by time stamp within the run)."""
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) <= warmup:
        raise RuntimeError(f"the profile holds {len(runs)} model_run event(s), not more than the {warmup} warm-up runs")
    kernels = sorted((e for e in trace if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    timed = runs[warmup:]
    per_run: list[list[dict[str, Any]]] = [[] for _ in timed]
    i = 0
    for k, run in enumerate(timed):
        start, end = run["ts"], run["ts"] + run["dur"]
        while i < len(kernels) and kernels[i]["ts"] < start:
            i += 1
        while i < len(kernels) and kernels[i]["ts"] <= end:
            per_run[k].append(kernels[i])
            i += 1
    return [float(r["dur"]) for r in timed], per_run


def ort_breakdown(path: str | Path, input_shape: tuple[int, ...], *, threads: int = 1, warmup: int = 10,
                  runs: int = 30, top: int = 10, plain: bool = True, work_dir: str | Path | None = None,
                  seed: int = 0, optimize: bool = True) -> Breakdown:
    """Profile ``path`` on random-normal float32 input of ``input_shape`` (see the module docstring).

    ``warmup`` runs are dropped, ``runs`` are aggregated; ``plain`` also times ``runs`` calls of a
    session without the profiler (after ``warmup``), for the profiler's own cost. The trace and the
    optimized graph go to a temporary directory (under ``work_dir`` if given), deleted on return.
    ``optimize=False`` turns ONNX Runtime's graph optimizations off (the file's nodes as they are;
    deployment keeps them on).
    """
    path = Path(path)
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape), dtype=np.float32)
    macs = graph_macs(path, tuple(input_shape))
    total_macs = sum(macs.values())
    with tempfile.TemporaryDirectory(prefix="ort_profile_", dir=work_dir) as tmp:
        options = _options(threads, optimize)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = _session(path, options)
        feed = {session.get_inputs()[0].name: x}
        try:
            for _ in range(warmup + runs):
                session.run(None, feed)
        finally:
            trace_path = Path(session.end_profiling())
        trace = json.loads(trace_path.read_text(encoding="utf-8"))
        graph = _optimized_nodes(Path(tmp) / "optimized.onnx")
    run_us, per_run = _kernel_events(trace, warmup)
    notes = []
    if not graph:
        notes.append("ONNX Runtime did not save its optimized graph: convolutions are told apart by the shapes the "
                     "profiler recorded (group = input channels / weight's input channels)")

    by_node: dict[str, dict[str, Any]] = {}
    for events in per_run:
        for e in events:
            name = e["name"].removesuffix("_kernel_time")
            info = by_node.get(name)
            if info is None:
                args = e.get("args", {})
                op = args.get("op_name", "?")
                shapes = [_shape(s) for s in args.get("input_type_shape", [])]
                outputs = [_shape(s) for s in args.get("output_type_shape", [])]
                node = graph.get(name)
                group, weight = _conv_weight(node, shapes, op) if op in CONV_OPS else (1, None)
                kind = op_kind(op, group, weight, node.kernel if node is not None else None)
                layout, activation = (node.layout, node.activation) if node is not None else (None, None)
                info = by_node[name] = {"kind": kind, "runs_as": op + (f" ({layout})" if layout else "")
                                        + (f" + {activation}" if activation else ""),
                                        "durs": [], "output": outputs[0] if outputs else None}
            info["durs"].append(float(e["dur"]))
    n = len(per_run)
    for info in by_node.values():  # the median run of each node: one stalled run on a shared CPU does not count
        info["us"] = statistics.median(info["durs"] + [0.0] * (n - len(info["durs"])))
    kernel_us = sum(i["us"] for i in by_node.values())
    outside_us = statistics.median(r - sum(float(e["dur"]) for e in events) for r, events in zip(run_us, per_run))

    kinds: dict[str, dict[str, Any]] = {}
    for info in by_node.values():
        k = kinds.setdefault(info["kind"], {"nodes": 0, "us": 0.0, "runs_as": set()})
        k["nodes"] += 1
        k["us"] += info["us"]
        k["runs_as"].add(info["runs_as"])
    for kind in macs:  # a kind with MACs whose nodes did not run (fused away): shown with its MACs
        kinds.setdefault(kind, {"nodes": 0, "us": 0.0, "runs_as": set()})
    ops = [OpTime(kind, k["nodes"], k["us"] / 1e3, k["us"] / kernel_us if kernel_us else 0.0, macs.get(kind, 0),
                  macs.get(kind, 0) / total_macs if total_macs else 0.0, sorted(k["runs_as"]))
           for kind, k in kinds.items()]
    ops.sort(key=lambda o: (-o.ms, o.kind))
    slowest = sorted(by_node.items(), key=lambda item: -item[1]["us"])[:top]
    top_nodes = [NodeTime(name, i["kind"], i["runs_as"], i["us"] / 1e3, i["us"] / kernel_us if kernel_us else 0.0,
                          i["output"]) for name, i in slowest]

    plain_ms = None
    if plain:
        from profiling.cost.latency import measure

        session = _session(path, _options(threads, optimize))
        feed = {session.get_inputs()[0].name: x}
        plain_ms = statistics.median(measure(lambda: session.run(None, feed), warmup=warmup, runs=runs))
    return Breakdown(str(path), tuple(input_shape), threads, warmup, n, statistics.median(run_us) / 1e3,
                     kernel_us / 1e3, outside_us / 1e3, plain_ms, total_macs, ops, top_nodes, len(by_node), notes)


# --- rendering -----------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x:.3f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def overhead_line(b: Breakdown) -> str:
    """One sentence: the profiled run, its kernels, the rest, and the run without the profiler."""
    share = b.overhead_ms / b.run_ms if b.run_ms else 0.0
    plain = (f"; without the profiler a run takes {_ms(b.plain_ms)} ms (median of {b.runs})"
             if b.plain_ms is not None else "")
    return (f"A profiled run takes {_ms(b.run_ms)} ms (median of {b.runs}, {b.nodes_per_run} nodes): "
            f"{_ms(b.kernel_ms)} ms inside the node kernels (the sum of each node's median) and {_ms(b.overhead_ms)} "
            f"ms ({_pct(share)}) outside them (median over the runs) "
            f"(executor, memory planning, input/output copies, the profiler's own bookkeeping){plain}.")


def breakdown_markdown(b: Breakdown, *, peak_gflops: float | None = None) -> str:
    """The per-kind table, the slowest nodes and the overhead line, as Markdown."""
    headers = ["operator kind", "nodes", "ms / run", "share of kernel time", "share of MACs", "GFLOP/s reached"]
    if peak_gflops:
        headers.append("of fp32 matmul peak")
    headers.append("ran as")
    rows = []
    for o in b.ops:
        row = [o.kind, o.nodes, _ms(o.ms), _pct(o.time_share), _pct(o.mac_share) if o.macs else "—",
               f"{o.gflops:.1f}" if o.gflops is not None else "—"]
        if peak_gflops:
            row.append(_pct(o.gflops / peak_gflops) if o.gflops is not None else "—")
        rows.append([*row, ", ".join(o.runs_as) or "—"])
    top = [[i + 1, f"`{t.name}`", t.kind, t.runs_as, _ms(t.ms), _pct(t.time_share),
            "×".join(map(str, t.output_shape)) if t.output_shape else "—"] for i, t in enumerate(b.top)]
    parts = [
        (f"Input {'×'.join(map(str, b.input_shape))}, {b.threads} thread(s), {b.runs} profiled runs after {b.warmup} "
         f"warm-up; MACs counted on the ONNX graph: {b.total_macs / 1e6:.1f} M."),
        "",
        _table(headers, rows),
        "",
        f"Slowest {len(b.top)} nodes:",
        "",
        _table(["#", "node", "kind", "ran as", "ms / run", "share of kernel time", "output"], top),
        "",
        overhead_line(b),
        *[f"Note: {n}" for n in b.notes],
    ]
    return "\n".join(parts)
