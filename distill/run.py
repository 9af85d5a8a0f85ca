"""The pipeline, one stage after another: data -> teacher -> student -> prune -> export -> report.

    python -m distill.run CONFIG [a.b=c ...] [--stages data,teacher,...] [--force STAGE] [--debug]

Everything a run makes lives in ``<run.output_dir>/<run.name>/``. A stage whose finished artifact
exists is skipped on rerun; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import torch

from core.errors import UserError, run_cli
from core.files import is_partial
from data.prepare import prepare_data, summary_lines
from distill.config import Config, load_config, save_config
from core.rundir import MODELS, STAGE_OUTPUTS, STAGES, RunDir
from distill.compress import prune_stage
from deploy.openvino_runtime import require_openvino
from distill.deliver import export_stage, report_stage, uses_openvino
from distill.stages import Context, baseline_stage, check_finished_stages, student_stage, teacher_stage
from training.distributed import Dist, barrier, close_distributed, init_distributed
from training.engine import pick_device
from training.modeling import Classifier, load_model
from training.networks import check_arch
from training.seed import seed_everything

__all__ = ["main", "STAGES"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distill.run", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a YAML recipe, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as teacher.epochs=3 run.name=try2")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to run (default: all of {','.join(STAGES)})")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo a stage even if it finished (and everything after it that is run)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def _stage_list(text: str, option: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad:
        raise UserError(f"{option}: unknown stage(s) {bad}; the stages are {', '.join(STAGES)}")
    return names


def _say(text: str) -> None:
    print(text, flush=True)


def _force(run_dir: Path, force: list[str]) -> None:
    """Remove the forced stages' outputs and those of every later stage (they were built on them)."""
    if not force:
        return
    first = min(STAGES.index(s) for s in force)
    for stage in STAGES[first:]:
        for name in STAGE_OUTPUTS[stage]:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def _remove_partial_files(run_dir: Path) -> None:
    """Delete what a killed run left half-written: every file is written to a hidden temporary
    name (``.name.<pid>.tmp``) or folder (``.export-*``, ``.quantize-*``) and renamed when complete,
    so anything still under such a name is a leftover."""
    leftovers = [p for p in run_dir.rglob(".*") if is_partial(p)]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if leftovers:
        _say(f"removed {len(leftovers)} partial file(s) left by an interrupted run")


def _finished(ctx: Context, name: str, needed_by: str) -> Classifier:
    """A model this run does not make but builds on (its config and inputs were checked up front)."""
    if not ctx.run.finished(name):
        raise UserError(f"the {needed_by} stage needs a finished {name} in '{ctx.run.model(name)}'; "
                        f"run it first (--stages {name},{needed_by})")
    return load_model(ctx.run.model(name))


def run(cfg: Config, stages: list[str], force: list[str]) -> Path:
    """Run the chosen stages of one pipeline; returns the run directory.

    Under ``torchrun`` every process runs this; rank 0 alone writes, the others wait for it.
    """
    dist, device_name = init_distributed(cfg.run.device)
    try:
        return _run(cfg, stages, force, dist, device_name)
    finally:
        close_distributed(dist)


def _run(cfg: Config, stages: list[str], force: list[str], dist: Dist, device_name: str) -> Path:
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run directory '{run_dir}': {exc.strerror or exc}; "
                            "choose a writable run.output_dir") from None
        _force(run_dir, force)
        _remove_partial_files(run_dir)
        if not RunDir(run_dir).config.is_file():
            save_config(cfg, RunDir(run_dir).config)
    barrier(dist)
    for arch, key in ((cfg.teacher.arch, "teacher.arch"), (cfg.student.arch, "student.arch")):
        check_arch(arch, key)  # a typo must not wait for the end of the teacher stage
    if uses_openvino(cfg) and {"prune", "export", "report"} & set(stages):
        require_openvino("OpenVINO (export.openvino, or openvino in profile.runtimes / constraints.runtime)")
    seed_everything(cfg.run.seed)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = pick_device(device_name)
    say = _say if dist.is_main else (lambda text: None)  # one log, from rank 0
    ranks = f", {dist.world} processes" if dist.active else ""
    say(f"run directory: {run_dir}  (device: {device.type}{ranks})")

    t0 = time.perf_counter()
    if not dist.is_main:
        barrier(dist)  # rank 0 scans and splits; the others reuse its manifest
    data = prepare_data(cfg.data, run_dir / "data", cfg.run.seed)
    if dist.is_main:
        barrier(dist)
    say("[data] " + "\n[data] ".join(summary_lines(data.report)) + f"  ({time.perf_counter() - t0:.1f} s)")
    ctx = Context(cfg, run_dir, data, device, say, dist)
    wants = set(stages)
    check_finished_stages(ctx, wants)  # config.yaml must never claim settings a kept model was not made with

    teacher = student = None
    if "teacher" in wants:
        teacher = teacher_stage(ctx)
    if "student" in wants:
        teacher = teacher or _finished(ctx, "teacher", "student")
        student = student_stage(ctx, teacher)
        if cfg.distill.baseline:
            baseline_stage(ctx)
    if "prune" in wants:
        teacher = teacher or _finished(ctx, "teacher", "prune")
        student = student or _finished(ctx, "student", "prune")
        prune_stage(ctx, teacher, student)
    if dist.is_main:  # exporting and profiling are single-process work
        if "export" in wants:
            export_stage(ctx)
        if "report" in wants:
            report_stage(ctx)
        save_config(cfg, RunDir(run_dir).config)  # the config as run (a refused rerun never gets here)
        for line in _headline(run_dir):
            say(line)
        say(f"done in {time.perf_counter() - t0:.0f} s; everything is in {run_dir}")
    barrier(dist)
    return run_dir


def _headline(run_dir: Path) -> list[str]:
    """Test AUROC/F1, params and MACs of each finished model (from report.json when there is one)."""
    run = RunDir(run_dir)
    rows = json.loads(run.report_json.read_text())["models"] if run.report_json.is_file() else {}
    lines = []
    for name in (*MODELS, "student_pruned_int8"):
        row = rows.get(name)
        if row is None and run.finished(name):
            meta = run.read_meta(name)
            row = {"test": meta["metrics"]["test"], **meta.get("cost", {})}
            if meta.get("image"):
                row["image"] = {"test": meta["image"]["metrics"]["test"]}
        if row is None:
            continue
        test, params, macs = row["test"], row.get("params"), row.get("macs")
        cost = (f"  {params / 1e6:6.2f} M params" if params else "") + (f"  {macs / 1e6:8.1f} M MACs" if macs else "")
        image = row.get("image")
        level = (f"  images AUROC {image['test']['auroc']:.4f}  F1 {image['test']['f1']:.4f}  |  tiles"
                 if image else "")
        lines.append(f"  {name:<20}{level} test AUROC {test['auroc']:.4f}  F1 {test['f1']:.4f}{cost}")
    if lines:
        where = f"report: {run.report_md}" if run.report_json.is_file() else "no report yet (stage 'report')"
        lines = [f"headline ({where}):"] + lines
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    def body() -> None:
        stages = _stage_list(args.stages, "--stages")
        force = _stage_list(",".join(args.force), "--force") if args.force else []
        cfg = load_config(args.config, args.overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # type: ignore[assignment]
            run(cfg, stages, force)

    return run_cli(body, debug=args.debug, on_interrupt="interrupted: rerun the same command to resume",
                   io_hint="free disk space or fix the path; finished stages and the last checkpoint are kept, "
                           "so rerunning resumes")


if __name__ == "__main__":
    raise SystemExit(main())
