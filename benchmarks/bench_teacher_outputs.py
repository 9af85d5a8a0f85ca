"""Student-epoch time with cached teacher outputs, with the live teacher, and with no teacher.

Target: ``distill.teacher_outputs: cached`` within 1.3x the epoch time of a student trained
without a teacher.

    python -m benchmarks.bench_teacher_outputs [--setting quickstart|recipe] [--quick] [--epochs N]

``quickstart``: ``configs/quickstart.yaml`` (teacher: conv-stem ViT at 64 px; student:
MobileNetV3-Small at 96 px, 1200 training images); the teacher is trained once, for 2 epochs
instead of 20 (only its cost per image matters here, not its accuracy). ``recipe``: the sizes of
``configs/vit_to_mbv3.yaml`` with a pool, where the cache matters most: a ``vit_small_patch16_224``
teacher at 224 px (untrained weights: its cost does not depend on them), a MobileNetV3-Large
student at 224 px, 400 labeled synthetic beads and a pool of 2,000 unlabeled ones. Then, in this
one process and on the same data, the student trains for N epochs in each of three modes through
the project's own code (``distill.stages.student_run_parts`` and ``training.loop.fit``, as the
student stage runs them; a student with a teacher learns from the labeled and unlabeled images,
one without from the labels with as many updates):

- none: the from-scratch student (what the ``student_baseline`` stage trains);
- live: the teacher runs on every training batch;
- cached: the teacher's outputs on ``distill.cache_views`` fixed views per image are computed once
  (the one-off cost, timed separately), then looked up.

An epoch is timed from the end of the previous one to fit's end-of-epoch log line: the training
pass, validation (300 images, the same in every mode) and the checkpoint. The first epoch of each
mode is a warm-up and is left out of the median. The synthetic training beads (``synthetic.variants``
per image, which the real stage renders during its first epochs, whatever the mode) are all
rendered before any timing, so no mode pays for rendering the others reuse.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import OUT, LoadWatch, md_table, record, wait_for_idle_cpu
from core.errors import UserError
from data.manifest import UNLABELED
from data.prepare import prepare_data
from distill.config import Config, load_config
from distill.stages import Context, student_run_parts, teacher_stage
from distill.teacher_cache import TeacherCache
from profiling.cost.machine import other_cpu_load
from student.model import build_student
from teacher.model import build_teacher
from training.engine import pick_device
from training.loop import fit
from training.seed import seed_everything

MODES = ("none", "live", "cached")
TARGET = 1.3  # cached s/epoch over no-teacher s/epoch
#: config file, its overrides, epochs per mode (the first is a warm-up), whether the teacher is trained
SETTINGS = {
    "quickstart": ("configs/quickstart.yaml", ["teacher.epochs=2"], 6, True),
    "recipe": ("configs/vit_to_mbv3.yaml", [
        "data.source=synthetic", "data.path=null", "data.synthetic.image_size=224", "data.synthetic.num_train=400",
        "data.synthetic.num_unlabeled=2000", "data.synthetic.num_val=100", "data.synthetic.num_test=100",
        "data.synthetic.variants=1", "teacher.pretrained=false", "student.pretrained=false", "distill.mixup=0",
        "distill.cache_views=1", "student.ema=false", "student.patience=null", "student.batch_size=32"], 3, False),
}
QUICK_DATA = ["data.synthetic.num_train=64", "data.synthetic.num_val=32", "data.synthetic.num_test=32",
              "data.synthetic.num_unlabeled=32", "data.synthetic.image_size=64", "teacher.epochs=1"]


def _load_before(quick: bool) -> float:
    if not quick:
        return wait_for_idle_cpu()
    load = other_cpu_load(1.0)  # a quick check measures nothing, so it does not wait
    return math.nan if load is None else load


def _config(setting: str, quick: bool, epochs: int, mode: str) -> Config:
    path, extra, _, _ = SETTINGS[setting]
    name = f"bench_teacher_outputs_{setting}" + ("_quick" if quick else "")
    over = [f"run.name={name}", f"run.output_dir={OUT}", *extra, f"student.epochs={epochs}",
            f"distill.teacher_outputs={'live' if mode == 'none' else mode}"]
    return load_config(path, over + (QUICK_DATA if quick else []))


def _say(text: str) -> None:
    print(text, flush=True)


def _prepare(cfg: Config, train_teacher: bool) -> tuple[Context, torch.nn.Module]:
    """Data and teacher (reused from an earlier run of this script when made with the same config)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    for attempt in (1, 2):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            seed_everything(cfg.run.seed)
            data = prepare_data(cfg.data, run_dir / "data", cfg.run.seed)
            ctx = Context(cfg, run_dir, data, pick_device(cfg.run.device), _say)
            return ctx, (teacher_stage(ctx) if train_teacher else build_teacher(cfg.teacher).eval())
        except UserError as exc:  # made with another config: start this scratch run again
            if attempt == 2:
                raise
            _say(f"{exc}\n-> removing {run_dir} and starting again")
            shutil.rmtree(run_dir)
    raise AssertionError("unreachable")


def _prerender(ctx: Context, sizes: list[int]) -> tuple[float, float]:
    """Render every training bead (labeled and unlabeled) the models will see at ``sizes``:
    (plain views s, variants s)."""
    syn = ctx.cfg.data.synthetic
    if ctx.cfg.data.source != "synthetic":
        return 0.0, 0.0
    t0 = time.perf_counter()
    datasets = [ctx.data.dataset(("train", UNLABELED), size, train=True) for size in sizes]  # plain views
    base_s = time.perf_counter() - t0
    if not (syn.fresh and syn.variants):
        return base_s, 0.0
    t0 = time.perf_counter()
    for dataset, size in zip(datasets, sizes):
        for index in range(len(dataset)):
            for variant in range(1, syn.variants + 1):
                dataset._variant(index, variant, size)  # kept in the run's shared variant cache
    return base_s, time.perf_counter() - t0


def _run_mode(base: Context, teacher: torch.nn.Module, mode: str, setting: str, quick: bool, epochs: int) -> dict:
    cfg = _config(setting, quick, epochs, mode)
    ctx = Context(cfg, base.run_dir, base.data, base.device, _say, base.dist)
    stage_dir = ctx.run_dir / f"bench_{mode}"
    shutil.rmtree(stage_dir, ignore_errors=True)
    if mode == "cached":  # the cache lives in the student stage's folder: build it afresh
        shutil.rmtree(ctx.run_dir / "student", ignore_errors=True)
    seed_everything(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)  # the same initial student in every mode, as the stages do
    student = build_student(cfg.student)
    t0 = time.perf_counter()
    train, val, trainee_of, step, what = student_run_parts(ctx, student, None if mode == "none" else teacher,
                                                           stage_dir)
    setup_s = time.perf_counter() - t0
    _say(f"[{mode}] {what}; setup {setup_s:.1f} s")
    stamps: list[float] = []

    def log(line: str) -> None:
        if " epoch " in line:
            stamps.append(time.perf_counter())
        _say(line)

    start = time.perf_counter()
    result = fit(trainee_of(student), step, train, val, cfg.student, stage_dir, device=ctx.device,
                 eval_model=student, channels_last=True, name=f"bench_{mode}", log=log)
    walls = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    trains = [row["train_time_s"] for row in result.history]
    out = {"mode": mode, "setup_s": setup_s, "walls": walls, "trains": trains, "images": len(train.sampler)}
    if mode == "cached":
        path = ctx.run_dir / "student" / "teacher_cache.safetensors"
        t0 = time.perf_counter()
        TeacherCache.load(path)
        out["load_s"], out["cache_kb"] = time.perf_counter() - t0, path.stat().st_size / 2**10
    return out


def _steady(values: list[float]) -> float:
    """Median over the epochs after the first (the warm-up); the one epoch when there is only one."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_teacher_outputs", description=__doc__.split("\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="quickstart",
                   help="quickstart sizes, or the vit_to_mbv3 recipe's sizes with a pool of 2,000 images")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs, measures nothing")
    p.add_argument("--epochs", type=int, default=None, help="student epochs per mode (default: the setting's; quick 3)")
    args = p.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else SETTINGS[args.setting][2])
    if epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    load_before = _load_before(args.quick)
    watch, t_start = LoadWatch(), time.perf_counter()

    base_cfg = _config(args.setting, args.quick, epochs, "live")
    reused = (Path(base_cfg.run.output_dir) / base_cfg.run.name / "teacher" / "meta.json").is_file()
    t0 = time.perf_counter()
    ctx, teacher = _prepare(base_cfg, SETTINGS[args.setting][3])
    prep_s = time.perf_counter() - t0
    sizes = sorted({base_cfg.student.img_size or 224, teacher.img_size})  # each model's own view
    base_s, variants_s = _prerender(ctx, sizes)
    size = "/".join(map(str, sizes))
    _say(f"data + teacher {prep_s:.1f} s; rendered the plain views at {size} px in {base_s:.1f} s and "
         f"the training variants in {variants_s:.1f} s")
    runs = {mode: _run_mode(ctx, teacher, mode, args.setting, args.quick, epochs) for mode in MODES}

    none_wall, none_train = _steady(runs["none"]["walls"]), _steady(runs["none"]["trains"])
    rows = []
    for mode in MODES:
        r = runs[mode]
        wall, train = _steady(r["walls"]), _steady(r["trains"])
        one_off = "none"
        if mode == "cached":
            one_off = (f"{r['setup_s']:.1f} s to build ({base_cfg.distill.cache_views} views x {r['images']} images,"
                       f" {r['cache_kb']:.0f} KB); {r['load_s']:.2f} s to load it again (the prune stage does)")
        rows.append([mode, f"{wall:.2f}", f"{train:.2f}", f"{wall / none_wall:.2f}x", f"{train / none_train:.2f}x",
                     f"{r['walls'][0]:.2f}", one_off])
    table = md_table(["teacher outputs", "s/epoch", "of which training pass s", "x no teacher",
                      "x no teacher (training pass)", "first epoch s", "one-off cost"], rows)

    cached = runs["cached"]
    ratio = _steady(cached["walls"]) / none_wall
    real_epochs = load_config(SETTINGS[args.setting][0]).student.epochs
    amortised = _steady(cached["walls"]) + cached["setup_s"] / real_epochs
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    trained = (f"trained for {base_cfg.teacher.epochs} epoch(s) only (timing, not accuracy)"
               if SETTINGS[args.setting][3] else "untrained weights (its cost does not depend on them)")
    body = "\n".join([
        f"Setting `{args.setting}`. Student {base_cfg.student.arch} at {base_cfg.student.img_size} px, "
        f"{runs['cached']['images']} training images per epoch ({len(ctx.data.split('train'))} labeled, "
        f"{len(ctx.data.split(UNLABELED))} unlabeled), batch {base_cfg.student.batch_size}; teacher "
        f"{base_cfg.teacher.arch} ({teacher.img_size} px, its own view) {trained}; device {ctx.device.type}, "
        f"{torch.get_num_threads()} torch threads. {epochs} epochs per mode; "
        "s/epoch is the median over epochs 2.."
        f"{epochs} of the whole epoch (training pass + validation on {len(ctx.data.split('val'))} images + "
        "checkpoint), the training pass alone beside it.",
        "",
        table,
        "",
        f"- target: cached <= {TARGET}x no teacher: **{verdict}** ({ratio:.2f}x per epoch; with the one-off cache "
        f"build spread over the quickstart's {real_epochs} student epochs, not counting the prune stage's reuse: "
        f"{amortised / none_wall:.2f}x)",
        f"- live teacher: {_steady(runs['live']['walls']) / none_wall:.2f}x no teacher per epoch",
        f"- not in the epochs: data + teacher {prep_s:.0f} s{' (teacher reused from an earlier run)' * reused}; "
        f"rendering the plain views at {size} px {base_s:.1f} s "
        f"and the {base_cfg.data.synthetic.variants} training beads per image {variants_s:.1f} s, shared by every "
        "mode (the student stage renders them during its first epochs whatever the mode)",
    ])
    record(f"Student epoch: cached vs live teacher outputs vs no teacher ({args.setting})", body, quick=args.quick,
           load_before=load_before, watch=watch, wall_s=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
