"""Input resolution as a compression knob: the recipe's student trained at 224, 160 and 128 px.

    python -m benchmarks.bench_resolution [--quick] [--seeds 0] [--sizes 224,160,128]
                                          [--students mobilenetv3_small_100,mobilenetv3_large_100]
                                          [--epochs 8] [--prune] [--no-latency] [--allow-busy] [--fresh]

MACs fall with the square of the input side (160 px: ~0.51x of 224 px, 128 px: ~0.33x), so the
input size trades accuracy for speed as pruning does. This measures what it costs in accuracy.
Synthetic ``segment`` beads rendered once per seed at 224 px (defect severity 0.3-0.7, so that
small defects make resolution matter), 600 training / 200 val / 300 test images (20% defects).
For each student (default: the ``configs/vit_to_mbv3.yaml`` recipe's, ``student.arch``) and input
size, the student is trained from scratch (``pretrained: false``, no hub here) by the pipeline's
own ``baseline_stage`` for the same epochs at every size, on the same images: each size reads the
224 px renders resized to it (``PreparedData`` renders once at the renderer's size and resizes;
one process shares the renders across sizes). Per (student, size): test AUROC (with its 95%
stratified bootstrap interval, :func:`profiling.report.quality.bootstrap_ci`), F1 at the threshold
chosen on validation (``eval.threshold: f1``), MACs (fvcore, BatchNorm folded, as everywhere in
the project) and params and, unless ``--no-latency``, the ONNX Runtime batch-1 median (fp32, every usable core,
:func:`profiling.cost.profile_model.profile_model` with the busy-CPU guard: a figure timed while
other processes used the CPU is withheld unless ``--allow-busy``). With several ``--seeds`` (each
draws the images, the initialisation and every batch) the accuracy is mean ± std over the seeds.

Training settings are the quickstart's student's (batch 32, lr 3e-3, 1 warm-up epoch, flips,
small rotations and colour jitter; each training image cycles through 2 rendered beads).

Wall time (an estimate, not measured here: the machine was shared while this was written): per
student and seed, about ``epochs x 600 / r_train + (epochs x 200 + 1,100) / r_eval`` seconds summed
over the sizes, where ``r_train`` and ``r_eval`` are the images per second training and evaluation
reach at that size (the log prints the training rate each epoch as ``img/s``); both grow roughly
as 1 / MACs, so 160 px costs about half of 224 px and 128 px about a third, and the three sizes
together about 1.8x the 224 px run. Rendering adds 2,300 beads at 224 px once per seed (the
renderer makes ~138 images/s there, ``bench_data``: ~20 s). ``--quick`` (tiny counts, 1 epoch,
64 and 48 px, MobileNetV3-Small) only checks that the script runs (under a minute) and writes to
``benchmarks/out/RESULTS-quick.md``.

Every model is a finished pipeline stage under ``benchmarks/out/bench_resolution/``: an interrupted
benchmark resumes where it stopped; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import OUT, LoadWatch, link_dir, md_table, record
from core.rundir import PREDICTIONS, RECORD, read_predictions
from data.prepare import prepare_data
from distill.config import Config, load_config
from distill.compress import prune_stage
from distill.stages import Context, baseline_stage
from profiling.cost.counting import count_macs, count_params
from profiling.cost.machine import other_cpu_load, usable_cores
from profiling.cost.profile_model import ModelEntry, profile_model
from profiling.report.quality import bootstrap_ci
from training.engine import pick_device
from training.modeling import load_meta, load_model
from training.seed import seed_everything

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"  # the training settings
RECIPE = ROOT / "configs" / "vit_to_mbv3.yaml"  # the student architecture
STAGE = "student_baseline"
PRUNED = "student_pruned"
SEVERITY = (0.3, 0.7)
RENDER_SIZE = 224
COUNTS = {"num_train": 600, "num_val": 200, "num_test": 300}
QUICK = {"render": 64, "sizes": [64, 48], "students": ["mobilenetv3_small_100"],
         "counts": {"num_train": 40, "num_val": 30, "num_test": 30}}
WITHIN = 0.01  # AUROC: "as accurate as the largest size" below this drop
BOOTSTRAP = 1000


@dataclass
class Cell:
    """One trained (student, size, seed)."""

    auroc: float
    f1: float
    ci: tuple[float, float]  # 95% bootstrap interval of the test AUROC
    epochs: int
    seconds: float | None  # training and scoring; None when the model was finished by an earlier run
    pruned: "Cell | None" = None  # with --prune: the same student pruned as the recipe prunes, recovered
    macs_pruned: int | None = None


@dataclass
class Cost:
    """One (student, size): what does not depend on the seed."""

    macs: int
    params: int
    latency_ms: float | None = None
    latency_note: str = ""  # why latency_ms is missing


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_resolution", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs, measures nothing")
    p.add_argument("--seeds", default="0", help="comma-separated (default 0)")
    p.add_argument("--sizes", default=None, help="input sizes in px, comma-separated (default 224,160,128)")
    p.add_argument("--students", default=None,
                   help=f"timm names, comma-separated (default: student.arch of {RECIPE.relative_to(ROOT)})")
    p.add_argument("--epochs", type=int, default=8, help="epochs of every model (default 8; --quick: 1)")
    p.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime timing")
    p.add_argument("--prune", action="store_true",
                   help="also prune each student with the recipe's prune settings, recovered by distillation from "
                        "the unpruned student, and report the pruned AUROC beside it")
    p.add_argument("--prune-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change the recipe's prune settings for --prune, e.g. global_pruning=true")
    p.add_argument("--allow-busy", action="store_true",
                   help="keep latency figures timed while other processes used the CPU")
    p.add_argument("--fresh", action="store_true", help="delete earlier benchmark models and train everything again")
    return p.parse_args(argv)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{what}: '{text}' is not a comma-separated list of integers") from None
    if not values:
        raise SystemExit(f"--{what}: give at least one value")
    return values


def overrides(root: Path, seed: int, student: str, size: int, *, epochs: int, render: int,
              counts: dict[str, int]) -> list[str]:
    """The quickstart config turned into this benchmark's cell: one render size, the student at ``size``."""
    out = [f"run.output_dir={root}", f"run.seed={seed}", f"data.synthetic.image_size={render}",
           f"data.synthetic.severity=[{SEVERITY[0]},{SEVERITY[1]}]", "data.synthetic.variants=2",
           f"student.arch={student}", "student.pretrained=false", "student.weights=null", f"student.img_size={size}",
           f"student.epochs={epochs}"]
    return out + [f"data.synthetic.{k}={v}" for k, v in counts.items()]


def _score(stage_dir: Path, seconds: float | None) -> Cell:
    meta = load_meta(stage_dir)
    test = meta["metrics"]["test"]
    scores = read_predictions(stage_dir / PREDICTIONS)["test"]
    ci = bootstrap_ci(scores.probs, scores.labels, meta["threshold"], ("auroc",), n=BOOTSTRAP)["auroc"]
    return Cell(test["auroc"], test["f1"], ci, meta["epochs_run"], seconds)


def bench_root(quick: bool, prune_set: tuple[str, ...] | list[str] = ()) -> Path:
    """Where the models live: one folder per set of ``--prune-set`` changes (the unpruned students
    of the plain folder are linked into the others)."""
    return OUT / (("bench_resolution_quick" if quick else "bench_resolution")
                  + "".join(f"_{c.replace('=', '-')}" for c in prune_set))


def recipe_prune(changes: list[str] | tuple[str, ...]):
    """The recipe's ``prune:`` settings with ``--prune-set`` changes (validated as config overrides).

    The recovery's learning rate keeps the recipe's ratio to the student's own: the recipe's student
    is pretrained and fine-tuned at its lr, this benchmark's is trained from scratch at the
    quickstart's (a copied absolute rate would be a different recipe). ``lr=`` in the changes wins.
    """
    recipe = load_config(RECIPE, [f"prune.{c}" for c in changes])
    if any(c.split("=", 1)[0].strip() == "lr" for c in changes):
        return recipe.prune
    ratio = recipe.prune.lr / recipe.student.lr
    return dataclasses.replace(recipe.prune, lr=ratio * load_config(CONFIG).student.lr)


def _pruned(cell_dir: Path, cfg: Config, data, device, log) -> tuple[Cell, int]:
    """Prune the cell's trained student with the recipe's ``prune:`` settings, recovered by
    distillation from the unpruned student itself (the pipeline distills from the teacher; here the
    question is only what the pruning costs), and score it."""
    for role in ("teacher", "student"):  # the prune stage reads both; here both are the trained student
        link_dir(cell_dir / STAGE, cell_dir / role)
    earlier = (cell_dir / PRUNED / RECORD).is_file()
    model = load_model(cell_dir / STAGE)
    t0 = time.perf_counter()
    prune_stage(Context(cfg, cell_dir, data, device, log), model, model)
    cell = _score(cell_dir / PRUNED, None if earlier else time.perf_counter() - t0)
    return cell, int(load_meta(cell_dir / PRUNED)["cost"]["macs"])


def run_seed(args: argparse.Namespace, root: Path, seed: int, students: list[str], sizes: list[int], settings: dict,
             log) -> dict[tuple[str, int], Cell]:
    """Every (student, size) of one seed, on one split rendered once."""
    seed_dir = root / f"seed{seed}"
    base = load_config(CONFIG, overrides(root, seed, students[0], sizes[0], epochs=args.epochs, **settings))
    t0 = time.perf_counter()
    data = prepare_data(base.data, seed_dir / "data_run" / "data", seed)
    log(f"[bench] seed {seed}: data ready in {time.perf_counter() - t0:.0f} s")
    device = pick_device("cpu")
    out = {}
    for student in students:
        for size in sizes:
            cell_dir = seed_dir / f"{student}_{size}"
            link_dir(seed_dir / "data_run" / "data", cell_dir / "data")
            if args.prune_set:  # the unpruned students are the same: reuse the ones trained without --prune-set
                plain = bench_root(args.quick) / f"seed{seed}"
                if (plain / f"{student}_{size}" / STAGE / RECORD).is_file():
                    link_dir(plain / f"{student}_{size}" / STAGE, cell_dir / STAGE)
            cfg: Config = load_config(CONFIG, overrides(root, seed, student, size, epochs=args.epochs, **settings))
            assert cfg.data == base.data  # one split and one set of renders for every size
            earlier = (cell_dir / STAGE / RECORD).is_file()  # resumed: its time is not this run's
            seed_everything(seed)
            t0 = time.perf_counter()
            baseline_stage(Context(cfg, cell_dir, data, device, log))
            seconds = None if earlier else time.perf_counter() - t0
            out[(student, size)] = cell = _score(cell_dir / STAGE, seconds)
            log(f"[bench] seed {seed} {student} @{size}: test AUROC {cell.auroc:.4f} "
                f"[{cell.ci[0]:.3f}, {cell.ci[1]:.3f}], F1 {cell.f1:.3f}"
                + (f" ({seconds:.0f} s)" if seconds is not None else " (finished earlier)"))
            if args.prune:
                pcfg = dataclasses.replace(cfg, prune=recipe_prune(args.prune_set))
                seed_everything(seed)
                cell.pruned, cell.macs_pruned = _pruned(cell_dir, pcfg, data, device, log)
                log(f"[bench] seed {seed} {student} @{size} pruned ({pcfg.prune.target}): test AUROC "
                    f"{cell.pruned.auroc:.4f} [{cell.pruned.ci[0]:.3f}, {cell.pruned.ci[1]:.3f}]")
    return out


def measure_cost(stage_dir: Path, size: int, *, latency: bool, threads: int, allow_busy: bool, quick: bool) -> Cost:
    """MACs and params of a trained student and, with ``latency``, its ONNX Runtime batch-1 median."""
    from deploy.export import export_onnx

    net = load_model(stage_dir).net.eval()
    cost = Cost(count_macs(net, torch.zeros(1, 3, size, size)).macs_bn_folded, count_params(net))
    if not latency:
        cost.latency_note = "not timed (--no-latency)"
        return cost
    onnx = export_onnx(net, stage_dir.parent / "student.onnx", size, metadata={"note": "bench_resolution timing"})
    warmup, runs = (1, 3) if quick else (10, 30)
    stats = profile_model(ModelEntry(net, size, onnx=onnx), runtimes=["onnx"], batch_sizes=[1], threads=threads,
                          warmup=warmup, runs=runs, allow_busy=allow_busy, strict=True, peak_memory=False)
    figure = stats["latency"]["onnx_b1"]
    if figure.get("median_ms") is not None:
        cost.latency_ms = figure["median_ms"]
    else:
        reason = figure.get("skipped") or "no figure"
        cost.latency_note = "withheld (busy CPU)" if reason.startswith("CPU busy") else f"n/a ({reason})"
    return cost


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _seconds(cells: list[Cell]) -> str:
    timed = [c.seconds for c in cells if c.seconds is not None]
    if not timed:
        return "— (finished earlier)"
    partial = f" ({len(timed)} of {len(cells)} seeds)" if len(timed) < len(cells) else ""
    return f"{statistics.mean(timed):.0f}{partial}"


def _signed(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.3f}"
    return f"{statistics.mean(values):+.3f} ± {statistics.stdev(values):.3f}"


def _pruned_cells(cells: list[Cell]) -> list[str]:
    if any(c.pruned is None for c in cells):
        return []
    return [_mean_sd([c.pruned.auroc for c in cells]), _signed([c.pruned.auroc - c.auroc for c in cells]),
            f"{statistics.mean(c.macs_pruned for c in cells) / 1e6:.1f}"]


def tables(results: dict[int, dict[tuple[str, int], Cell]], costs: dict[tuple[str, int], Cost], students: list[str],
           sizes: list[int]) -> tuple[str, list[str]]:
    """The (student, size) table and the sentences computed from it; ``results`` by seed."""
    seeds = sorted(results)
    largest = max(sizes)
    rows, verdicts = [], []
    for student in students:
        ref = [results[s][(student, largest)].auroc for s in seeds]
        ref_cost = costs[(student, largest)]
        kept = []
        for size in sorted(sizes, reverse=True):
            cells = [results[s][(student, size)] for s in seeds]
            auroc = [c.auroc for c in cells]
            cost = costs[(student, size)]
            delta = [a - r for a, r in zip(auroc, ref)]
            rows.append([student, f"{size} px", _mean_sd(auroc), "; ".join(f"[{c.ci[0]:.3f}, {c.ci[1]:.3f}]"
                                                                           for c in cells),
                         _mean_sd([c.f1 for c in cells]), "—" if size == largest else _signed(delta),
                         f"{cost.macs / 1e6:.1f}", f"{cost.macs / ref_cost.macs:.2f}×", f"{cost.params / 1e6:.2f}",
                         f"{cost.latency_ms:.3g}" if cost.latency_ms is not None else cost.latency_note,
                         _seconds(cells), *_pruned_cells(cells)])
            if size != largest and statistics.mean(delta) >= -WITHIN:
                kept.append(size)
        drops = ", ".join(
            f"{size} px {statistics.mean(results[s][(student, size)].auroc - r for s, r in zip(seeds, ref)):+.3f} "
            f"({costs[(student, size)].macs / ref_cost.macs:.2f}× the MACs)"
            for size in sorted(sizes, reverse=True) if size != largest)
        smallest = min(kept) if kept else None
        verdicts.append(
            f"- {student}: test AUROC against {largest} px (mean over {len(seeds)} seed(s)): "
            f"{drops or 'one size only'}. "
            + (f"The smallest size within {WITHIN} AUROC of {largest} px is **{smallest} px**."
               if smallest is not None else
               f"No smaller size stays within {WITHIN} AUROC of {largest} px.")
            + (" One seed: read the drops against the bootstrap intervals." if len(seeds) == 1 else ""))
    head = ["student", "input", "test AUROC", "95% bootstrap CI (per seed)", "test F1 (val threshold)",
            f"Δ AUROC vs {largest} px", "MACs (M)", f"MACs vs {largest} px", "params (M)", "ONNX b1 median ms",
            "train + eval s (mean)"]
    pruned = [c.pruned for r in results.values() for c in r.values()]
    if pruned and all(p is not None for p in pruned):
        head += ["pruned: test AUROC", "pruned: Δ vs unpruned", "pruned: MACs (M)"]
        for student in students:
            for size in sorted(sizes, reverse=True):
                cells = [results[s][(student, size)] for s in seeds]
                delta = statistics.mean(c.pruned.auroc - c.auroc for c in cells)
                if delta > WITHIN:
                    word = (f"more than {WITHIN} above it: the unpruned student is undertrained (its pruned copy "
                            "trained longer); judge with more --epochs")
                else:
                    word = f"{'within' if delta >= -WITHIN else 'beyond'} {WITHIN}"
                verdicts.append(f"- {student} @{size} px pruned: Δ AUROC {delta:+.3f} against the unpruned student "
                                f"({word})")
    else:
        rows = [r[:len(head)] for r in rows]
    return md_table(head, rows), verdicts


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    seeds = _ints(args.seeds, "seeds")
    recipe = load_config(RECIPE)
    if args.quick:
        sizes = _ints(args.sizes, "sizes") if args.sizes else QUICK["sizes"]
        students = args.students.split(",") if args.students else QUICK["students"]
        settings = {"render": QUICK["render"], "counts": QUICK["counts"]}
        seeds, args.epochs = seeds[:1], 1
    else:
        sizes = _ints(args.sizes, "sizes") if args.sizes else [224, 160, 128]
        students = args.students.split(",") if args.students else [recipe.student.arch]
        settings = {"render": RENDER_SIZE, "counts": COUNTS}
    students = [s.strip() for s in students if s.strip()]
    sizes = sorted(set(sizes), reverse=True)
    if min(sizes) < 32:
        raise SystemExit(f"--sizes: {min(sizes)} px is below 32 px, the students' total stride")
    if max(sizes) > settings["render"]:
        raise SystemExit(f"--sizes: {max(sizes)} px is above the {settings['render']} px the images are rendered at")
    root = bench_root(args.quick, args.prune_set)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    # AUROCs do not depend on the CPU load (only the wall time does): no need to wait for an idle CPU.
    load_before = other_cpu_load(2.0) or 0.0
    watch, t0 = LoadWatch(), time.perf_counter()
    results = {s: run_seed(args, root, s, students, sizes, settings, print) for s in seeds}
    threads = usable_cores()
    costs = {(student, size): measure_cost(root / f"seed{seeds[0]}" / f"{student}_{size}" / STAGE, size,
                                           latency=not args.no_latency, threads=threads, allow_busy=args.allow_busy,
                                           quick=args.quick)
             for student in students for size in sizes}
    table, verdicts = tables(results, costs, students, sizes)
    cfg = load_config(CONFIG, overrides(root, seeds[0], students[0], sizes[0], epochs=args.epochs, **settings))
    syn, st, pr = cfg.data.synthetic, cfg.student, recipe_prune(args.prune_set)
    body = "\n".join([
        f"Synthetic {syn.view} beads rendered at {syn.image_size} px, severity {list(syn.severity)}, {syn.num_train} "
        f"training / {syn.num_val} val / {syn.num_test} test images ({syn.defect_ratio:.0%} defects; each training "
        f"image cycles through {syn.variants} renders); every size reads the same renders resized. Students from "
        f"scratch (`baseline_stage`), {args.epochs} epoch(s) at every size, batch {st.batch_size}, lr {st.lr:g}; "
        f"seeds {seeds}. Test AUROC is threshold-free (95% stratified bootstrap interval, {BOOTSTRAP} resamples); F1 "
        f"at the threshold chosen on validation ({cfg.eval.threshold}). MACs (fvcore, BatchNorm folded) and params: "
        "per image. Latency: "
        + ("not timed." if args.no_latency else
           f"ONNX Runtime fp32, batch 1, {threads} thread(s), median of {3 if args.quick else 30} runs (seed "
           f"{seeds[0]}'s model; the weights do not change it)."),
        *([f"With --prune: each trained student pruned as `{RECIPE.relative_to(ROOT)}` prunes (target "
           f"{pr.target}, {pr.steps} round(s), importance {pr.importance}, global_pruning {pr.global_pruning}, "
           f"{pr.finetune_epochs} epoch(s) between rounds, {pr.epochs} after the last, lr {pr.lr:g}"
           + (f"; changed: {', '.join(args.prune_set)}" if args.prune_set else "")
           + "), recovered by distillation from the unpruned student itself."] if args.prune else []),
        "",
        table,
        "",
        "What the numbers say (computed from the table):",
        "",
        *verdicts,
    ])
    record("bench_resolution: accuracy against input size", body, quick=args.quick, load_before=load_before,
           watch=watch, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
