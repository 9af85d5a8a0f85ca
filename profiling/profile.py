"""Profile one model on its own: params, MACs, latency per runtime, memory, size and the limit.

    python -m profiling.profile MODEL [--img-size N] [--runtimes ...] [--batch-sizes ...] [--threads N]

MODEL is a timm name (built with ``pretrained=False`` and 2 classes: the cost does not depend on
the weights), an ``.onnx`` file, or a run's model directory (``runs/<name>/student_pruned``:
``meta.json`` + ``model.safetensors``, with the run's exported ONNX files timed too).

A pruned student is rebuilt without unpickling anything: a fresh timm model, torch-pruning's
dependency graph replays the pruning history saved in ``meta.json``, then the safetensors load
strictly (the way ``student/prune.py`` saves it; profiling may not import ``student/``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.errors import UserError, run_cli
from profiling.config import RUNTIME_NAMES
from profiling.latency import matmul_peak_gflops
from profiling.machine import machine_info, usable_cores
from profiling.measure import ModelEntry, profile_model

__all__ = ["load_model_dir", "main", "onnx_entry", "run_entries", "timm_entry"]


def _timm_network(arch: str, img_size: int | None, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A 2-class timm model; ``img_size`` goes only to models that take it (ViTs; CNNs run at any size)."""
    import timm

    if not timm.is_model(arch):
        raise UserError(f"'{arch}' is neither a timm model name, an .onnx file nor a run's model directory")
    kwargs = dict(model_kwargs or {})
    if img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(arch, pretrained=False, num_classes=2, img_size=img_size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return timm.create_model(arch, pretrained=False, num_classes=2, **kwargs)


def timm_entry(arch: str, img_size: int | None = None) -> ModelEntry:
    """A fresh timm model at ``img_size`` (default: its own data config's input size)."""
    net = _timm_network(arch, img_size).eval()
    size = img_size or int(net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return ModelEntry(net=net, img_size=size)


def onnx_entry(path: Path, img_size: int | None = None) -> ModelEntry:
    """An ONNX file; the image size comes from its metadata (our export writes it) unless given."""
    import onnxruntime as ort

    if img_size is None:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        saved = session.get_modelmeta().custom_metadata_map.get("img_size")
        dims = session.get_inputs()[0].shape
        img_size = int(saved) if saved else dims[-1] if isinstance(dims[-1], int) else None
        if img_size is None:
            raise UserError(f"{path}: the input size is neither in its metadata nor fixed in the graph; pass --img-size")
    int8 = path.with_name(path.stem + "_int8.onnx")
    return ModelEntry(net=None, img_size=img_size, onnx=path, onnx_int8=int8 if int8.is_file() else None)


def _rebuild_pruned(net: nn.Module, img_size: int, pruning: dict[str, Any], where: Path) -> nn.Module:
    """Replay torch-pruning's saved history on a fresh network (eval mode, autograd on for tracing)."""
    import torch_pruning as tp

    net.eval()
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 3, img_size, img_size))
            graph.load_pruning_history(pruning["history"])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: its pruning history does not fit a fresh '{pruning.get('arch')}' "
                        f"({type(exc).__name__}: {exc}); rerun the prune stage with --force") from None
    return net


def load_model_dir(stage_dir: Path, export_dir: Path | None = None) -> ModelEntry:
    """A finished model directory (meta.json + model.safetensors) and its exported ONNX files, if any."""
    from safetensors.torch import load_file

    meta_path, weights = stage_dir / "meta.json", stage_dir / "model.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise UserError(f"'{stage_dir}' is not a finished model directory (needs meta.json and model.safetensors)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("conv_stem"):
        onnx = (export_dir or stage_dir.parent / "export") / f"{stage_dir.name}.onnx"
        raise UserError(f"'{stage_dir}' is a ViT with the project's convolutional stem, which profiling rebuilds "
                        f"only from its ONNX export: profile '{onnx}' instead")
    size = int(meta["img_size"])
    net = _timm_network(meta["arch"], size, meta.get("model_kwargs"))
    if meta.get("pruning"):
        net = _rebuild_pruned(net, size, meta["pruning"], meta_path)
    try:
        net.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise UserError(f"{weights} does not fit the architecture in its meta.json: {str(exc).splitlines()[0]}") from None
    export_dir = export_dir or stage_dir.parent / "export"
    onnx, int8 = export_dir / f"{stage_dir.name}.onnx", export_dir / f"{stage_dir.name}_int8.onnx"
    return ModelEntry(net=net.eval(), img_size=size, onnx=onnx if onnx.is_file() else None,
                      onnx_int8=int8 if int8.is_file() else None, weights=weights)


def run_entries(run_dir: Path, names: list[str]) -> dict[str, ModelEntry]:
    """The named finished models of a run, as :func:`profiling.measure.measure` takes them."""
    return {name: load_model_dir(run_dir / name, run_dir / "export") for name in names}


def _entry(model: str, img_size: int | None) -> ModelEntry:
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise UserError(f"ONNX file '{path}' does not exist")
        return onnx_entry(path, img_size)
    if path.is_dir():
        entry = load_model_dir(path)
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
    p.add_argument("--allow-busy", action="store_true", help="time even while other processes load the CPU")
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
              f"{'—' if memory is None else f'{memory:.1f}':>9}")


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
                           peak_memory=not args.no_memory, peak_gflops=peak)
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
