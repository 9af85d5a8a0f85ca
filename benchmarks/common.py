"""What every benchmark shares: waiting for an idle CPU, watching the load, Markdown tables, RESULTS.md.

A figure measured while other processes use the CPU is worse than none (they skewed timings
0.6-12x on the 2-core machine), so every script waits for an idle CPU before it starts and records
how many cores other processes used while it ran, beside its figures.
"""

from __future__ import annotations

import math
import os
import resource
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from profiling.cost.machine import cpu_times, machine_info, other_cpu_load

__all__ = ["OUT", "RESULTS", "LoadWatch", "command_line", "machine_line", "md_table", "record", "wait_for_idle_cpu"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
OUT = HERE / "out"  # run directories and scratch files (git-ignored)
QUICK_RESULTS = OUT / "RESULTS-quick.md"  # --quick runs check that a script works; they are not results
MAX_OTHER_LOAD = 0.25  # cores; the same limit as the latency guard in profiling/latency.py


def wait_for_idle_cpu(max_other_load: float = MAX_OTHER_LOAD, patience_s: float = 900.0) -> float:
    """Wait until other processes use at most ``max_other_load`` cores (watched for 2 s at a time).

    Returns the last reading; gives up (exit) after ``patience_s`` rather than measure on a busy CPU.
    """
    deadline = time.monotonic() + patience_s
    while True:
        load = other_cpu_load(2.0)
        if load is None:
            print("warning: cannot read the CPU load here (no /proc); measuring unchecked", flush=True)
            return math.nan
        if load <= max_other_load:
            return load
        if time.monotonic() > deadline:
            raise SystemExit(f"other processes still use {load:.2f} cores after {patience_s:.0f} s of waiting "
                             f"(limit {max_other_load}); no figures measured. Free the machine and rerun.")
        print(f"other processes use {load:.2f} cores (limit {max_other_load}); waiting 15 s", flush=True)
        time.sleep(15)


class LoadWatch:
    """Cores other processes kept busy from construction to :meth:`other_cores`.

    This process and the child processes it has waited for (``RUSAGE_CHILDREN``) do not count as
    others, so a script that runs the pipeline in subprocesses can watch the load around them.
    """

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cpu_times(), (children.ru_utime + children.ru_stime) * os.sysconf("SC_CLK_TCK")

    def other_cores(self) -> float | None:
        (before, kids_before), (after, kids_after) = self._start, self._read()
        if before is None or after is None:
            return None
        elapsed_per_cpu = (after.total - before.total) / max(after.cpus, 1)
        if elapsed_per_cpu <= 0:
            return 0.0
        others = (after.busy - before.busy) - (after.own - before.own) - (kids_after - kids_before)
        return max(others, 0.0) / elapsed_per_cpu


def command_line() -> str:
    """The command that ran this script, as a user would type it."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


def machine_line() -> str:
    m = machine_info()
    gpu = f", GPU {m['gpu']} (CUDA {m['cuda']})" if m["gpu"] else ", no GPU"
    return (f"{m['cpu']}, {m['usable_cores']} usable of {m['logical_cores']} logical cores{gpu}; {m['platform']}; "
            f"Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, timm {m['timm']}")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def record(title: str, body: str, *, quick: bool, load_before: float, watch: LoadWatch, wall_s: float) -> Path:
    """Print ``body`` and append it to RESULTS.md (``--quick`` runs: to out/RESULTS-quick.md) with
    the date, the exact command, the machine and the CPU load from other processes."""
    during = watch.other_cores()
    load = (f"{load_before:.2f} cores before the start, "
            + ("unknown" if during is None else f"{during:.2f} on average")
            + f" while it ran (limit {MAX_OTHER_LOAD})")
    section = "\n".join([
        f"## {title}{' (quick check: not a measurement)' if quick else ''}",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {_minutes(wall_s)}",
        f"- command: `{command_line()}`",
        f"- machine: {machine_line()}",
        f"- CPU used by other processes: {load}",
        "",
        body.strip(),
        "",
    ])
    print("\n" + section, flush=True)
    path = QUICK_RESULTS if quick else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n" + section)
    print(f"appended to {path}", flush=True)
    return path


def link_dir(target: Path, link: Path) -> None:
    """Share a finished run directory (a data split, a teacher, a trained model) by relative symlink:
    a benchmark variant reuses it, and its provenance records the digests of what it links to."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        os.symlink(os.path.relpath(target, link.parent), link)
