"""Wall time and peak memory of each stage of ``configs/quickstart.yaml``, and of the whole run.

Issue target: the whole quickstart in under 5 minutes on 2 CPU cores.

    python -m benchmarks.bench_pipeline [--quick]

1. The whole run, as a user runs it (``python -m distill.run configs/quickstart.yaml``) in a fresh run
   directory ``benchmarks/out/bench_pipeline``: its wall time from process start to exit is the
   figure the target applies to. Each line of its log is timestamped as it arrives; a stage ends
   with its last tagged line (``[teacher] ...``), which gives each stage's share of that run.
   Peak RSS of the process comes from ``os.wait4``.
2. Stage by stage, each stage in a process of its own (``--stages teacher``, ...) in a second fresh
   run directory (``bench_pipeline_stages``), for each stage's own peak RSS (``os.wait4`` returns
   that one child's rusage). Each of these processes also pays Python start-up, the imports and
   reading the data stage; one more process that has nothing left to do measures that fixed cost.
   The synthetic images a stage renders are not handed to the next process either (in the whole
   run the teacher reuses the data stage's renders), so the per-process times add up to more.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from benchmarks.common import OUT, LoadWatch, md_table, record, wait_for_idle_cpu
from distill.run import STAGES
from profiling.cost.machine import other_cpu_load

CONFIG = "configs/quickstart.yaml"
TARGET_S = 300.0
QUICK = ["data.synthetic.num_train=64", "data.synthetic.num_val=32", "data.synthetic.num_test=32",
         "teacher.epochs=1", "student.epochs=1", "prune.epochs=1", "export.models=[student_pruned]",
         "profile.runtimes=[onnx]"]
#: Log tags ("[tag] ...") and the stage they belong to.
TAGS = {"data": "data", "teacher": "teacher", "student": "student", "distill": "student",
        "student_baseline": "student", "prune": "prune", "student_pruned": "prune", "export": "export",
        "report": "report"}
_TAG = re.compile(r"^\[([A-Za-z_]+)")
_DATA_SECONDS = re.compile(r"\((\d+(?:\.\d+)?) s\)\s*$")


@dataclass
class Child:
    wall_s: float
    peak_rss_mb: float
    lines: list[tuple[float, str]]  # (seconds since the start, text)


def _load_before(quick: bool) -> float:
    if not quick:
        return wait_for_idle_cpu()
    load = other_cpu_load(1.0)  # a quick check measures nothing, so it does not wait
    return math.nan if load is None else load


def _run(args: list[str]) -> Child:
    """Run ``python -m distill.run`` with ``args``; echo and timestamp its log; its own peak RSS."""
    cmd = [sys.executable, "-m", "distill.run", CONFIG, *args]
    print("$ " + " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, ""):
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        print("  " + line, end="", flush=True)
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise SystemExit(f"`{' '.join(cmd[1:])}` failed with exit code {proc.returncode}:\n{tail}")
    return Child(wall, usage.ru_maxrss / 1024, lines)  # ru_maxrss: KiB on Linux


def _stage_shares(child: Child) -> tuple[dict[str, float], float, float]:
    """Each stage's seconds in one whole run (from its log), start-up before the data stage, and exit."""
    ends: dict[str, float] = {}
    data_own = None
    for t, text in child.lines:
        m = _TAG.match(text)
        if m and m.group(1) in TAGS:
            ends[TAGS[m.group(1)]] = t
            if m.group(1) == "data" and (d := _DATA_SECONDS.search(text)):
                data_own = float(d.group(1))
    shares, previous = {}, 0.0
    startup = 0.0
    for stage in STAGES:
        if stage not in ends:
            continue
        shares[stage] = ends[stage] - previous
        previous = ends[stage]
    if "data" in shares and data_own is not None:
        startup = max(shares["data"] - data_own, 0.0)
        shares["data"] = data_own
    return shares, startup, child.wall_s - previous


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs, measures nothing")
    args = p.parse_args(argv)
    load_before = _load_before(args.quick)
    watch, t_start = LoadWatch(), time.perf_counter()

    suffix = "_quick" if args.quick else ""
    common = [f"run.output_dir={OUT}"] + (QUICK if args.quick else [])
    whole_name, staged_name = f"bench_pipeline{suffix}", f"bench_pipeline_stages{suffix}"
    for name in (whole_name, staged_name):  # a fresh start: nothing finished earlier is reused
        shutil.rmtree(OUT / name, ignore_errors=True)

    whole = _run([f"run.name={whole_name}", *common])
    shares, startup, teardown = _stage_shares(whole)

    staged: dict[str, Child] = {}
    for stage in STAGES:
        staged[stage] = _run([f"run.name={staged_name}", "--stages", stage, *common])
    idle = _run([f"run.name={staged_name}", "--stages", "data", *common])  # nothing left to do

    rows = [["start-up (interpreter + imports)", f"{startup:.1f}", "-", "-", "-"]]
    for stage in STAGES:
        own = staged[stage]
        rows.append([stage, f"{shares[stage]:.1f}" if stage in shares else "-", f"{own.wall_s:.1f}",
                     f"{own.peak_rss_mb:.0f}", f"{own.peak_rss_mb - idle.peak_rss_mb:+.0f}"])
    rows.append(["exit (after the last log line)", f"{teardown:.1f}", "-", "-", "-"])
    rows.append(["**total**", f"**{whole.wall_s:.1f}**", f"{sum(c.wall_s for c in staged.values()):.1f}",
                 f"{whole.peak_rss_mb:.0f} (whole run)", f"{whole.peak_rss_mb - idle.peak_rss_mb:+.0f}"])
    verdict = "PASS" if whole.wall_s < TARGET_S else "FAIL"
    overrides = " ".join(QUICK) if args.quick else "none"
    body = "\n".join([
        f"`python -m distill.run {CONFIG}` from a fresh run directory (overrides: {overrides}). "
        "Column 2: each stage's share of one whole run, from the timestamps of its log lines. Columns 3-5: "
        "each stage run alone in a process of its own (`--stages STAGE`): its wall time, its peak RSS, and that "
        "peak less the peak of a process with nothing to do (the imports alone hold most of it).",
        "",
        md_table(["stage", "s in the whole run", "s in its own process", "peak RSS MB (own process)",
                  "MB over an idle process"], rows),
        "",
        f"- target: whole quickstart < {TARGET_S:.0f} s on 2 CPU cores: **{verdict}** ({whole.wall_s:.1f} s "
        f"= {int(whole.wall_s // 60)} min {whole.wall_s % 60:.0f} s, process start to exit; "
        f"{os.cpu_count()} cores here)",
        f"- a process with nothing to do (start-up, imports, reading the finished data stage): {idle.wall_s:.1f} s, "
        f"{idle.peak_rss_mb:.0f} MB; each own-process figure includes that much, and a stage in its own process "
        "renders again the synthetic images that the whole run rendered once and kept in RAM for the next stage",
    ])
    record("Pipeline: quickstart wall time and peak memory per stage", body, quick=args.quick,
           load_before=load_before, watch=watch, wall_s=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
