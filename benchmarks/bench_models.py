"""Teacher, student, pruned students and int8: params, MACs, latency per runtime x batch, distance from the limit.

    python -m benchmarks.bench_models [--quick] [--targets 0.5,0.3] [--latency-ms 0.7] [--batch-sizes 1 32] [--allow-busy]

The architectures, input sizes and pruning settings are the ``configs/vit_to_mbv3.yaml`` recipe's
(read with :func:`distill.config.load_config`). Every network is built with random weights
(``pretrained=False``: no hub access here); latency does not depend on the weights. The student is
pruned structurally with the recipe's :class:`student.prune.StudentPruner` settings to each MAC
target, without training (pruning removes channels; which ones does not change the time), and with
``--latency-ms X`` to a measured batch-1 ONNX Runtime time as ``prune.target: {latency_ms: X}`` does
(candidates exported and timed in a fresh process, then bisection:
:func:`student.latency_target.search_latency_ratio`). Each
student is exported to ONNX fp32 and static int8 (calibrated on random-normal images: for timing
only), the teacher to ONNX fp32. Each model is then timed with :func:`profiling.cost.profile_model.profile_model`
on every usable core, and read against the targets of the issue:

- the deployed pruned student (the fastest of ONNX fp32, int8 and OpenVINO at batch 1) at least 50x faster than
  the teacher in eager PyTorch at batch 1,
- with at most 1.5% of the teacher's MACs,
- and within 2x of its own FLOP-limit time (``2 x MACs / fp32 matmul peak``).

Where a deployed pruned student misses the last target at batch 1, ONNX Runtime's profiler
(:mod:`profiling.cost.ort_breakdown`) shows why: time and MACs per operator kind (depthwise
convolutions apart from dense ones), the slowest nodes, and the time spent outside the kernels,
with sentences computed from that breakdown.

``--quick`` checks that the script runs (small models at 64 px, 3 timed runs, batch 1 and 2) and
writes to ``benchmarks/out/RESULTS-quick.md``; its figures are not measurements.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import OUT, LoadWatch, md_table, record, wait_for_idle_cpu
from distill.config import Config, load_config
from profiling.cost.latency import matmul_peak_gflops
from profiling.cost.machine import other_cpu_load, usable_cores
from profiling.cost.ort_breakdown import Breakdown, breakdown_markdown, ort_breakdown
from profiling.cost.profile_model import ModelEntry, profile_model
from deploy.export import export_onnx, quantize_int8
from deploy.openvino_runtime import openvino_version
from student.model import build_student
from student.latency_target import LatencySettings, SubprocessTimer, search_latency_ratio
from student.prune import StudentPruner, prune_options
from teacher.model import build_teacher

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "vit_to_mbv3.yaml"
QUICK_OVERRIDES = ["teacher.arch=vit_tiny_patch16_224", "teacher.img_size=64",
                   "student.arch=mobilenetv3_small_100", "student.img_size=64"]

SPEEDUP_MIN = 50.0  # deployed pruned student vs teacher eager, batch 1
MAC_SHARE_MAX = 0.015  # of the teacher's MACs
X_IDEAL_MAX = 2.0  # median / own FLOP-limit time
DEPLOY_RUNTIMES = ("onnx", "onnx_int8", "openvino")  # openvino where the package is installed
BREAKDOWN_TOP = 10  # slowest single nodes listed per profiled model
CALIBRATION = (4, 8)  # batches x images of random-normal int8 calibration data


@dataclass
class Settings:
    batch_sizes: list[int]
    warmup: int
    runs: int
    teacher_batch_warmup: int  # the teacher at batches > 1 (seconds per call): fewer warm-up calls
    teacher_batch_runs: int
    teacher_batch_budget_s: float  # fewer timed runs (not under 10) when the teacher's batch timing would exceed it
    allow_busy: bool


@dataclass
class Model:
    key: str  # file stem
    label: str  # table label
    role: str  # teacher | student | pruned
    entry: ModelEntry
    target: dict[str, float] | None = None
    pruning: list[dict[str, Any]] | None = None
    profiles: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)  # batch -> profile_model result
    plans: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # batch -> (warm-up, timed runs)


# --- building ------------------------------------------------------------------------------------


def _targets(text: str | None, cfg: Config, latency: str | None = None) -> list[dict[str, float]]:
    """The recipe's own prune target, then ``{macs: t}`` for each of ``text`` (default 0.3), then
    ``{latency_ms: x}`` for each of ``latency``, deduplicated."""
    extra = [0.3] if text is None else [float(t) for t in text.split(",") if t.strip()]
    targets = [] if text is not None else [dict(cfg.prune.target)]
    for t in extra:
        if not 0.0 < t < 1.0:
            raise SystemExit(f"--targets: {t} is not a fraction of MACs kept in (0, 1)")
        targets.append({"macs": t})
    for ms in ([] if latency is None else [float(x) for x in latency.split(",") if x.strip()]):
        if not ms > 0:
            raise SystemExit(f"--latency-ms: {ms} is not a time in ms > 0")
        targets.append({"latency_ms": ms})
    unique: list[dict[str, float]] = []
    for t in targets:
        if t not in unique:
            unique.append(t)
    return unique


def _target_name(target: dict[str, float]) -> str:
    metric, kept = next(iter(target.items()))
    if metric == "latency_ms":
        return f"ms{kept:g}".replace(".", "p")
    return f"{metric}{round(kept * 100):02d}"


def _target_text(target: dict[str, float]) -> str:
    metric, kept = next(iter(target.items()))
    return f"{kept:g} ms on onnx" if metric == "latency_ms" else f"{metric} {kept:g}"


def _taylor_loss(img_size: int):
    """Cross-entropy on random images: only used if the recipe asks for Taylor importance."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, img_size, img_size, generator=g), torch.randint(0, 2, (8,), generator=g)

    def loss_fn(net: nn.Module) -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    return loss_fn


def _prune(student: nn.Module, img_size: int, cfg: Config, target: dict[str, float], *,
           allow_busy: bool = False) -> tuple[nn.Module, list]:
    """A pruned copy of ``student`` (the recipe's pruning settings, ``target``) and its rounds."""
    net = copy.deepcopy(student)
    prune_cfg = dataclasses.replace(cfg.prune, target=dict(target))
    example = torch.zeros(1, 3, img_size, img_size)
    macs_goal = None
    if "latency_ms" in target:  # as the prune stage does: measured candidates, then the MACs of the one that meets it
        timer = SubprocessTimer(LatencySettings(runtime="onnx", batch=1, threads=usable_cores(), allow_busy=allow_busy),
                                where="bench_models --latency-ms", busy_hint="an idle CPU", log=print)
        search = search_latency_ratio(net, example, target["latency_ms"], timer, options=prune_options(prune_cfg),
                                      loss_fn=_taylor_loss(img_size), log=print)
        macs_goal = search.chosen.macs
    pruner = StudentPruner(net, example, prune_cfg, loss_fn=_taylor_loss(img_size), macs_goal=macs_goal)
    while not pruner.done:
        pruner.step()
    return net.eval(), pruner.rounds


def _ratios(rounds: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['ratio']:.3f}" for r in rounds)


def _calibration(img_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    batches, n = CALIBRATION
    return [rng.standard_normal((n, 3, img_size, img_size), dtype=np.float32) for _ in range(batches)]


def _export(net: nn.Module, img_size: int, out_dir: Path, key: str, cfg: Config, *,
            int8: bool) -> tuple[Path, Path | None]:
    meta = {"model": key, "note": "random weights (pretrained=False): for timing only"}
    fp32 = export_onnx(net, out_dir / f"{key}.onnx", img_size, opset=cfg.export.opset, dynamo=cfg.export.dynamo,
                       metadata=meta)
    if not int8:
        return fp32, None
    return fp32, quantize_int8(fp32, out_dir / f"{key}_int8.onnx", _calibration(img_size))


def build_models(cfg: Config, targets: list[dict[str, float]], out_dir: Path, *,
                 allow_busy: bool = False) -> list[Model]:
    teacher = build_teacher(dataclasses.replace(cfg.teacher, pretrained=False, weights=None))
    student = build_student(dataclasses.replace(cfg.student, pretrained=False, weights=None))
    t_net, t_size = teacher.net.eval(), teacher.img_size
    s_net, s_size = student.net.eval(), student.img_size

    models = []
    start = time.perf_counter()
    fp32, _ = _export(t_net, t_size, out_dir, "teacher", cfg, int8=False)
    models.append(Model("teacher", f"teacher {cfg.teacher.arch} @{t_size}", "teacher",
                        ModelEntry(t_net, t_size, onnx=fp32)))
    fp32, int8 = _export(s_net, s_size, out_dir, "student", cfg, int8=True)
    models.append(Model("student", f"student {cfg.student.arch} @{s_size}", "student",
                        ModelEntry(s_net, s_size, onnx=fp32, onnx_int8=int8)))
    print(f"built and exported teacher and student in {time.perf_counter() - start:.0f} s", flush=True)
    for target in targets:
        start = time.perf_counter()
        net, rounds = _prune(s_net, s_size, cfg, target, allow_busy=allow_busy)
        key = f"student_pruned_{_target_name(target)}"
        fp32, int8 = _export(net, s_size, out_dir, key, cfg, int8=True)
        models.append(Model(key, f"pruned student ({_target_text(target)})", "pruned",
                            ModelEntry(net, s_size, onnx=fp32, onnx_int8=int8), target=target, pruning=rounds))
        print(f"pruned to {target} in {len(rounds)} round(s) (channel ratios {_ratios(rounds)}), exported, "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    return models


# --- measuring -----------------------------------------------------------------------------------


def _runtimes(entry: ModelEntry) -> list[str]:
    runtimes = ["eager", "eager_channels_last"]
    if entry.onnx is not None:
        runtimes.append("onnx")
    if entry.onnx_int8 is not None:
        runtimes.append("onnx_int8")
    if entry.onnx is not None and openvino_version() is not None:
        runtimes.append("openvino")
    return runtimes


def _probe_s(net: nn.Module, img_size: int, batch: int, threads: int) -> float:
    """Seconds of one eager call at ``batch`` (after one untimed call): to bound the teacher's batch timing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(batch, 3, img_size, img_size)
        with torch.inference_mode():
            net(x)
            start = time.perf_counter()
            net(x)
            return time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


def _plan(model: Model, batch: int, threads: int, s: Settings, notes: list[str]) -> tuple[int, int]:
    """Warm-up and timed runs for ``model`` at ``batch``."""
    if model.role != "teacher" or batch == 1:
        return s.warmup, s.runs
    warmup, runs = s.teacher_batch_warmup, s.teacher_batch_runs
    per_call = _probe_s(model.entry.net, model.entry.img_size, batch, threads)
    calls = len(_runtimes(model.entry))
    projected = per_call * calls * (warmup + runs)
    print(f"teacher at batch {batch}: {per_call:.2f} s per eager call, ~{projected:.0f} s projected for "
          f"{calls} runtimes x ({warmup} + {runs}) calls", flush=True)
    if projected > s.teacher_batch_budget_s:
        fitted = max(10, math.floor(s.teacher_batch_budget_s / (per_call * calls)) - warmup)
        if fitted < runs:
            notes.append(f"the teacher at batch {batch} was timed {fitted} times per runtime, not {runs}: one eager "
                         f"call took {per_call:.2f} s and {runs} runs were projected at {projected:.0f} s, over the "
                         f"{s.teacher_batch_budget_s:.0f} s budget (--teacher-batch-budget-s)")
            runs = fitted
    return warmup, runs


def measure_all(models: list[Model], s: Settings, threads: int, peak: float, notes: list[str]) -> None:
    for model in models:
        for batch in s.batch_sizes:
            warmup, runs = model.plans[batch] = _plan(model, batch, threads, s, notes)
            start = time.perf_counter()
            model.profiles[batch] = profile_model(
                model.entry, runtimes=_runtimes(model.entry), batch_sizes=[batch], threads=threads, warmup=warmup,
                runs=runs, allow_busy=s.allow_busy, strict=True, peak_memory=False, peak_gflops=peak)
            print(f"measured {model.label} at batch {batch} ({warmup} warm-up + {runs} runs) in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


# --- tables --------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """Three significant figures, no exponent."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    digits = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{digits}f}"


def _latency(model: Model, runtime: str, batch: int) -> dict[str, Any] | None:
    profile = model.profiles.get(batch)
    return None if profile is None else profile["latency"].get(f"{runtime}_b{batch}")


def _median(model: Model, runtime: str, batch: int) -> float | None:
    stats = _latency(model, runtime, batch)
    return None if stats is None else stats.get("median_ms")


def _missing(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "not measured"
    reason = stats.get("skipped") or ""
    return "withheld (busy CPU)" if reason.startswith("CPU busy") else f"n/a ({reason})"


def _ideal(model: Model, batch: int) -> float | None:
    return model.profiles[batch].get("ideal_ms", {}).get(f"b{batch}")


def results_table(models: list[Model], batches: list[int]) -> str:
    teacher_macs = models[0].profiles[batches[0]]["macs"]
    rows = []
    for model in models:
        first = model.profiles[batches[0]]
        share = f"{100 * first['macs'] / teacher_macs:.2f}%"
        for runtime in _runtimes(model.entry):
            for batch in batches:
                stats, ideal = _latency(model, runtime, batch), _ideal(model, batch)
                ideal_text = _num(ideal) if ideal else "—"
                if stats is None or stats.get("median_ms") is None:
                    figures = [_missing(stats), "—", "—", ideal_text, "—"]
                else:
                    x_ideal = f"{stats['median_ms'] / ideal:.1f}×" if ideal else "—"
                    figures = [_num(stats["median_ms"]), _num(stats["p90_ms"]), f"{stats['images_per_s']:.1f}",
                               ideal_text, x_ideal]
                rows.append([model.label, f"{first['params'] / 1e6:.2f} M", f"{first['macs'] / 1e6:.1f}", share,
                             runtime, batch, *figures])
    return md_table(["model", "params", "MACs (M)", "% of teacher MACs", "runtime", "batch", "median ms", "p90 ms",
                     "images/s", "ideal ms", "× ideal"], rows)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


@dataclass
class Deployed:
    """A student's deployed model at batch 1 (the fastest of :data:`DEPLOY_RUNTIMES` timed) against the targets."""

    model: Model
    runtime: str | None  # None: no deployment runtime was timed
    note: str  # why another runtime was not compared ("" if all were)
    ms: float | None
    speedup: float | None
    share: float  # of the teacher's MACs
    x_ideal: float | None

    @property
    def x_ideal_ok(self) -> bool | None:
        return None if self.x_ideal is None else self.x_ideal <= X_IDEAL_MAX


def deployed(models: list[Model]) -> list[Deployed]:
    """The deployed model of every student (``models[1:]``; ``models[0]`` is the teacher)."""
    teacher = models[0]
    teacher_ms = _median(teacher, "eager", 1)
    teacher_macs = teacher.profiles[1]["macs"]
    out = []
    for model in models[1:]:
        candidates = [(_median(model, r, 1), r) for r in DEPLOY_RUNTIMES if r in _runtimes(model.entry)]
        timed = [(ms, r) for ms, r in candidates if ms is not None]
        share = model.profiles[1]["macs"] / teacher_macs
        if not timed:
            out.append(Deployed(model, None, _missing(_latency(model, "onnx", 1)), None, None, share, None))
            continue
        ms, runtime = min(timed)
        untimed = [r for m, r in candidates if m is None]
        note = f"{', '.join(untimed)}: {_missing(_latency(model, untimed[0], 1))}" if untimed else ""
        ideal = _ideal(model, 1)
        out.append(Deployed(model, runtime, note, ms, teacher_ms / ms if teacher_ms is not None else None, share,
                            ms / ideal if ideal else None))
    return out


def targets_table(models: list[Model]) -> str:
    """The deployed model (faster of ONNX fp32 / int8 at batch 1) of each student against the issue's targets."""
    teacher = models[0]
    rows = []
    for d in deployed(models):
        model = d.model
        label = model.label if model.role == "pruned" else f"{model.label} (reference: unpruned)"
        if d.runtime is None:
            rows.append([label, "—", d.note, "—", "n/a", f"{100 * d.share:.2f}%",
                         _verdict(d.share <= MAC_SHARE_MAX),
                         "—", "n/a"])
            continue
        # the best of what was timed; an untimed runtime might have been faster
        runtime = d.runtime + (f" ({d.note})" if d.note else "")
        rows.append([label, runtime, _num(d.ms),
                     f"{d.speedup:.1f}×" if d.speedup is not None else _missing(_latency(teacher, "eager", 1)),
                     _verdict(None if d.speedup is None else d.speedup >= SPEEDUP_MIN),
                     f"{100 * d.share:.2f}%", _verdict(d.share <= MAC_SHARE_MAX),
                     f"{d.x_ideal:.2f}×" if d.x_ideal is not None else "—", _verdict(d.x_ideal_ok)])
    return md_table(["deployed model", "runtime (best at batch 1)", "median ms", "speed-up vs teacher eager b1",
                     f"≥ {SPEEDUP_MIN:g}×", "% of teacher MACs", f"≤ {100 * MAC_SHARE_MAX:g}%", "× own ideal",
                     f"≤ {X_IDEAL_MAX:g}×"], rows)


def pruning_table(models: list[Model]) -> str:
    rows = []
    for model in models:
        if model.pruning is None:
            continue
        first, last = model.pruning[0], model.pruning[-1]
        rows.append([model.label, _target_text(model.target), len(model.pruning), _ratios(model.pruning),
                     f"{first['macs_before'] / 1e6:.1f} → {last['macs_after'] / 1e6:.1f}",
                     f"{100 * last['macs_kept']:.1f}%",
                     f"{first['params_before'] / 1e6:.2f} → {last['params_after'] / 1e6:.2f}"])
    return md_table(["model", "target", "rounds", "channel ratio per round", "MACs (M, fvcore, BatchNorm folded)",
                     "MACs kept", "params (M)"], rows)


# --- where the batch-1 time goes ----------------------------------------------------------------


def _deployed_file(d: Deployed) -> Path | None:
    """The ONNX file ONNX Runtime profiles for a deployed model: int8 where int8 was the fastest, else
    fp32 (OpenVINO runs that same fp32 file)."""
    entry = d.model.entry
    return entry.onnx_int8 if d.runtime == "onnx_int8" else entry.onnx


def profile_breakdowns(models: list[Model], s: Settings, threads: int) -> dict[str, Breakdown | str]:
    """ONNX Runtime's profiler breakdown (model key -> :class:`Breakdown`, or why there is none) of
    every deployed pruned student that misses the ``× own ideal`` target at batch 1."""
    out: dict[str, Breakdown | str] = {}
    for d in deployed(models):
        if d.model.role != "pruned" or d.x_ideal_ok is not False:
            continue
        path = _deployed_file(d)
        size = d.model.entry.img_size
        start = time.perf_counter()
        try:
            out[d.model.key] = ort_breakdown(path, (1, 3, size, size), threads=threads, warmup=s.warmup,
                                             runs=s.runs, top=BREAKDOWN_TOP)
        except Exception as exc:  # noqa: BLE001 (ONNX Runtime's errors derive from Exception alone)
            # after every timing: say what failed rather than lose the run's figures
            out[d.model.key] = f"the profiler breakdown of `{path.name}` failed: {type(exc).__name__}: {exc}"
        print(f"profiled {d.model.label} ({path.name}) node by node in {time.perf_counter() - start:.0f} s",
              flush=True)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100 * x:.1f}%"


def breakdown_sentences(b: Breakdown, peak: float) -> list[str]:
    """What the breakdown says, computed from it: the depthwise convolutions' share of the MACs and
    of the kernel time, the slowest kind, and how far the kernels alone are from the FLOP limit."""
    rows = {o.kind: o for o in b.ops}
    dw = rows.get("Conv depthwise")
    lines = []
    if dw is not None and dw.nodes:
        reach = f", reaching {dw.gflops:.1f} GFLOP/s ({_pct(dw.gflops / peak)} of the fp32 matmul peak)" if dw.gflops \
            else ""
        lines.append(f"Depthwise convolutions hold {_pct(dw.mac_share)} of the MACs and {_pct(dw.time_share)} of the "
                     f"kernel time{reach}.")
    else:
        lines.append("The graph has no depthwise convolutions.")
    slowest = b.ops[0]
    lines.append(f"The slowest kind is {slowest.kind} ({slowest.nodes} nodes): {_pct(slowest.time_share)} of the "
                 f"kernel time for {_pct(slowest.mac_share)} of the MACs.")
    ideal = 2 * b.total_macs / (peak * 1e6)
    without = sum(o.time_share for o in b.ops if not o.macs)
    lines.append(f"The kernels alone take {b.kernel_ms / ideal:.1f}× the FLOP-limit time of the graph's MACs "
                 f"({ideal:.3f} ms at {peak:.1f} GFLOP/s); nodes that compute no MACs (layout reorders, "
                 f"element-wise ops, pooling) take {_pct(without)} of the kernel time, and "
                 f"{_pct(b.overhead_ms / b.run_ms)} of a profiled run is spent outside the kernels.")
    return lines


def breakdown_section(models: list[Model], results: dict[str, Breakdown | str], peak: float) -> list[str]:
    if not results:
        return []
    by_key = {m.key: m for m in models}
    lines = ["", "### Where the batch-1 time goes (ONNX Runtime profiler)", "",
             (f"Each deployed pruned student over {X_IDEAL_MAX:g}× its own FLOP-limit time, run once more in ONNX "
              "Runtime with `SessionOptions.enable_profiling` (`profiling/cost/ort_breakdown.py`): the file that was "
              "deployed (int8 where int8 was the fastest; OpenVINO runs the fp32 file, profiled here in ONNX Runtime), "
              "same threads and runs as above. Times are per node of ONNX Runtime's optimized graph (activations fused "
              "into the convolutions, `nchwc` blocked layouts with their reorder nodes); MACs are counted on the ONNX "
              "graph, convolutions told apart by their `group` and weight shape; GFLOP/s reached = 2 × MACs / time.")]
    for key, b in results.items():
        model = by_key[key]
        lines += ["", f"#### {model.label}", ""]
        if isinstance(b, str):
            lines.append(f"Not profiled: {b}.")
            continue
        fv = model.profiles[1]["macs"]
        lines += [" ".join(breakdown_sentences(b, peak)),
                  (f"(MACs: {b.total_macs / 1e6:.1f} M on the ONNX graph, {fv / 1e6:.1f} M by fvcore with BatchNorm "
                   "folded, as in the tables above.)"), "",
                  breakdown_markdown(b, peak_gflops=peak)]
    return lines


def report(cfg: Config, models: list[Model], s: Settings, threads: int, peak: float, notes: list[str],
           breakdowns: dict[str, Breakdown | str] | None = None) -> str:
    p = cfg.prune
    teacher_b1 = models[0].profiles.get(1, {}).get("latency", {}).get("eager_b1") or {}
    teacher_line = (f"{_num(teacher_b1['median_ms'])} ms" if teacher_b1.get("median_ms") is not None
                    else _missing(teacher_b1 or None))
    teacher_plans = "; ".join(f"batch {b}: {r} after {w}" for b, (w, r) in models[0].plans.items() if b > 1)
    runs = f"{s.runs} timed runs after {s.warmup} warm-up calls per figure" + (
        f", except the teacher at {teacher_plans}" if teacher_plans else "")
    lines = [
        f"Architectures from `{RECIPE.relative_to(ROOT)}`: teacher `{cfg.teacher.arch}` at "
        f"{models[0].entry.img_size} px, student `{cfg.student.arch}` at {models[1].entry.img_size} px; pruning as the "
        f"recipe sets it (importance {p.importance}, global_pruning {p.global_pruning}, round_to {p.round_to}, "
        f"prune_se {p.prune_se}, {p.steps} round(s)), without the fine-tuning between rounds.",
        "- Weights: random (`pretrained=False`, no hub access here). Latency does not depend on the weights; "
        + ("with `global_pruning: false` every layer loses the same fraction of its channels, so the pruned widths "
           "do not depend on them either." if not p.global_pruning else
           "with `global_pruning: true` the pruned widths depend on the weights' magnitudes, so a trained student "
           "pruned to the same target may have other widths (and a somewhat different latency)."),
        "- int8: static QDQ from `student/export.py: quantize_int8`, calibrated on "
        f"{CALIBRATION[0] * CALIBRATION[1]} random-normal images: for timing only, its outputs mean nothing.",
        f"- Threads: {threads} (every usable core), for PyTorch and ONNX Runtime. {runs}. Peak memory not measured.",
        f"- FLOP limit: fp32 matmul peak **{peak:.1f} GFLOP/s** with {threads} thread(s) (best of 10 1024×1024 "
        "matmuls); ideal ms = 2 × MACs × batch / peak; × ideal = median / ideal (int8 rows too are read against "
        "the fp32 limit).",
        "- MACs per image: fvcore, attention counted, BatchNorm excluded (it folds into the convolution on export).",
        f"- Teacher eager, batch 1: {teacher_line} (the speed-up reference).",
        *[f"- Note: {n}" for n in notes],
        "",
        "### Pruned students",
        "",
        pruning_table(models),
        "",
        "### Cost and latency",
        "",
        results_table(models, s.batch_sizes),
        "",
        "### Targets (deployed = the fastest at batch 1 of ONNX Runtime fp32, int8 and OpenVINO fp32 where installed)",
        "",
        targets_table(models) if 1 in s.batch_sizes else "Not checked: batch 1 was not measured.",
        *breakdown_section(models, breakdowns or {}, peak),
    ]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_models", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="check that the script runs (small models, few runs)")
    p.add_argument("--targets", help="MAC fractions kept, comma-separated (default: the recipe's target and 0.3)")
    p.add_argument("--latency-ms", help="also prune to these batch-1 ONNX Runtime latencies (ms, comma-separated), "
                                        "searched on this machine as prune.target: {latency_ms: X} is")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 32 (--quick: 1 2)")
    p.add_argument("--teacher-batch-runs", type=int, default=30,
                   help="timed runs for the teacher at batches above 1 (default 30)")
    p.add_argument("--teacher-batch-budget-s", type=float, default=360.0,
                   help="seconds the teacher's batch>1 timing may take; fewer runs (not under 10) beyond it")
    p.add_argument("--allow-busy", action="store_true",
                   help="do not wait for an idle CPU, and keep figures timed while other processes used it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    started = time.perf_counter()
    cfg = load_config(RECIPE, QUICK_OVERRIDES if args.quick else [])
    if args.quick:
        s = Settings(args.batch_sizes or [1, 2], warmup=1, runs=3, teacher_batch_warmup=1, teacher_batch_runs=3,
                     teacher_batch_budget_s=args.teacher_batch_budget_s, allow_busy=args.allow_busy)
    else:
        s = Settings(args.batch_sizes or [1, 32], warmup=10, runs=30, teacher_batch_warmup=5,
                     teacher_batch_runs=args.teacher_batch_runs, teacher_batch_budget_s=args.teacher_batch_budget_s,
                     allow_busy=args.allow_busy)
    s.batch_sizes = sorted(set(s.batch_sizes))
    out_dir = OUT / ("bench_models-quick" if args.quick else "bench_models")
    targets = _targets(args.targets, cfg, args.latency_ms)
    threads = usable_cores()
    print(f"teacher {cfg.teacher.arch}, student {cfg.student.arch}, prune targets {targets}, batches "
          f"{s.batch_sizes}, {threads} thread(s); files in {out_dir}", flush=True)

    models = build_models(cfg, targets, out_dir, allow_busy=args.allow_busy)

    notes: list[str] = []
    if args.allow_busy or args.quick:
        # --quick checks the script, not the machine: it does not wait (figures from a busy CPU are still withheld
        # unless --allow-busy).
        load_before = other_cpu_load(2.0)
        load_before = math.nan if load_before is None else load_before
        if args.allow_busy:
            notes.append("--allow-busy: figures were kept even where other processes used the CPU")
    else:
        load_before = wait_for_idle_cpu()
    watch = LoadWatch()
    peak = matmul_peak_gflops(threads)
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s with {threads} thread(s)", flush=True)
    measure_all(models, s, threads, peak, notes)
    breakdowns = profile_breakdowns(models, s, threads) if 1 in s.batch_sizes else {}
    body = report(cfg, models, s, threads, peak, notes, breakdowns)
    record("Teacher, student, pruned students and int8: cost, latency and the FLOP limit", body,
           quick=args.quick, load_before=load_before, watch=watch, wall_s=time.perf_counter() - started)


if __name__ == "__main__":
    main()
