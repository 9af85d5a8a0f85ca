"""Whole-part images: the whole frame resized to the model's size, against tiles and the worst tile.

    python -m benchmarks.bench_tiles [--quick] [--seeds 0,1,2] [--models teacher,student_baseline] [--epochs N]
                                     [--config configs/part_tiles_lite0.yaml]

The synthetic ``part`` view of ``configs/part_tiles.yaml`` (the whole part at 256 px, the bead a
thin line in it). For each seed (it draws the images, every initialisation and every batch) and
each model of the recipe (the from-scratch ViT teacher; the MobileNetV3-Small student trained
without a teacher, ``student_baseline``), two arms on the same rendered images:

- ``resized``: the whole 256 px image resized to the model's size (``data.tiles`` off, one render
  per image: ``synthetic.fresh`` off, as tiles are);
- ``tiles``: the recipe's 4x4 grid of overlapping tiles, each resized to the model's size; the
  image's score is its worst tile's.

Both arms train for the same epochs (so the tiled arm makes 16x the updates: one per tile; that is
what tiling costs, and the table says how long each arm trained). The figure compared is the
image-level test AUROC (threshold-free); image F1 at the threshold chosen on validation images
is beside it. Target: tiling >= 0.95 image AUROC where the resized image stays near chance
(<= 0.65).

``--config configs/part_tiles_lite0.yaml`` puts the pretrained EfficientNet-Lite0 teacher in the
teacher's place (the same images and tiles).

Models are finished pipeline stages under ``benchmarks/out/bench_tiles/`` (one folder per config):
an interrupted benchmark resumes where it stopped; ``--fresh`` starts over. Expected wall time on
the 2-core machine with nothing else running: about 4-5 min per seed for the default config (the
tiled arm dominates: 16 tiles per image), so 12-15 min for three seeds; the Lite0 config is slower
(its teacher is ~4x the ViT's MACs), roughly twice that. (``--quick``: ~2 min.)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.common import OUT, LoadWatch, md_table, record
from data.prepare import prepare_data
from distill.config import load_config
from distill.stages import Context, baseline_stage, teacher_stage
from profiling.cost.latency import matmul_peak_gflops
from profiling.cost.machine import other_cpu_load, usable_cores
from training.engine import pick_device
from training.modeling import load_meta
from training.seed import seed_everything

CONFIG = Path("configs/part_tiles.yaml")
ARMS = {"resized": ["data.tiles=null", "data.synthetic.fresh=false"], "tiles": []}
STAGES = {"teacher": teacher_stage, "student_baseline": baseline_stage}
TARGET_TILES, CHANCE = 0.95, 0.65


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs, measures nothing")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--models", default="teacher,student_baseline", help="teacher and/or student_baseline")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every model in both arms (default: the recipe's)")
    p.add_argument("--config", type=Path, default=CONFIG, help=f"the recipe (default {CONFIG})")
    p.add_argument("--fresh", action="store_true", help="delete earlier benchmark models and train everything again")
    return p.parse_args()


def _overrides(args: argparse.Namespace, root: Path, seed: int, arm: str) -> list[str]:
    out = [f"run.output_dir={root}", f"run.seed={seed}", *ARMS[arm]]
    if args.epochs is not None:
        out += [f"teacher.epochs={args.epochs}", f"student.epochs={args.epochs}"]
    if args.quick:
        out += ["data.synthetic.image_size=128", "data.synthetic.num_train=24", "data.synthetic.num_val=12",
                "data.synthetic.num_test=12", "teacher.epochs=1", "student.epochs=1"]
    return out


def run_arm(args: argparse.Namespace, root: Path, seed: int, arm: str, models: list[str], log) -> dict[str, dict]:
    """The models of one (seed, arm): image-level test metrics (and tile-level ones), seconds trained."""
    run_dir = root / f"seed{seed}" / arm
    cfg = load_config(args.config, _overrides(args, root, seed, arm))
    data = prepare_data(cfg.data, run_dir / "data", seed)
    ctx = Context(cfg, run_dir, data, pick_device("cpu"), log)
    out = {}
    for name in models:
        seed_everything(seed)
        t0 = time.perf_counter()
        STAGES[name](ctx)
        meta = load_meta(run_dir / name)
        image = meta["image"]["metrics"]["test"] if arm == "tiles" else meta["metrics"]["test"]
        out[name] = {"image": image, "tile": meta["metrics"]["test"] if arm == "tiles" else None,
                     "seconds": time.perf_counter() - t0, "epochs": meta["epochs_run"],
                     "size": load_meta(run_dir / name)["img_size"]}
        log(f"[bench] seed {seed} {arm} {name}: image test AUROC {image['auroc']:.4f} ({out[name]['seconds']:.0f} s)")
    return out


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(results: dict[tuple[int, str], dict[str, dict]], seeds: list[int],
           models: list[str]) -> tuple[str, list[str]]:
    rows, verdicts = [], []
    for name in models:
        for arm in ARMS:
            cells = [results[(s, arm)][name] for s in seeds]
            tile = [c["tile"]["auroc"] for c in cells if c["tile"]]
            rows.append([name, arm, f"{cells[0]['size']} px", _mean_sd([c["image"]["auroc"] for c in cells]),
                         _mean_sd([c["image"]["f1"] for c in cells]), _mean_sd(tile) if tile else "-",
                         f"{cells[0]['epochs']}", f"{statistics.mean(c['seconds'] for c in cells):.0f}"])
        tiled = statistics.mean(results[(s, "tiles")][name]["image"]["auroc"] for s in seeds)
        resized = statistics.mean(results[(s, "resized")][name]["image"]["auroc"] for s in seeds)
        met = tiled >= TARGET_TILES and resized <= CHANCE
        verdicts.append(
            f"- {name}: tiles {tiled:.3f} against resized {resized:.3f} image-level test AUROC (mean of {len(seeds)} "
            f"seed(s)); target (tiles >= {TARGET_TILES}, resized <= {CHANCE}): **{'met' if met else 'not met'}**"
            + ("" if tiled >= TARGET_TILES else f" — tiling stays below {TARGET_TILES}")
            + ("" if resized <= CHANCE else " — the resized image is not near chance here"))
    head = ["model", "arm", "model input", "image test AUROC (mean ± std)", "image test F1", "tile test AUROC",
            "epochs", "train + eval s (mean)"]
    return md_table(head, rows), verdicts


def main() -> int:
    args = _args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in STAGES]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(STAGES)}")
    if args.quick:
        seeds = seeds[:1]
    root = OUT / ("bench_tiles_quick" if args.quick else "bench_tiles") / args.config.stem
    if args.fresh and root.exists():
        shutil.rmtree(root)
    # AUROCs do not depend on the CPU load (only the wall time does): no need to wait for an idle CPU.
    load_before = other_cpu_load(2.0) or 0.0
    threads = usable_cores()
    peak = matmul_peak_gflops(threads)
    watch, t0 = LoadWatch(), time.perf_counter()
    results = {(s, arm): run_arm(args, root, s, arm, models, print) for s in seeds for arm in ARMS}
    table, verdicts = tables(results, seeds, models)
    cfg = load_config(args.config, _overrides(args, root, seeds[0], "tiles"))
    syn, tiles = cfg.data.synthetic, cfg.data.tiles
    body = "\n".join([
        f"Synthetic {syn.view} view at {syn.image_size} px, severity {list(syn.severity)}, {syn.num_train} training / "
        f"{syn.num_val} val / {syn.num_test} test images ({syn.defect_ratio:.0%} defects); the same images in both "
        f"arms. `resized`: the whole image resized to the model's input; `tiles`: grid {list(tiles.grid)} with overlap "
        f"{tiles.overlap}, a tile a defect when it holds {tiles.min_box_fraction} of a defect box, the image scored by "
        f"its worst tile. Models from `{args.config}` ({cfg.teacher.arch} teacher "
        f"{'from ' + cfg.teacher.weights if cfg.teacher.weights else 'from scratch'} at {cfg.teacher.img_size} px, "
        f"{cfg.student.arch} from scratch at {cfg.student.img_size} px), the same epochs in both arms (the tiled arm "
        f"makes one update per tile: {tiles.grid[0] * tiles.grid[1]}x as many); seeds {seeds}. Image AUROC is "
        "threshold-free; F1 at the threshold chosen on validation images.",
        f"fp32 matmul peak of this machine: {peak:.1f} GFLOP/s with {threads} thread(s).",
        "",
        table,
        "",
        "What the numbers say (computed from the table):",
        "",
        *verdicts,
    ])
    record("bench_tiles: whole-part images, resized against tiled", body, quick=args.quick,
           load_before=load_before, watch=watch, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
