"""Measure what every model of a run costs, the same way for each, into ``profile.json``.

The file carries its provenance (:mod:`core.provenance`): the profile settings and the digest of
every weights and exported file it measured, so a rerun re-measures exactly when one of them
changed (a new export, a retrained model) and reuses the figures otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import provenance
from core.files import atomic_write_text, json_ready
from core.rundir import MODELS, RunDir, read_json
from profiling.cost.config import ProfileConfig
from profiling.cost.latency import RUNTIMES, matmul_peak_gflops
from profiling.cost.machine import machine_info, usable_cores
from profiling.cost.profile_model import MACS_NOTE, ModelEntry, profile_model
from profiling.report.config import ConstraintsConfig

__all__ = ["measure", "measure_run", "profile_record", "run_entries", "tiles_per_image"]


def _plan(profile_cfg: ProfileConfig, constraints_cfg: ConstraintsConfig,
          tiles_per_image: int | None = None) -> tuple[list[str], list[int], int]:
    """Runtimes, batch sizes and threads to measure: the profile's, plus what the constraint reads.
    A tiled model is also timed per image: all ``tiles_per_image`` tiles of one image (and of
    ``constraints.batch`` images) as one batch, beside the per-tile figures of the batch sizes."""
    runtimes = list(dict.fromkeys([*profile_cfg.runtimes, constraints_cfg.runtime]))
    if constraints_cfg.runtime == "onnx":
        runtimes = list(dict.fromkeys([*runtimes, "onnx_int8"]))  # an int8 model meets `onnx` through its own file
    batches = sorted({*profile_cfg.batch_sizes, constraints_cfg.batch})
    if tiles_per_image:
        batches = sorted({*batches, tiles_per_image, tiles_per_image * constraints_cfg.batch})
    return runtimes, batches, profile_cfg.threads or usable_cores()


def measure(
    run_dir: str | Path,
    models: dict[str, ModelEntry],
    profile_cfg: ProfileConfig,
    constraints_cfg: ConstraintsConfig,
    log: Callable[[str], None] = print,
    record: dict[str, Any] | None = None,
    tiles_per_image: int | None = None,
) -> dict[str, Any]:
    """Profile every model of a run the same way and write ``run_dir/profile.json``; returns its content.

    ``models`` maps the run's model names (``teacher``, ``student``, ``student_baseline``,
    ``student_pruned``) to what to measure; give the deployed model's int8 file as
    ``onnx_int8`` of its fp32 entry. The constraint's runtime and batch are always measured.
    Threads are ``profile.threads`` or every core this process may use, set explicitly.
    ``record`` (:func:`profile_record`) is stored in the file as its provenance. ``tiles_per_image``
    (a tiled run) adds the batch of one image's tiles (see :func:`_plan`).
    """
    runtimes, batches, threads = _plan(profile_cfg, constraints_cfg, tiles_per_image)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; valid: {sorted(RUNTIMES)}")
    log(f"[report] measuring the fp32 matmul limit with {threads} thread(s)")
    peak = matmul_peak_gflops(threads)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"runtimes": runtimes, "batch_sizes": batches, "threads": threads, "warmup": profile_cfg.warmup,
                     "runs": profile_cfg.runs, "allow_busy": profile_cfg.allow_busy,
                     "max_other_load": profile_cfg.max_other_load, "strict_timing": profile_cfg.strict_timing},
        "limit": {"matmul_peak_gflops": peak, "threads": threads, "dtype": "fp32",
                  "what": "best of 10 1024x1024 matmuls (2 n^3 FLOPs each); ideal_ms = 2 x macs x batch / peak"},
        "macs_note": MACS_NOTE,
        "tiles_per_image": tiles_per_image,
        "models": {},
    }
    for name, entry in models.items():
        log(f"[report] profiling {name}: {', '.join(runtimes)} at batch {batches}, {threads} thread(s)")
        result["models"][name] = profile_model(
            entry, runtimes=runtimes, batch_sizes=batches, threads=threads, warmup=profile_cfg.warmup,
            runs=profile_cfg.runs, allow_busy=profile_cfg.allow_busy, max_other_load=profile_cfg.max_other_load,
            strict=profile_cfg.strict_timing, peak_memory=profile_cfg.peak_memory, peak_gflops=peak,
        )
    if record is not None:
        result["provenance"] = record
    result = json_ready(result)
    atomic_write_text(RunDir(Path(run_dir)).profile, json.dumps(result, indent=2))
    return result


def run_entries(run: RunDir, names: list[str]) -> dict[str, ModelEntry]:
    """The run's finished models, rebuilt by the one model loader, with their exported files."""
    from training.modeling import load_model

    entries = {}
    for name in names:
        fp32, int8 = run.onnx(name), run.onnx(name, int8=True)
        model = load_model(run.model(name))
        entries[name] = ModelEntry(model.net, model.img_size, fp32 if fp32.is_file() else None,
                                   int8 if int8.is_file() else None, run.weights(name))
    return entries


def tiles_per_image(run: RunDir) -> int | None:
    """A tiled run's tiles per image (the most any image has; data/report.json), else None."""
    if not run.data_report.is_file():
        return None
    tiles = read_json(run.data_report).get("tiles") or {}
    return (tiles.get("tiles_per_image") or {}).get("max")


def profile_record(run: RunDir, names: list[str], profile_cfg: ProfileConfig,
                   constraints_cfg: ConstraintsConfig) -> dict[str, Any]:
    """What the profile of these models depends on: the settings, and every file it measures."""
    runtimes, batches, threads = _plan(profile_cfg, constraints_cfg, tiles_per_image(run))
    inputs: dict[str, Path | None] = {}
    for name in names:
        inputs[name] = run.weights(name)
        for suffix, path in (("onnx", run.onnx(name)), ("onnx_int8", run.onnx(name, int8=True))):
            inputs[f"{name}.{suffix}"] = path if path.is_file() else None
    config = {"runtimes": runtimes, "batch_sizes": batches, "threads": threads, "warmup": profile_cfg.warmup,
              "runs": profile_cfg.runs, "allow_busy": profile_cfg.allow_busy,
              "max_other_load": profile_cfg.max_other_load, "strict_timing": profile_cfg.strict_timing,
              "peak_memory": profile_cfg.peak_memory}
    return provenance.make("profile", config, inputs)


def measure_run(run: RunDir, profile_cfg: ProfileConfig, constraints_cfg: ConstraintsConfig,
                log: Callable[[str], None] = print, *, force: bool = False) -> dict[str, Any]:
    """Profile every finished model of the run into ``profile.json``, unless the file there was made
    from the same settings and the same files (then it is reused; ``force`` measures anyway)."""
    names = [n for n in MODELS if run.finished(n)]
    record = profile_record(run, names, profile_cfg, constraints_cfg)
    saved = provenance.load(run.profile) if run.profile.is_file() else None
    verdict = provenance.compare((saved or {}).get("provenance"), record)
    if verdict.same and not force:
        log("[report] profile.json measured the same files with the same settings; reused")
        return saved  # type: ignore[return-value]
    if verdict.state in ("config", "inputs") and not force:
        log(f"[report] re-measuring: {', '.join(verdict.changed[:6])} changed since profile.json was measured")
    return measure(run.root, run_entries(run, names), profile_cfg, constraints_cfg, log, record=record,
                   tiles_per_image=tiles_per_image(run))
