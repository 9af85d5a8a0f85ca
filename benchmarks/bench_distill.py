"""Does distillation pay? Few labels, an unlabeled pool, a pretrained teacher; paired over seeds.

    python -m benchmarks.bench_distill [--quick] [--seeds 0,1,2,3,4] [--fractions 0.05,0.1,1.0] [--methods scratch,kd_pool]

The situation of an inspection line: few labels, many unlabeled images. Synthetic ``segment``
beads at 64 px, defect severity 0.3-0.7 (so that no model is at 1.0), the student
(MobileNetV3-Small, from scratch) at 96 px; ``data.label_fraction`` keeps the labels of 5%, 10% or
100% of the 1,200 training images; the rest, and a pool of 1,000 more, are unlabeled. Per seed (a
seed draws the images, the labeled subset, every initialisation and every mix) and label fraction:

- (d) the teachers: EfficientNet-Lite0 with ImageNet weights (offline, ``imagenet:efficientnet_lite0``)
  fine-tuned on the labels, and the quickstart's conv-stem ViT trained from scratch on them;
- (a) ``scratch``: the student on the labels alone;
- (b) ``kd labels``: distilled from the pretrained teacher on the labeled images only;
- (c) ``kd pool``: distilled on labeled + unlabeled images (cross-entropy on the labels, the
  teacher's outputs on all), from the pretrained teacher, and from the from-scratch ViT;
- at 10%: ``scratch+mixup`` beside ``kd+mixup`` (pool, pretrained teacher), so that mixup and
  distillation are not confounded.

Every student run makes the same number of updates (a student that does not learn from the pool
goes over its labels as many times as one that does: ``ViewSampler`` ``length``), for the same
epochs. Test AUROC and F1 use the threshold chosen on validation. Differences are paired by seed,
with a paired t-test and the exact Wilcoxon signed-rank test (with 5 seeds its smallest two-sided
p is 1/16 = 0.0625, so the t-test is the one that can reach p < 0.05).

Every model is a finished pipeline stage under ``benchmarks/out/bench_distill/``: an interrupted
benchmark resumes where it stopped; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import OUT, LoadWatch, link_dir, md_table, record
from data.prepare import prepare_data
from distill.config import Config, load_config
from distill.stages import Context, baseline_stage, student_stage, teacher_stage
from profiling.cost.machine import other_cpu_load
from training.engine import pick_device
from training.modeling import load_meta
from training.seed import seed_everything

CONFIG = Path("configs/few_labels.yaml")
SEVERITY = (0.3, 0.7)
TEACHERS = {
    "pretrained": ["teacher.arch=efficientnet_lite0", "teacher.weights=imagenet:efficientnet_lite0",
                   "teacher.pretrained=false"],  # the recipe's fine-tuning: lr 1e-3, 25 epochs
    # the quickstart's teacher: a small ViT with a convolutional stem, trained from scratch
    "scratch_vit": ["teacher.arch=vit_tiny_patch16_224", "teacher.weights=null", "teacher.pretrained=false",
                    "teacher.conv_stem=true", "teacher.img_size=64",
                    "teacher.model_kwargs={patch_size: 8, depth: 4, embed_dim: 128, num_heads: 4}",
                    "teacher.drop_path=0.0", "teacher.epochs=20", "teacher.batch_size=32", "teacher.lr=1.0e-3"],
}


@dataclass(frozen=True)
class Method:
    label: str
    teacher: str | None  # a key of TEACHERS, or None: no teacher
    overrides: tuple[str, ...] = ()


METHODS = {
    "scratch": Method("(a) scratch", None),
    "kd_labels": Method("(b) kd, labels only", "pretrained", ("distill.unlabeled=false", "distill.teacher_outputs=live")),
    "kd_pool": Method("(c) kd, labels + pool", "pretrained"),
    "kd_pool_vit": Method("(c) kd, labels + pool, ViT from scratch", "scratch_vit"),
    # distill.mixup needs live teacher outputs for the config to be valid; this run has no teacher
    "scratch_mixup": Method("scratch + mixup", None, ("distill.mixup=0.4", "distill.teacher_outputs=live")),
    "kd_pool_mixup": Method("kd + mixup, labels + pool", "pretrained",
                            ("distill.mixup=0.4", "distill.teacher_outputs=live")),
}
PLAN = {0.05: ("scratch", "kd_labels", "kd_pool", "kd_pool_vit"),
        0.1: ("scratch", "kd_labels", "kd_pool", "kd_pool_vit", "scratch_mixup", "kd_pool_mixup"),
        1.0: ("scratch", "kd_labels", "kd_pool", "kd_pool_vit")}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs, measures nothing")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--fractions", default="0.05,0.1,1.0", help="label fractions (default 0.05,0.1,1.0)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {', '.join(METHODS)} (default: every method planned for a fraction)")
    p.add_argument("--epochs", type=int, default=10, help="student epochs, the same for every run (default 10)")
    p.add_argument("--fresh", action="store_true", help="delete earlier benchmark models and train everything again")
    return p.parse_args()


def _base(args: argparse.Namespace, root: Path, seed: int, fraction: float) -> list[str]:
    base = [f"run.output_dir={root}", f"run.seed={seed}", f"data.label_fraction={fraction}",
            f"data.synthetic.severity=[{SEVERITY[0]},{SEVERITY[1]}]", f"student.epochs={args.epochs}",
            "distill.baseline=false"]
    if args.quick:
        base += ["data.synthetic.num_train=80", "data.synthetic.num_val=40", "data.synthetic.num_test=40",
                 "data.synthetic.num_unlabeled=40", "data.synthetic.variants=1", "teacher.epochs=1"]
    return base


def _test(run_dir: Path, stage: str) -> dict:
    return load_meta(run_dir / stage)["metrics"]["test"]


def run_cell(args: argparse.Namespace, root: Path, seed: int, fraction: float, log) -> dict[str, dict]:
    """Every teacher and student of one (seed, label fraction): test metrics by method."""
    cell = root / f"seed{seed}" / f"labels{round(fraction * 100)}"
    device = pick_device("cpu")
    base = _base(args, root, seed, fraction)
    cfg = load_config(CONFIG, base)
    data = prepare_data(cfg.data, cell / "data_run" / "data", seed)
    out: dict[str, dict] = {}
    teachers = {}
    plan = [m for m in PLAN[fraction] if args.methods is None or m in args.methods]
    needed = {METHODS[m].teacher for m in plan if METHODS[m].teacher} | {"pretrained"}
    for name in sorted(needed):
        tdir = cell / f"teacher_{name}"
        link_dir(cell / "data_run" / "data", tdir / "data")
        tcfg = load_config(CONFIG, [*base, *TEACHERS[name], *(["teacher.epochs=1"] if args.quick else [])])
        seed_everything(seed)
        t0 = time.perf_counter()
        teachers[name] = (teacher_stage(Context(tcfg, tdir, data, device, log)), TEACHERS[name])
        out[f"teacher_{name}"] = _test(tdir, "teacher")
        log(f"[bench] seed {seed} labels {fraction:.0%} teacher {name}: test AUROC "
            f"{out[f'teacher_{name}']['auroc']:.4f} ({time.perf_counter() - t0:.0f} s)")
    for key in plan:
        method = METHODS[key]
        vdir = cell / key
        link_dir(cell / "data_run" / "data", vdir / "data")
        extra = list(method.overrides)
        if method.teacher:
            link_dir(cell / f"teacher_{method.teacher}", vdir / "teacher")
            extra = [*teachers[method.teacher][1], *extra]
        vcfg: Config = load_config(CONFIG, [*base, *extra])
        ctx = Context(vcfg, vdir, data, device, log)
        seed_everything(seed)
        t0 = time.perf_counter()
        if method.teacher:
            student_stage(ctx, teachers[method.teacher][0])
            out[key] = _test(vdir, "student")
        else:
            baseline_stage(ctx)
            out[key] = _test(vdir, "student_baseline")
        log(f"[bench] seed {seed} labels {fraction:.0%} {key}: test AUROC {out[key]['auroc']:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
    return out


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean and std of the per-seed differences a - b, paired t-test and exact Wilcoxon p (two-sided)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    out = {"n": len(d), "mean": statistics.mean(d), "sd": statistics.stdev(d) if len(d) > 1 else 0.0}
    if len(d) > 1:
        out["t_p"] = float(stats.ttest_rel(a, b).pvalue) if out["sd"] > 0 else 0.0
        out["wilcoxon_p"] = float(stats.wilcoxon(d, method="exact").pvalue) if any(d) else 1.0
    return out


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _label(key: str) -> str:
    return METHODS[key].label if key in METHODS else f"(d) teacher: {key.removeprefix('teacher_')}"


def tables(results: dict[tuple[int, float], dict[str, dict]], seeds: list[int],
           fractions: list[float]) -> tuple[str, list[str]]:
    """The per-fraction table and the sentences computed from it."""
    text, verdicts = [], []
    for fraction in fractions:
        got = {k: [results[(s, fraction)][k]["auroc"] for s in seeds] for k in results[(seeds[0], fraction)]}
        rows = []
        for key, values in got.items():
            label = _label(key)
            ref = "scratch_mixup" if key == "kd_pool_mixup" else "scratch"
            if key.startswith("teacher_") or key == ref or ref not in got:
                rows.append([label, _mean_sd(values), "-", "-", "-"])
                continue
            d = paired(values, got[ref])
            rows.append([label, _mean_sd(values), f"{d['mean']:+.3f} ± {d['sd']:.3f} (vs {ref})",
                         _p(d.get("t_p")), _p(d.get("wilcoxon_p"))])
        head = ["model", "test AUROC (mean ± std)", "paired Δ AUROC", "paired t p", "Wilcoxon p"]
        per_seed = [[_label(k), *(f"{v:.4f}" for v in values)] for k, values in got.items()]
        text.append(f"### {fraction:.0%} of the labels\n\n" + md_table(head, rows)
                    + "\n\nPer seed (test AUROC):\n\n" + md_table(["model", *(f"seed {s}" for s in seeds)], per_seed))
        if "kd_pool" in got and "scratch" in got and "teacher_pretrained" in got:
            d = paired(got["kd_pool"], got["scratch"])
            gap = statistics.mean(got["teacher_pretrained"]) - statistics.mean(got["kd_pool"])
            pays = d["mean"] >= 0.15 and d.get("t_p", 1.0) < 0.05
            word = "pays" if d["mean"] > 0 and d.get("t_p", 1.0) < 0.05 else "does not pay beyond the seed spread"
            verdicts.append(
                f"- {fraction:.0%} labels: distillation on labels + pool from the pretrained teacher {word}: "
                f"Δ AUROC {d['mean']:+.3f} vs scratch (paired t p = {_p(d.get('t_p'))}), {gap:.3f} below the "
                f"teacher" + (" (targets at 10%: Δ >= 0.15 with p < 0.05, within 0.03 of the teacher: "
                              f"{'met' if pays and gap <= 0.03 else 'not met'})" if fraction == 0.1 else ""))
        if "kd_labels" in got and "scratch" in got:
            d = paired(got["kd_labels"], got["scratch"])
            verdicts.append(f"- {fraction:.0%} labels: distilled on the labels alone: Δ {d['mean']:+.3f} vs scratch "
                            f"(p = {_p(d.get('t_p'))})")
        if "kd_pool_vit" in got and "scratch" in got:
            d = paired(got["kd_pool_vit"], got["scratch"])
            verdicts.append(f"- {fraction:.0%} labels: from the ViT trained from scratch on the same labels: "
                            f"Δ {d['mean']:+.3f} vs scratch (p = {_p(d.get('t_p'))})")
        if "kd_pool_mixup" in got and "scratch_mixup" in got:
            d = paired(got["kd_pool_mixup"], got["scratch_mixup"])
            verdicts.append(f"- {fraction:.0%} labels: with mixup on both sides: Δ {d['mean']:+.3f} "
                            f"(p = {_p(d.get('t_p'))})")
    return "\n\n".join(text), verdicts


def main() -> int:
    args = _args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    unknown = [f for f in fractions if f not in PLAN]
    if unknown:
        raise SystemExit(f"--fractions: no plan for {unknown}; choose from {sorted(PLAN)}")
    if args.methods is not None:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.quick:
        seeds, args.epochs = seeds[:2], 1
    root = OUT / ("bench_distill_quick" if args.quick else "bench_distill")
    if args.fresh and root.exists():
        shutil.rmtree(root)
    # AUROCs do not depend on the CPU load (only the wall time does): no need to wait for an idle CPU.
    load_before = other_cpu_load(2.0) or 0.0
    watch, t0 = LoadWatch(), time.perf_counter()
    results = {(s, f): run_cell(args, root, s, f, print) for s in seeds for f in fractions}
    text, verdicts = tables(results, seeds, fractions)
    cfg = load_config(CONFIG)
    syn = cfg.data.synthetic
    body = "\n".join([
        f"Synthetic {syn.view} beads at {syn.image_size} px, severity {list(SEVERITY)}, {syn.num_train} training images "
        f"({syn.defect_ratio:.0%} defects) of which the fraction shown keeps its labels, {syn.num_unlabeled} more "
        f"unlabeled, {syn.num_val} val / {syn.num_test} test; student {cfg.student.arch} at {cfg.student.img_size} px "
        f"from scratch, {args.epochs} epochs and the same number of updates in every run; seeds {seeds}. Test AUROC "
        "(threshold on validation); Δ is the mean of paired per-seed differences ± their std; p two-sided.",
        "",
        text,
        "",
        "What the numbers say (computed from the table):",
        "",
        *(verdicts or ["- nothing to compare: this run has no (a) scratch beside the kd methods (`--methods`); "
                       "pair it with a run of the same seeds that has"]),
    ])
    record("bench_distill: does distillation pay with few labels and a pool?", body, quick=args.quick,
           load_before=load_before, watch=watch, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
