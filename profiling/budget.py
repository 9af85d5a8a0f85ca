"""Which student, input size and pruning fit a latency budget on this machine, before any training.

    python -m profiling.budget --latency-ms 2.0 [--runtime onnx] [--img-size 224 160 128]
        [--students mobilenetv3_small_100 mobilenetv3_large_100 efficientnet_lite0] [--ratios 0 0.3 0.5]
        [--threads N] [--batch 1] [--warmup 10] [--runs 30] [--near 0.25] [--patience 30] [--allow-busy]
        [--json out.json]

Every combination of timm student x input size x channel ratio is built with random weights
(latency does not depend on them), pruned at that ratio as the prune stage prunes with ``prune:``'s
defaults (magnitude, per layer, ``round_to`` 8, SE blocks pruned; with global pruning a trained
student's widths may differ), exported to ONNX and timed in a fresh process on ``--runtime``
(any of :data:`profiling.latency.RUNTIMES`), exactly as ``prune.target: {latency_ms: X}`` is
measured (:class:`student.latency_target.SubprocessTimer`), with the same busy-CPU guard. MACs
are the report's (fvcore, BatchNorm folded).

It lists the combinations that meet the budget, most MACs first (the biggest model that fits),
then the near misses (at most ``--near`` over it), fastest first. Unlike the rest of ``profiling``
it imports ``student`` (pruning and export).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError, run_cli
from profiling.cost.latency import RUNTIMES
from profiling.cost.machine import machine_info, usable_cores
from profiling.profile import timm_entry
from student.config import PruneConfig
from student.latency_target import LatencySettings, SubprocessTimer, Timer
from student.prune import cost, prune_options, pruned_copy

__all__ = ["budget_rows", "main"]

STUDENTS = ("mobilenetv3_small_100", "mobilenetv3_large_100", "efficientnet_lite0")
IMG_SIZES = (224, 160, 128)
RATIOS = (0.0, 0.3, 0.5)
MIN_IMG_SIZE = 16
MAX_OTHER_LOAD = 0.25  # cores; the busy-CPU guard's default limit
BUSY_WAIT_S = 10.0  # between tries while other processes load the CPU


def _check_student(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UserError(f"--students: '{name}' is not a timm model name{hint}")


def _validate(args: argparse.Namespace) -> None:
    if not args.latency_ms > 0:
        raise UserError(f"--latency-ms must be > 0 milliseconds, got {args.latency_ms}")
    if args.runtime not in RUNTIMES:
        raise UserError(f"--runtime: unknown '{args.runtime}'; choose one of {', '.join(sorted(RUNTIMES))}")
    small = [s for s in args.img_size if s < MIN_IMG_SIZE]
    if small:
        raise UserError(f"--img-size: {small[0]} px is too small; give sizes >= {MIN_IMG_SIZE}")
    outside = [r for r in args.ratios if not 0.0 <= r < 1.0]
    if outside:
        raise UserError(f"--ratios: {outside[0]} is not a channel ratio in [0, 1) (0 = unpruned)")
    for flag, value in (("--batch", args.batch), ("--threads", args.threads), ("--runs", args.runs)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.warmup < 0 or args.near < 0 or args.patience < 0:
        raise UserError(f"--warmup, --near and --patience must be >= 0, got {args.warmup}, {args.near}, {args.patience}")
    for name in args.students:
        _check_student(name)


def budget_rows(students: list[str], img_sizes: list[int], ratios: list[float], timer: Timer,
                log=lambda line: None) -> list[dict[str, Any]]:
    """One measured row per student x size x ratio: median ms, MACs per image and params."""
    options = prune_options(PruneConfig())
    rows = []
    for student in students:
        for size in img_sizes:
            net, example = timm_entry(student, size).net, torch.zeros(1, 3, size, size)
            for ratio in ratios:
                twin = copy.deepcopy(net) if ratio == 0 else pruned_copy(net, example, ratio, **options)[0]
                macs, params = cost(twin, example)
                ms = float(timer(twin.eval(), size))
                stats = getattr(timer, "last", None)  # the real timer's full figure
                rows.append({"student": student, "img_size": size, "ratio": ratio, "ms": ms, "macs": macs,
                             "params": params, "p90_ms": getattr(stats, "p90_ms", None),
                             "other_cpu_load": getattr(stats, "other_cpu_load", None)})
                log(f"{student} @{size} px, ratio {ratio:g}: {ms:.3f} ms, {macs / 1e6:.1f} M MACs")
    return rows


def _table(rows: list[dict[str, Any]], budget: float) -> list[str]:
    head = f"{'px':>5}{'ratio':>7}{'median ms':>11}{'x budget':>10}{'MACs (M)':>10}{'params (M)':>12}"
    lines = [f"  {'student':<28}{head}"]
    for r in rows:
        lines.append(f"  {r['student']:<28}{r['img_size']:>5}{r['ratio']:>7.2f}{r['ms']:>11.3f}"
                     f"{r['ms'] / budget:>10.2f}{r['macs'] / 1e6:>10.2f}{r['params'] / 1e6:>12.3f}")
    return lines


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m profiling.budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--latency-ms", type=float, required=True, help="the budget: median ms per call of one batch")
    p.add_argument("--runtime", default="onnx", help=f"one of {', '.join(sorted(RUNTIMES))} (default onnx)")
    p.add_argument("--img-size", type=int, nargs="+", default=list(IMG_SIZES))
    p.add_argument("--students", nargs="+", default=list(STUDENTS), help="timm model names")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS),
                   help="channel ratios removed by pruning, in [0, 1); 0 is the unpruned student")
    p.add_argument("--threads", type=int, help="intra-op threads (default: every usable core)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--near", type=float, default=0.25, help="near miss: at most this fraction over the budget")
    p.add_argument("--patience", type=float, default=30.0,
                   help="seconds to wait, per figure, for other processes to leave the CPU (default 30)")
    p.add_argument("--allow-busy", action="store_true", help="time even while other processes load the CPU")
    p.add_argument("--json", type=Path, help="also write every row to this JSON file")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _budget(args: argparse.Namespace, timer: Timer | None) -> int:
    _validate(args)
    settings = LatencySettings(runtime=args.runtime, batch=args.batch, threads=args.threads or usable_cores(),
                               warmup=args.warmup, runs=args.runs, allow_busy=args.allow_busy,
                               max_other_load=MAX_OTHER_LOAD)
    if timer is None:
        timer = SubprocessTimer(settings, where="--runtime", busy_hint="--allow-busy or more --patience",
                                busy_retries=math.ceil(args.patience / BUSY_WAIT_S), busy_wait_s=BUSY_WAIT_S,
                                log=lambda line: print(line, file=sys.stderr))
    rows = budget_rows(args.students, args.img_size, args.ratios, timer,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    budget = args.latency_ms
    meets = sorted((r for r in rows if r["ms"] <= budget), key=lambda r: (-r["macs"], r["ms"]))
    near = sorted((r for r in rows if budget < r["ms"] <= budget * (1 + args.near)), key=lambda r: r["ms"])
    slower = [r for r in rows if r["ms"] > budget * (1 + args.near)]
    machine = machine_info()
    print(f"budget {budget} ms on {settings.runtime}, batch {settings.batch}, {settings.threads} thread(s), "
          f"{settings.warmup} warm-up + {settings.runs} timed runs per figure, random weights; {machine['cpu']}")
    print(f"meet the budget ({len(meets)} of {len(rows)}), most MACs first:")
    print("\n".join(_table(meets, budget)) if meets else "  none: try smaller students, sizes or more pruning")
    print(f"near misses (at most {args.near:.0%} over):")
    print("\n".join(_table(near, budget)) if near else "  none")
    if slower:
        fastest = min(slower, key=lambda r: r["ms"])
        print(f"{len(slower)} more were slower (fastest of them {fastest['ms']:.3f} ms)")
    loads = [r["other_cpu_load"] for r in rows if r["other_cpu_load"] is not None]
    if loads and max(loads) > MAX_OTHER_LOAD:
        print(f"warning: other processes used up to {max(loads):.2f} cores while timing (--allow-busy): "
              "the figures are skewed; measure on a free machine before deciding")
    if args.json:
        out = {"budget_ms": budget, "settings": _describe(timer, settings), "machine": machine,
               "prune_options": prune_options(PruneConfig()), "near": args.near, "meets": meets, "near_misses": near,
               "rows": rows}
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


def _describe(timer: Timer, settings: LatencySettings) -> dict[str, Any]:
    describe = getattr(timer, "describe", None)
    return describe() if callable(describe) else {**asdict(settings), "timer": getattr(timer, "__name__", repr(timer))}


def main(argv: list[str] | None = None, *, timer: Timer | None = None) -> int:
    """The CLI; ``timer`` replaces the real one (tests)."""
    args = _parse(argv)
    return run_cli(lambda: _budget(args, timer), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
