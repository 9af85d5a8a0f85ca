"""Profile one model on its own: params, MACs, latency per runtime, memory, size and the limit.

    python -m profiling.profile MODEL [--img-size N] [--runtimes ...] [--batch-sizes ...] [--threads N]

MODEL is a timm name (built with ``pretrained=False`` and 2 classes: the cost does not depend on
the weights), an ``.onnx`` file, or a run's model directory (``runs/<name>/student_pruned``:
``meta.json`` + ``model.safetensors``, with the run's exported ONNX files timed too).

A model directory is rebuilt by the project's one model loader (:func:`training.modeling.load_model`:
a pruned student's structure replayed, a ViT's convolutional stem restored, no pickle).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import timm

from core.errors import UserError, run_cli
from core.rundir import RunDir, is_model_dir
from deploy.runtime import onnx_session
from profiling.cost.config import RUNTIME_NAMES
from profiling.cost.latency import matmul_peak_gflops
from profiling.cost.machine import machine_info, usable_cores
from profiling.cost.profile_model import ModelEntry, profile_model
from training.modeling import load_model

__all__ = ["main", "model_dir_entry", "onnx_entry", "timm_entry"]


def timm_entry(arch: str, img_size: int | None = None) -> ModelEntry:
    """A fresh timm model at ``img_size`` (default: its own data config's input size)."""
    from training.networks import create_network

    if not timm.is_model(arch):
        raise UserError(f"'{arch}' is neither a timm model name, an .onnx file nor a run's model directory")
    net = create_network(arch, img_size=img_size).eval()
    size = img_size or int(net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return ModelEntry(net=net, img_size=size)


def onnx_entry(path: Path, img_size: int | None = None) -> ModelEntry:
    """An ONNX file; the image size comes from its metadata (our export writes it) unless given."""
    if img_size is None:
        session = onnx_session(path)
        saved = session.get_modelmeta().custom_metadata_map.get("img_size")
        dims = session.get_inputs()[0].shape
        img_size = int(saved) if saved else dims[-1] if isinstance(dims[-1], int) else None
        if img_size is None:
            raise UserError(f"{path}: the input size is neither in its metadata nor fixed in the graph; pass --img-size")
    int8 = path.with_name(path.stem + "_int8.onnx")
    return ModelEntry(net=None, img_size=img_size, onnx=path, onnx_int8=int8 if int8.is_file() else None)


def model_dir_entry(stage_dir: Path) -> ModelEntry:
    """A finished model directory (rebuilt by the one model loader) and, in a run, its exported files."""
    if not is_model_dir(stage_dir):
        raise UserError(f"'{stage_dir}' is not a finished model directory (needs meta.json and model.safetensors)")
    model = load_model(stage_dir)
    run = RunDir(stage_dir.parent)
    onnx, int8 = run.onnx(stage_dir.name), run.onnx(stage_dir.name, int8=True)
    return ModelEntry(net=model.net, img_size=model.img_size, onnx=onnx if onnx.is_file() else None,
                      onnx_int8=int8 if int8.is_file() else None, weights=run.weights(stage_dir.name))


def _entry(model: str, img_size: int | None) -> ModelEntry:
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise UserError(f"ONNX file '{path}' does not exist")
        return onnx_entry(path, img_size)
    if path.is_dir():
        entry = model_dir_entry(path)
        if img_size is not None and img_size != entry.img_size:
            raise UserError(f"{path} was trained at {entry.img_size} px; --img-size {img_size} would not be that model")
        return entry
    return timm_entry(model, img_size)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m profiling.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a timm name, an .onnx file, or a run's model directory (runs/<name>/student)")
    p.add_argument("--img-size", type=int, help="input side in pixels (default: the model's own)")
    p.add_argument("--runtimes", nargs="+", default=["eager", "eager_channels_last", "onnx", "onnx_int8"],
                   choices=RUNTIME_NAMES, metavar="RUNTIME", help=f"any of {', '.join(RUNTIME_NAMES)}")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--threads", type=int, help="intra-op threads (default: every usable core)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (a process each)")
    p.add_argument("--allow-busy", action="store_true",
                   help="time at once even while other processes load the CPU (figures marked if they did)")
    p.add_argument("--strict-timing", action="store_true",
                   help="on a busy CPU give no figure, instead of one marked 'measured under load'")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _print_table(result: dict[str, Any], model: str) -> None:
    params, macs = result.get("params"), result.get("macs")
    print(f"{model} at {result['img_size']} px: "
          + (f"{params / 1e6:.3f} M params, {macs / 1e6:.2f} M MACs per image (BatchNorm folded; fvcore total "
             f"{result['macs_fvcore'] / 1e6:.2f} M)" if params is not None else result.get("macs_note", "")))
    if result.get("macs_skipped_ops"):
        print("  ops not counted: " + ", ".join(f"{k} x{v}" for k, v in result["macs_skipped_ops"].items()))
    print("  size on disk: " + (", ".join(f"{k} {v:.3f} MB" for k, v in result["size_mb"].items()) or "—"))
    print(f"  {'runtime':<20}{'batch':>6}{'threads':>8}{'median ms':>11}{'p90 ms':>9}{'images/s':>10}{'ideal ms':>10}"
          f"{'peak MB':>9}")
    for key, s in result["latency"].items():
        ideal = (result.get("ideal_ms") or {}).get(f"b{s['batch']}")
        memory = (result.get("peak_memory_mb") or {}).get(key)
        if s["median_ms"] is None:
            print(f"  {s['runtime']:<20}{s['batch']:>6}{s['threads']:>8}  — {s['skipped']}")
            continue
        print(f"  {s['runtime']:<20}{s['batch']:>6}{s['threads']:>8}{s['median_ms']:>11.3f}{s['p90_ms']:>9.3f}"
              f"{s['images_per_s']:>10.1f}{'—' if ideal is None else f'{ideal:.3f}':>10}"
              f"{'—' if memory is None else f'{memory:.1f}':>9}"
              + (f"  {s['under_load']}" if s.get("under_load") else ""))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_cli(lambda: _profile(args), debug=args.debug)


def _profile(args: argparse.Namespace) -> int:
    if min(args.batch_sizes) < 1 or (args.threads is not None and args.threads < 1) or args.runs < 1:
        raise UserError("--batch-sizes, --threads and --runs must be >= 1")
    entry = _entry(args.model, args.img_size)
    threads = args.threads or usable_cores()
    peak = matmul_peak_gflops(threads)
    result = profile_model(entry, runtimes=args.runtimes, batch_sizes=sorted(set(args.batch_sizes)),
                           threads=threads, warmup=args.warmup, runs=args.runs, allow_busy=args.allow_busy,
                           strict=args.strict_timing, peak_memory=not args.no_memory, peak_gflops=peak)
    machine = machine_info()
    _print_table(result, args.model)
    print(f"  limit: fp32 matmul {peak:.1f} GFLOP/s with {threads} thread(s); ideal = 2 x MACs x batch / peak")
    print(f"  machine: {machine['cpu']}, {machine['usable_cores']} usable cores, torch {machine['torch']}, "
          f"onnxruntime {machine['onnxruntime']}" + (f", GPU {machine['gpu']}" if machine["gpu"] else ""))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "machine": machine, "matmul_peak_gflops": peak,
                                         "threads": threads, **result}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
