"""Wall time and peak memory of each stage of ``configs/quickstart.yaml``, and of the whole run.

Issue target: the whole quickstart in under 5 minutes on 2 CPU cores.

    python -m benchmarks.bench_pipeline [--quick] [--seeds 0,1,2 [--test-images 2000]]

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
import json
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import OUT, LoadWatch, md_table, record, wait_for_idle_cpu
from distill.run import STAGES
from profiling.cost.latency import matmul_peak_gflops
from profiling.cost.machine import other_cpu_load, usable_cores

CONFIG = "configs/quickstart.yaml"
TARGET_S = 300.0
#: Wall-time targets by machine class: (name, fp32 matmul peak GFLOP/s at 2 threads, seconds).
MACHINE_TARGETS = (("2-core Intel Xeon", 243.0, 300.0), ("2-core AMD EPYC", 90.0, 420.0))
TEACHER_MIN = 0.98  # test AUROC of the quickstart's teacher, on every seed
STUDENT_GAP = 0.01  # student and pruned student within this much of the teacher
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


SCORED = ("teacher", "student", "student_pruned")


def wide_test(run_dir: Path, seed: int, n: int) -> dict:
    """The finished teacher, student and pruned student of ``run_dir`` scored on a test split of ``n``
    synthetic images rendered for this check (no stage chose an epoch or a threshold on it), in the
    shape of report.json's models: test AUROC, and AUROC − teacher's with a paired bootstrap interval.

    The run's own 400 test images hold 80 defects: two models 0.01 apart are inside the interval
    of their difference, so a margin of 0.01 needs more images than the quickstart renders.
    """
    import torch

    from data.prepare import prepare_data
    from distill.config import load_config
    from torchmetrics.functional.classification import binary_auroc

    from profiling.report.quality import paired_auroc_delta
    from training.engine import evaluate
    from training.modeling import load_model

    cfg = load_config(run_dir / "config.yaml", [f"data.synthetic.num_test={n}"])
    data = prepare_data(cfg.data, run_dir.parent / f"{run_dir.name}_test{n}" / "data", seed)
    probs, labels = {}, None
    for name in SCORED:
        if not (run_dir / name / "model.safetensors").is_file():
            continue
        model = load_model(run_dir / name)
        out = evaluate(model, data.unit_loader("test", model.img_size, 128), device=torch.device("cpu"))
        probs[name], labels = out.logits.float().softmax(1)[:, 1], out.labels
    models = {name: {"test": {"auroc": binary_auroc(p, labels).item()}} for name, p in probs.items()}
    for name in models:
        if name != "teacher" and "teacher" in probs:
            models[name]["vs_teacher"] = {"auroc_delta": paired_auroc_delta(probs[name], probs["teacher"], labels)}
    return {"models": models, "images": 0 if labels is None else len(labels),
            "defects": 0 if labels is None else int(labels.sum())}


def seed_row(seed: int, wall_s: float, shares: dict[str, float], report: dict,
             wide: dict | None = None) -> tuple[list[str], bool]:
    """One seed's table row and whether it meets the margin targets and the report's constraints
    (on the ``wide`` test split when given: :func:`wide_test`)."""
    passed = bool(report.get("constraints", {}).get("passed"))
    row, ok = _scores(report, passed)
    row = [str(seed), f"{wall_s:.0f}", *(f"{shares[st]:.0f}" if st in shares else "-" for st in ("teacher", "student", "prune")),
           *row, "PASS" if passed else "FAIL", "**yes**" if ok else "no"]
    if wide is not None:
        wide_row, ok = _scores(wide, passed)
        row += [*wide_row, "**yes**" if ok else "no"]
    return row, ok


def _scores(report: dict, passed: bool) -> tuple[list[str], bool]:
    """Teacher, student, Δ, pruned, Δ of one report (or :func:`wide_test`), and the margin check."""
    models = report.get("models", {})

    def auroc(name: str) -> float | None:
        value = (models.get(name) or {}).get("test", {}).get("auroc")
        return None if value is None else float(value)

    teacher, student, pruned = auroc("teacher"), auroc("student"), auroc("student_pruned")
    ok = (passed and teacher is not None and teacher >= TEACHER_MIN
          and all(v is not None and teacher - v <= STUDENT_GAP for v in (student, pruned)))

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    def gap(name: str, v: float | None) -> str:
        if v is None or teacher is None:
            return "-"
        d = ((models.get(name) or {}).get("vs_teacher") or {}).get("auroc_delta")  # the report's paired bootstrap
        return f"{v - teacher:+.4f}" + (f" [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "")

    return [fmt(teacher), fmt(student), gap("student", student), fmt(pruned), gap("student_pruned", pruned)], ok


def seeds_main(args: argparse.Namespace, seeds: list[int]) -> None:
    """One whole quickstart per seed: AUROCs, the report's verdict, the margin targets, wall time."""
    load_before = _load_before(args.quick)
    watch, t_start = LoadWatch(), time.perf_counter()
    suffix = "_quick" if args.quick else ""
    common = [f"run.output_dir={OUT}"] + (QUICK if args.quick else [])
    rows, walls, oks, defects = [], [], [], set()
    for seed in seeds:
        name = f"bench_pipeline_seed{seed}{suffix}"
        shutil.rmtree(OUT / name, ignore_errors=True)
        child = _run([f"run.name={name}", f"run.seed={seed}", *common])
        shares, _, _ = _stage_shares(child)
        report = json.loads((Path(OUT) / name / "report.json").read_text())
        wide = wide_test(Path(OUT) / name, seed, args.test_images) if args.test_images else None
        if wide is not None:
            defects.add(wide["defects"])
        row, ok = seed_row(seed, child.wall_s, shares, report, wide)
        rows.append(row)
        walls.append(child.wall_s)
        oks.append(ok)
    threads = usable_cores()
    peak = matmul_peak_gflops(threads)
    overrides = " ".join(QUICK) if args.quick else "none"
    targets = "; ".join(f"{n} ({g:.0f} GFLOP/s): < {t / 60:.0f} min" for n, g, t in MACHINE_TARGETS)
    body = "\n".join([
        f"`python -m distill.run {CONFIG} run.seed=S` from a fresh run directory per seed (overrides: {overrides}). "
        f"This machine's fp32 matmul peak: **{peak:.0f} GFLOP/s** with {threads} thread(s). Seconds per stage from "
        "the timestamps of the run's log lines. Test AUROC (threshold on validation); Δ is against the teacher, with "
        "the report's 95% paired bootstrap interval over the test images: a margin inside it is one the test split "
        "cannot resolve. "
        f"Verdict: the report's own check of the quickstart's constraints. Margin: teacher ≥ {TEACHER_MIN}, student "
        f"and pruned student within {STUDENT_GAP} of the teacher, constraints passed.",
        "",
        *([f"Columns after the verdict: the same three models scored on {args.test_images} more test images "
           f"rendered after the run ({'/'.join(map(str, sorted(defects)))} defects; no stage chose anything on them), and the "
           "margin judged there."] if args.test_images else []),
        "",
        md_table(["seed", "wall s", "teacher s", "student s", "prune s", "teacher AUROC", "student AUROC",
                  "Δ student", "pruned AUROC", "Δ pruned", "verdict", "margin met",
                  *([f"teacher ({args.test_images})", f"student ({args.test_images})", "Δ student",
                     f"pruned ({args.test_images})", "Δ pruned", f"margin met ({args.test_images})"]
                    if args.test_images else [])], rows),
        "",
        f"- seeds meeting every target: {sum(oks)} of {len(oks)}"
        + (f" (margin judged on the {args.test_images} images)" if args.test_images else ""),
        f"- wall time: {min(walls):.0f}-{max(walls):.0f} s (targets by machine class: {targets})",
    ])
    record("Pipeline: the quickstart on several seeds (verdict, margin, wall time)", body, quick=args.quick,
           load_before=load_before, watch=watch, wall_s=time.perf_counter() - t_start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs, measures nothing")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: one whole run per seed with AUROCs and verdicts, no per-stage processes")
    p.add_argument("--test-images", type=int, default=2000,
                   help="with --seeds: also score each run's models on this many freshly rendered test images, "
                        "enough to resolve a 0.01 margin (0: off; default 2000)")
    args = p.parse_args(argv)
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if args.quick and args.test_images:
            args.test_images = 40
        seeds_main(args, seeds)
        return
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
