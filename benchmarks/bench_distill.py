"""Where does distillation help? Students trained from scratch vs distilled, at equal epochs, over seeds.

    python -m benchmarks.bench_distill [--quick] [--seeds 0,1,2] [--epochs N]

On the quickstart's synthetic data (``configs/quickstart.yaml``) and at a harder defect severity,
one teacher is trained per severity (the dataset and the teacher are fixed; each seed changes the
student's initialisation and the mixup draws). Then, with the same student, epochs and data:

- ``scratch``: cross-entropy on the labels, no teacher (the pipeline's ``student_baseline``);
- ``kd``: Hinton soft targets + cross-entropy (``distill.loss=kd``);
- ``kd+mixup``: the same with function matching (teacher and student see one mixed-up batch);
- ``kd+feature``: ``kd`` plus the hint loss from the teacher's patch tokens.

With fewer labels (``student.train_fraction`` 0.1 and 0.3: the student learns from a stratified
subset, the teacher from all of it) only ``scratch`` and ``kd`` and ``kd+mixup`` are run, to bound
the time. Test AUROC and F1 (threshold chosen on validation) are reported as mean ± std over
seeds, with the kd - scratch difference; nothing is filtered or picked after the fact.

Every model is a finished pipeline stage under ``benchmarks/out/bench_distill/``: an interrupted
benchmark resumes where it stopped, and ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import OUT, LoadWatch, md_table, record, wait_for_idle_cpu
from data.prepare import prepare_data
from distill.config import Config, load_config
from distill.stages import Context, baseline_stage, student_stage, teacher_stage
from profiling.cost.machine import other_cpu_load
from training.engine import pick_device
from training.modeling import load_meta
from training.seed import seed_everything

CONFIG = Path("configs/quickstart.yaml")
QUICKSTART_SEVERITY = "quickstart"


@dataclass(frozen=True)
class Method:
    teacher: bool
    overrides: tuple[str, ...] = ()


METHODS = {
    "scratch": Method(False),
    "kd": Method(True, ("distill.loss=kd",)),
    "kd+mixup": Method(True, ("distill.loss=kd", "distill.mixup=0.4")),
    "kd+feature": Method(True, ("distill.loss=feature",)),
}
#: (label fraction, methods run at it)
PLAN = [(1.0, ("scratch", "kd", "kd+mixup", "kd+feature")), (0.3, ("scratch", "kd", "kd+mixup")),
        (0.1, ("scratch", "kd", "kd+mixup"))]
#: the harder severity runs the full-label comparison only (time)
HARD_PLAN = [(1.0, ("scratch", "kd", "kd+mixup")), (0.1, ("scratch", "kd"))]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs, measures nothing")
    p.add_argument("--seeds", default="0,1,2", help="student seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=None,
                   help="student epochs, the same for every method (default: the quickstart's student.epochs)")
    p.add_argument("--hard-severity", default="0.35,0.6", help="defect severity range of the harder run")
    p.add_argument("--fresh", action="store_true", help="delete earlier benchmark models and train everything again")
    return p.parse_args()


def _config(base: list[str], extra: tuple[str, ...] | list[str] = ()) -> Config:
    return load_config(CONFIG, [*base, *extra])


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _diff(a: list[float], b: list[float]) -> str:
    """Mean of the per-seed differences a - b (paired: same seed, same data), ± their std."""
    d = [x - y for x, y in zip(a, b)]
    if not d:
        return "-"
    return f"{statistics.mean(d):+.4f}" + (f" ± {statistics.stdev(d):.4f}" if len(d) > 1 else "")


def run_severity(label: str, severity: tuple[float, float] | None, plan, seeds: list[int], epochs: int,
                 quick: bool, root: Path, log) -> tuple[dict, dict, Config]:
    """Train one teacher at this severity, then every (fraction, method, seed); returns test metrics."""
    base = [f"run.output_dir={root}", f"run.name={label}", "run.seed=0", "distill.baseline=false",
            f"student.epochs={epochs}", "distill.teacher_outputs=live"]
    if severity is not None:
        base.append(f"data.synthetic.severity=[{severity[0]},{severity[1]}]")
    if quick:
        base += ["data.synthetic.num_train=96", "data.synthetic.num_val=48", "data.synthetic.num_test=48",
                 "teacher.epochs=1", "data.synthetic.variants=1"]
    cfg = _config(base)
    run_dir = root / label
    device = pick_device("cpu")
    seed_everything(0)
    data = prepare_data(cfg.data, run_dir / "data", cfg.run.seed)
    t0 = time.perf_counter()
    teacher = teacher_stage(Context(cfg, run_dir, data, device, log))
    teacher_meta = load_meta(run_dir / "teacher")
    log(f"[bench] {label}: teacher ready ({time.perf_counter() - t0:.0f} s), test AUROC "
        f"{teacher_meta['metrics']['test']['auroc']:.4f}")
    results: dict[tuple[float, str], dict[str, list[float]]] = {}
    for fraction, methods in plan:
        for name in methods:
            method = METHODS[name]
            for seed in seeds:
                extra = [*method.overrides, f"run.seed={seed}", f"student.train_fraction={fraction}"]
                vcfg = _config(base, extra)
                vdir = run_dir / f"labels{int(round(fraction * 100))}" / name.replace("+", "_") / f"seed{seed}"
                ctx = Context(vcfg, vdir, data, device, log)
                seed_everything(seed)
                t1 = time.perf_counter()
                if method.teacher:
                    student_stage(ctx, teacher)
                    stage = "student"
                else:
                    baseline_stage(ctx)
                    stage = "student_baseline"
                test = load_meta(vdir / stage)["metrics"]["test"]
                got = results.setdefault((fraction, name), {"auroc": [], "f1": []})
                got["auroc"].append(test["auroc"])
                got["f1"].append(test["f1"])
                log(f"[bench] {label} labels {fraction:.0%} {name} seed {seed}: AUROC {test['auroc']:.4f} "
                    f"F1 {test['f1']:.4f} ({time.perf_counter() - t1:.0f} s)")
    return teacher_meta["metrics"]["test"], results, cfg


def _tables(label: str, severity_text: str, teacher_test: dict, results: dict, n_train: int) -> str:
    rows = [["teacher", "100%", "-", f"{teacher_test['auroc']:.4f}", f"{teacher_test['f1']:.4f}", "-", "-"]]
    for (fraction, name), got in results.items():
        base = results.get((fraction, "scratch"))
        d_auc = _diff(got["auroc"], base["auroc"]) if base and name != "scratch" else "-"
        d_f1 = _diff(got["f1"], base["f1"]) if base and name != "scratch" else "-"
        rows.append([name, f"{fraction:.0%} ({max(1, round(fraction * n_train))})", len(got["auroc"]),
                     _fmt(got["auroc"]), _fmt(got["f1"]), d_auc, d_f1])
    head = ["student", "labels (train images)", "seeds", "test AUROC", "test F1", "Δ AUROC vs scratch",
            "Δ F1 vs scratch"]
    return f"### Severity {severity_text} ({label})\n\n" + md_table(head, rows)


def _verdict(results: dict) -> list[str]:
    """One sentence per label fraction, computed from the numbers (no hand-written conclusion)."""
    lines = []
    fractions = sorted({f for f, _ in results}, reverse=True)
    for fraction in fractions:
        scratch = results.get((fraction, "scratch"))
        if not scratch:
            continue
        for name in ("kd", "kd+mixup", "kd+feature"):
            got = results.get((fraction, name))
            if not got or len(got["auroc"]) < 2:
                continue
            d = [x - y for x, y in zip(got["auroc"], scratch["auroc"])]
            mean, sd = statistics.mean(d), statistics.stdev(d)
            if abs(mean) <= sd:
                word = "no difference beyond the seed-to-seed spread"
            else:
                word = "helps" if mean > 0 else "hurts"
            lines.append(f"- labels {fraction:.0%}, {name} vs scratch: {word} (Δ AUROC {mean:+.4f} ± {sd:.4f})")
    return lines


def main() -> int:
    args = _args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    hard = tuple(float(x) for x in args.hard_severity.split(","))
    base_cfg = load_config(CONFIG)
    epochs = args.epochs or base_cfg.student.epochs
    if args.quick:
        seeds, epochs = seeds[:2], 1
    root = OUT / ("bench_distill_quick" if args.quick else "bench_distill")
    if args.fresh and root.exists():
        shutil.rmtree(root)
    quick_plan = [(1.0, ("scratch", "kd", "kd+mixup", "kd+feature")), (0.3, ("scratch", "kd"))]
    # a --quick run measures nothing, so it need not wait for an idle CPU
    load_before = (other_cpu_load(2.0) or 0.0) if args.quick else wait_for_idle_cpu()
    watch, t0 = LoadWatch(), time.perf_counter()
    log = print
    sections, verdicts = [], []
    runs = [(QUICKSTART_SEVERITY, None, quick_plan if args.quick else PLAN),
            ("hard", hard, [(1.0, ("scratch", "kd"))] if args.quick else HARD_PLAN)]
    for label, severity, plan in runs:
        teacher_test, results, run_cfg = run_severity(label, severity, plan, seeds, epochs, args.quick, root, log)
        sev = severity or base_cfg.data.synthetic.severity
        text = f"[{sev[0]}, {sev[1]}]"
        sections.append(_tables(label, text, teacher_test, results, run_cfg.data.synthetic.num_train))
        verdicts += [f"- severity {text}:"] + ["  " + v for v in _verdict(results)]
    syn = run_cfg.data.synthetic
    body = "\n".join([
        f"`configs/quickstart.yaml` data ({syn.num_train} train / {syn.num_val} val / {syn.num_test} test synthetic "
        f"beads, {syn.defect_ratio:.0%} defects), "
        f"student {base_cfg.student.arch} at {base_cfg.student.img_size} px for {epochs} epochs in every run, "
        f"teacher {base_cfg.teacher.arch} (conv stem, from scratch) trained once per severity; seeds {seeds} "
        "change the student's initialisation and mixup draws. Mean ± std over seeds; Δ is the mean of paired "
        "per-seed differences. Thresholds chosen on validation (F1).",
        "",
        *[s + "\n" for s in sections],
        "What the numbers say (computed: |mean Δ| <= std counts as no difference):",
        "",
        *verdicts,
    ])
    record("bench_distill: does distillation help the student?", body, quick=args.quick, load_before=load_before,
           watch=watch, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
