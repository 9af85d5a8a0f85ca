"""Prune to a latency target: find the channel ratio by measuring pruned copies, not by counting MACs.

At batch 1 the MACs of a depthwise network do not predict its latency (per-operator overhead
dominates), so ``prune.target: {latency_ms: X}`` is met by timing. A candidate is a deep copy of
the unpruned student pruned at channel ratio r exactly as the prune stage prunes
(:func:`student.prune.pruned_copy` with the ``prune.*`` options), exported to ONNX in a temporary
directory and timed in a fresh process (:mod:`profiling.cost.fresh`).

Where it is measured: the runtime and batch of ``constraints`` (``constraints.runtime``,
``constraints.batch``: what the report checks the deployed model against) with the threads, warm-up,
runs and busy-CPU limit of ``profile`` (``profile.threads``, every usable core when null). For
``runtime: onnx`` that is the fp32 ONNX file (an int8 copy is deployed only when it is faster);
``onnx_int8`` times a copy quantised on random images (for timing only).

The search (:func:`search_latency_ratio`): the ratios of ``GRID`` from the least pruning up, until
one meets the target, then bisection between it and the one below to ``TOLERANCE``: the least
pruning that meets the target, in at most ``len(GRID) + 4`` measurements. It assumes latency falls
as the ratio grows. It never returns a ratio it did not itself measure to meet the target; where
latency is not monotone (noise, a runtime that prefers some widths) it returns the boundary inside
the first bracket, which may not be the least pruning overall, and every measurement is kept in
the curve so the plot shows it. No grid ratio meeting the target is a :class:`UserError` that
names the fastest point measured.

Rounds (``prune.steps`` > 1): the search prunes the unpruned student in one shot; the MACs of the
copy it chose become the last round's goal, and earlier rounds are interpolated by MACs toward it
(:class:`student.prune.StudentPruner` with ``macs_goal``), as for a MAC target. The finished
architecture is timed once more (:func:`final_check`): after fine-tuning between rounds, or with
global pruning, its widths can differ from the measured copy's.

Resume: the search is written to ``student_pruned/latency_curve.json`` before any training and
read back by a resumed run, which does not measure again (timings are not reproducible; the
rounds already saved were pruned to the saved goal).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from core.errors import UserError
from core.files import atomic_write_text
from core.schema import changed_keys
from profiling.report.config import ConstraintsConfig
from profiling.cost.config import ProfileConfig
from profiling.cost.fresh import latency_in_fresh_process
from profiling.cost.latency import LatencyStats
from profiling.cost.machine import other_cpu_load, usable_cores
from student.config import PruneConfig
from student.prune import cost, prune_options, pruned_copy

__all__ = ["CURVE_FILE", "GRID", "RULE", "TOLERANCE", "LatencyPoint", "LatencySearch", "LatencySettings",
           "SubprocessTimer", "Timer", "final_check", "search_latency_ratio", "stage_latency_search"]

#: Channel ratios measured first, least pruning first (0: the unpruned student).
GRID = (0.0, 0.2, 0.4, 0.6, 0.8)
#: Bisection stops when the ratio that meets the target and the one that misses are this close.
TOLERANCE = 0.02
CURVE_FILE = "latency_curve.json"
RULE = ("least-pruned one-shot copy measured to meet the target (grid, then bisection on the channel ratio); "
        "its MACs are the last round's goal, earlier rounds interpolated by MACs")

#: ``timer(net, img_size)`` -> median milliseconds of one call. Tests pass a fake: any
#: deterministic function of the network (of its MACs, say).
Timer = Callable[[nn.Module, int], float]


@dataclass(frozen=True)
class LatencySettings:
    """Where a latency target is measured (see the module docstring for which config key gives what)."""

    runtime: str = "onnx"
    batch: int = 1
    threads: int = 1
    warmup: int = 10
    runs: int = 30
    allow_busy: bool = False
    max_other_load: float = 0.25

    @classmethod
    def from_config(cls, constraints: ConstraintsConfig, profile: ProfileConfig) -> LatencySettings:
        """Runtime and batch of ``constraints``, threads and timing of ``profile``."""
        return cls(runtime=constraints.runtime, batch=constraints.batch, threads=profile.threads or usable_cores(),
                   warmup=profile.warmup, runs=profile.runs, allow_busy=profile.allow_busy,
                   max_other_load=profile.max_other_load)


def _calibration(img_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((4, 3, img_size, img_size), dtype=np.float32) for _ in range(2)]


class SubprocessTimer:
    """The real :data:`Timer`: export to ONNX in a temporary directory, time it in a fresh process.

    The network itself is sent only if the runtime cannot run the file (eager, CUDA): learnt on the
    first call. A busy CPU is waited out ``busy_retries`` times (``busy_wait_s`` each), then it is a
    :class:`UserError`, as is a runtime that cannot run here; ``where`` and ``busy_hint`` name the
    settings to fix.
    """

    def __init__(self, settings: LatencySettings, *, where: str = "constraints.runtime",
                 busy_hint: str = "profile.allow_busy: true", busy_retries: int = 2, busy_wait_s: float = 15.0,
                 log: Callable[[str], None] | None = None) -> None:
        self.settings, self.where, self.busy_hint, self.log = settings, where, busy_hint, log
        self.busy_retries, self.busy_wait_s = busy_retries, busy_wait_s
        self.device: str | None = None  # "cpu (<model>)", from the first figure
        self.last: LatencyStats | None = None  # the last figure in full (p90, the other processes' load)
        self._send_net = False

    def describe(self) -> dict[str, Any]:
        """The settings and device, stored beside every curve."""
        return {**asdict(self.settings), "device": self.device, "timer": "ONNX export, timed in a fresh process"}

    def __call__(self, net: nn.Module, img_size: int) -> float:
        from deploy.export import export_onnx, quantize_int8

        s = self.settings
        with tempfile.TemporaryDirectory(prefix="latency-candidate-") as tmp:
            onnx = export_onnx(net, Path(tmp) / "candidate.onnx", img_size, metadata={"note": "timing only"})
            int8 = quantize_int8(onnx, Path(tmp) / "candidate_int8.onnx", _calibration(img_size)) \
                if s.runtime == "onnx_int8" else None
            busy = 0
            while True:
                reason = self._busy_now()  # checked here first: a child costs seconds of CPU to start
                if reason is None:
                    stats = latency_in_fresh_process(
                        net if self._send_net else onnx, img_size, s.runtime, batch=s.batch, threads=s.threads,
                        warmup=s.warmup, runs=s.runs, onnx_path=onnx if self._send_net else None,
                        onnx_int8_path=int8, allow_busy=s.allow_busy, max_other_load=s.max_other_load)
                    if stats.median_ms is not None:
                        self.device, self.last = stats.device, stats
                        return stats.median_ms
                    reason = stats.skipped or "no figure"
                    if not reason.startswith("CPU busy"):
                        if not self._send_net:  # the runtime needs the network, not the file: once more with it
                            self._send_net = True
                            continue
                        raise UserError(f"{self.where}: '{s.runtime}' cannot be timed here ({reason}); "
                                        "choose a runtime that runs on this machine, e.g. onnx")
                busy += 1
                if busy > self.busy_retries:
                    raise UserError(f"no latency figure: {reason} ({busy} tries); free the machine, or measure "
                                    f"anyway with {self.busy_hint}, knowing that the figures are skewed")
                if self.log:
                    self.log(f"[latency] {reason}; waiting {self.busy_wait_s:.0f} s")
                time.sleep(self.busy_wait_s)

    def _busy_now(self) -> str | None:
        """Why not to start timing now (other processes load the CPU), or None."""
        s = self.settings
        load = None if s.allow_busy else other_cpu_load()
        if load is None or load <= s.max_other_load:
            return None
        return f"CPU busy before timing: other processes used {load:.2f} cores (limit {s.max_other_load})"


@dataclass(frozen=True)
class LatencyPoint:
    """One measured candidate: channel ratio, median ms, and its cost (report's MACs, params); with
    the real timer also the p90 and the cores other processes kept busy while it was timed."""

    ratio: float
    ms: float
    macs: int
    params: int
    meets: bool
    p90_ms: float | None = None
    other_cpu_load: float | None = None


@dataclass
class LatencySearch:
    """A finished search: the chosen point and every measurement, in the order taken."""

    target_ms: float
    chosen: LatencyPoint
    points: list[LatencyPoint]
    macs_unpruned: int
    params_unpruned: int
    grid: list[float] = field(default_factory=lambda: list(GRID))
    tolerance: float = TOLERANCE
    measured: dict[str, Any] | None = None  # the timer's settings and device

    def curve(self) -> list[LatencyPoint]:
        """The points by ratio (the plot's x)."""
        return sorted(self.points, key=lambda p: p.ratio)

    def to_json(self) -> dict[str, Any]:
        return {"target_ms": self.target_ms, "rule": RULE, "measured": self.measured, "grid": list(self.grid),
                "tolerance": self.tolerance, "macs_unpruned": self.macs_unpruned,
                "params_unpruned": self.params_unpruned, "chosen": asdict(self.chosen),
                "measurements": len(self.points), "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencySearch:
        return cls(target_ms=data["target_ms"], chosen=LatencyPoint(**data["chosen"]),
                   points=[LatencyPoint(**p) for p in data["points"]], macs_unpruned=data["macs_unpruned"],
                   params_unpruned=data["params_unpruned"], grid=list(data["grid"]), tolerance=data["tolerance"],
                   measured=data.get("measured"))


def _describe(timer: Timer) -> dict[str, Any] | None:
    describe = getattr(timer, "describe", None)
    return describe() if callable(describe) else None


def search_latency_ratio(net: nn.Module, example: Tensor, target_ms: float, timer: Timer, *,
                         options: dict[str, Any] | None = None,
                         loss_fn: Callable[[nn.Module], Tensor] | None = None, grid: tuple[float, ...] = GRID,
                         tolerance: float = TOLERANCE, log: Callable[[str], None] | None = None) -> LatencySearch:
    """The least channel ratio whose pruned copy of ``net`` runs within ``target_ms`` by ``timer``
    (see the module docstring for the search and what non-monotone timings do). ``net`` is left as
    it is; ``options`` are :func:`student.prune.prune_channels`' (default: ``PruneConfig``'s), and
    Taylor importance takes its gradients from ``loss_fn`` on a copy."""
    if not target_ms > 0:
        raise UserError(f"prune.target: latency_ms must be > 0, got {target_ms}")
    if not tolerance > 0 or list(grid) != sorted(set(grid)) or not all(0.0 <= r < 1.0 for r in grid):
        raise ValueError(f"need tolerance > 0 and an increasing grid in [0, 1); got {tolerance}, {grid}")
    options = dict(prune_options(PruneConfig()) if options is None else options)
    base = copy.deepcopy(net)
    if options.get("importance") == "taylor":
        if loss_fn is None:
            raise ValueError("taylor importance needs loss_fn(net) for its gradients")
        loss_fn(base).backward()
    img_size = int(example.shape[-1])
    macs0, params0 = cost(base, example)
    points: dict[float, LatencyPoint] = {}

    def measure(ratio: float) -> LatencyPoint:
        twin = copy.deepcopy(base) if ratio == 0 else pruned_copy(base, example, ratio, **options)[0]
        macs, params = cost(twin, example)
        ms = float(timer(twin.eval(), img_size))
        stats = getattr(timer, "last", None)
        point = points[ratio] = LatencyPoint(ratio, ms, macs, params, ms <= target_ms,
                                             getattr(stats, "p90_ms", None), getattr(stats, "other_cpu_load", None))
        if log:
            busy = "" if point.other_cpu_load is None else f"; other processes used {point.other_cpu_load:.2f} cores"
            log(f"[latency] channel ratio {ratio:.3f}: {ms:.3f} ms ({'meets' if point.meets else 'misses'} "
                f"{target_ms} ms), {macs / 1e6:.2f} M MACs, {params / 1e6:.3f} M params{busy}")
        return point

    lo, hi = None, None
    for ratio in grid:
        if measure(ratio).meets:
            hi = ratio
            break
        lo = ratio
    if hi is None:
        best = min(points.values(), key=lambda p: p.ms)
        about = _describe(timer) or {}
        where = f" on {about['runtime']}, batch {about['batch']}, {about['threads']} thread(s)" if about else ""
        raise UserError(
            f"prune.target {{latency_ms: {target_ms}}} is out of reach{where}: the fastest of {len(points)} pruned "
            f"copies measured was channel ratio {best.ratio:.2f} at {best.ms:.3f} ms ({best.macs / 1e6:.2f} M MACs, "
            f"{best.params / 1e6:.3f} M params); choose a smaller student (student.arch) or image size "
            "(student.img_size), or a looser target")
    if lo is not None:  # bisect: lo misses, hi meets
        while hi - lo > tolerance:
            mid = round((lo + hi) / 2, 6)
            if measure(mid).meets:
                hi = mid
            else:
                lo = mid
    return LatencySearch(target_ms=target_ms, chosen=points[hi], points=list(points.values()), macs_unpruned=macs0,
                         params_unpruned=params0, grid=list(grid), tolerance=tolerance, measured=_describe(timer))


def final_check(net: nn.Module, example: Tensor, timer: Timer, target_ms: float) -> dict[str, Any]:
    """The finished pruned architecture timed once more (its widths may differ from the measured
    copy's after rounds of fine-tuning or with global pruning); ``net`` is left as it is."""
    twin = copy.deepcopy(net).eval()
    macs, params = cost(twin, example)
    ms = float(timer(twin, int(example.shape[-1])))
    stats = getattr(timer, "last", None)
    return {"ms": ms, "macs": macs, "params": params, "meets": ms <= target_ms,
            "p90_ms": getattr(stats, "p90_ms", None), "other_cpu_load": getattr(stats, "other_cpu_load", None)}


def stage_latency_search(stage_dir: Path, net: nn.Module, example: Tensor, cfg: PruneConfig, timer: Timer, *,
                         config: dict[str, Any], loss_fn: Callable[[nn.Module], Tensor] | None = None,
                         log: Callable[[str], None] | None = None, main: bool = True,
                         sync: Callable[[], None] = lambda: None) -> LatencySearch:
    """The prune stage's search, measured once: saved to ``stage_dir/latency_curve.json`` (with the
    stage ``config`` it was made for) before any training, and read back on resume.

    Under torchrun only the ``main`` process measures; ``sync`` (a barrier) lets the others read its
    file, so every process prunes to the same goal. A saved search made for another config is
    refused (the saved rounds were pruned to its goal), naming the keys that changed.
    """
    path = Path(stage_dir) / CURVE_FILE
    now = json.loads(json.dumps(config, default=str))
    if main:
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8")).get("config") or {}
            if saved != now:
                keys = ", ".join(changed_keys(saved, now)[:8]) or "unknown keys"
                raise UserError(f"'{path}' was measured for a different config (changed: {keys}); rerun with "
                                "--force prune to search again, or choose a new run.name")
            if log:
                log(f"[prune] latency search reused from {path} (not measured again)")
        else:
            search = search_latency_ratio(net, example, cfg.target["latency_ms"], timer, options=prune_options(cfg),
                                          loss_fn=loss_fn, log=log)
            atomic_write_text(path, json.dumps({**search.to_json(), "config": now}, indent=2))
    sync()
    return LatencySearch.from_json(json.loads(path.read_text(encoding="utf-8")))
