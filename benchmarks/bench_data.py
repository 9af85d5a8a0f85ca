"""Images/s of the synthetic renderer, and of the loader with and without the RAM cache.

    python -m benchmarks.bench_data [--quick] [--images N] [--size PX] [--ext jpg|png]

- the renderer (``data.synth.render_sample``, 20% defects, one image at a time) in both views at
  64 and 224 px, and the quickstart's path to its student crop (render at 64 px, resize to 96);
- the synthetic training loader of ``configs/quickstart.yaml`` (64 px, ``synthetic.variants``):
  its first epoch, which renders a bead per image, and the same epoch again from the kept beads;
- a dataset on disk (``data.synth.writer.write_dataset``: N images at 224 px in class folders, written
  to ``benchmarks/out/bench_data/``), read through the data stage (``prepare_data``) and
  ``PreparedData.loader`` with ``data.cache: ram`` (decoded once into RAM) and ``data.cache: none``
  (decoded from disk every time): one training epoch with augmentations and one evaluation pass,
  at the student's size in the real-data configs (224 px), batch 32, the project's default
  loader workers (``data.loader.default_workers``: none on 2 cores). With the RAM cache, the
  decoding happens when the loader is made, so it is timed apart from the epochs.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import OUT, LoadWatch, md_table, record, wait_for_idle_cpu
from data.config import DataConfig, SyntheticConfig
from data.loader import default_workers, synthetic_pixels
from data.manifest import Sample
from data.prepare import prepare_data
from data.synth import render_sample
from data.synth.writer import write_dataset
from distill.config import load_config
from profiling.cost.machine import other_cpu_load

CONFIG = "configs/quickstart.yaml"
HERE = OUT / "bench_data"
BATCH = 32


def _load_before(quick: bool) -> float:
    if not quick:
        return wait_for_idle_cpu()
    load = other_cpu_load(1.0)  # a quick check measures nothing, so it does not wait
    return math.nan if load is None else load


def _say(text: str) -> None:
    print(text, flush=True)


def _rate(make: Callable[[int], object], min_images: int, min_s: float) -> tuple[int, float]:
    """Call ``make(i)`` for i = 0, 1, ... until both ``min_images`` and ``min_s`` are reached."""
    make(10**6)  # warm-up, untimed
    n, t0 = 0, time.perf_counter()
    while n < min_images or time.perf_counter() - t0 < min_s:
        make(n)
        n += 1
    return n, time.perf_counter() - t0


def _pass(loader) -> tuple[int, float]:
    """Images and seconds of one pass over ``loader``."""
    n, t0 = 0, time.perf_counter()
    for images, *_ in loader:
        n += images.shape[0]
    return n, time.perf_counter() - t0


def _epochs(loader, epochs: int) -> list[tuple[int, float]]:
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.append(_pass(loader))
    return out


def _ips(n: int, s: float) -> str:
    return f"{n / s:,.0f}" if s > 0 else "-"


def _median_ips(runs: list[tuple[int, float]]) -> str:
    return f"{statistics.median(n / s for n, s in runs):,.0f}"


def _renderer_rows(quick: bool) -> list[list[str]]:
    rows = []
    min_images, min_s = (3, 0.0) if quick else (30, 4.0)
    for view in ("segment", "part"):
        for size in (64, 224):
            cfg = SyntheticConfig(view=view, image_size=size)
            n, s = _rate(lambda i, cfg=cfg: render_sample(i, int(i % 5 == 0), cfg), min_images, min_s)
            rows.append([f"renderer, {view} view, {size} px", _ips(n, s), f"{n} images in {s:.1f} s"])
            _say(f"renderer {view} {size}: {n / s:.0f} images/s")
    quick_cfg = load_config(CONFIG).data.synthetic
    def crop(i: int) -> object:
        sample = Sample(f"synthetic:train/{i:06d}", int(i % 5 == 0), "", "train", "")
        return synthetic_pixels(sample, quick_cfg, 0, 1, 96)

    n, s = _rate(crop, min_images, min_s)
    rows.append([f"renderer at {quick_cfg.image_size} px + resize to 96 px ({quick_cfg.view})", _ips(n, s),
                 "the quickstart student's crop (`data.loader.synthetic_pixels`)"])
    return rows


def _synthetic_loader_rows(quick: bool) -> list[list[str]]:
    cfg = load_config(CONFIG, ["data.synthetic.num_train=64", "data.synthetic.num_val=32",
                               "data.synthetic.num_test=32"] if quick else []).data
    out_dir = HERE / ("synthetic_quick" if quick else "synthetic")
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    data = prepare_data(cfg, out_dir / "data", 0)
    prep_s = time.perf_counter() - t0
    size = cfg.synthetic.image_size
    loader = data.loader("train", size, BATCH, train=True)
    loader.sampler.set_epoch(0)
    first = _pass(loader)
    again = _pass(loader)  # epoch 0 again: the same view seeds, so the same beads, now kept in RAM
    total = len(data.samples)
    _say(f"synthetic loader: data stage {prep_s:.1f} s, first epoch {first[1]:.1f} s, again {again[1]:.1f} s")
    return [
        [f"data stage, synthetic ({total} images rendered at {size} px + pHash)", _ips(total, prep_s),
         f"{prep_s:.1f} s; quickstart data"],
        [f"synthetic training loader at {size} px, first epoch", _ips(*first),
         f"renders one of {cfg.synthetic.variants} beads per image, then augments; {first[0]} images"],
        [f"synthetic training loader at {size} px, beads already rendered", _ips(*again),
         "augment + collate only (the same epoch again)"],
    ]


def _disk_rows(quick: bool, images: int, size: int, ext: str, epochs: int) -> list[list[str]]:
    root = HERE / "images"
    t0 = time.perf_counter()
    write_dataset(root, images, "folder", size=224, ext=ext, overwrite=True)
    write_s = time.perf_counter() - t0
    rows = [[f"write a dataset: render + encode {ext.upper()} at 224 px", _ips(images, write_s),
             f"{images} images in {write_s:.1f} s (`data.synth.writer.write_dataset`)"]]
    workers = default_workers()
    for cache in ("ram", "none"):
        cfg = DataConfig(source="folder", path=str(root), cache=cache)
        run_dir = HERE / f"run_{cache}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        data = prepare_data(cfg, run_dir / "data", 0)
        prep_s = time.perf_counter() - t0
        if cache == "ram":
            rows.append([f"data stage: decode + check + pHash every image ({ext})", _ips(len(data.samples), prep_s),
                         f"{len(data.samples)} images in {prep_s:.1f} s (threads), once per run"])
        t0 = time.perf_counter()
        train = data.loader("train", size, BATCH, train=True)  # with the RAM cache: decodes every split here
        made_s = time.perf_counter() - t0
        runs = _epochs(train, epochs)
        evaluation = _pass(data.loader("train", size, 64))
        n_train = len(train.dataset)
        label = "RAM cache" if cache == "ram" else "no cache"
        if cache == "ram":
            rows.append([f"RAM cache: fill (decode at {size} px, threads)", _ips(len(data.samples), made_s),
                         f"{len(data.samples)} images (every split) in {made_s:.1f} s, when the first loader is made"])
            n1, s1 = runs[0]
            rows.append(["RAM cache: first training epoch, fill included", _ips(n1, s1 + made_s),
                         f"{n1} images in {s1 + made_s:.1f} s ({made_s:.1f} s of it filling the cache)"])
            later = runs[1:] or runs
            rows.append([f"RAM cache: training epoch at {size} px (augmentations on)", _median_ips(later),
                         f"median of {len(later)} epoch(s) after the first; {later[0][0]} of {n_train} images "
                         f"(full batches); {torch.get_num_threads()} torch threads"])
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the augmentations' small tensor ops, without intra-op threads
            try:
                single = _epochs(train, 1)[0]
            finally:
                torch.set_num_threads(threads)
            rows.append([f"RAM cache: training epoch at {size} px, torch limited to 1 thread", _ips(*single),
                         "diagnostic: the same epoch with `torch.set_num_threads(1)`; the loader runs in the "
                         "training process, on the training's threads"])
        else:
            rows.append([f"no cache: training epoch at {size} px (decode + augmentations)", _median_ips(runs),
                         f"median of {len(runs)} epoch(s); {runs[0][0]} of {n_train} images (full batches)"])
        rows.append([f"{label}: evaluation pass at {size} px (no augmentation)", _ips(*evaluation),
                     f"{evaluation[0]} training images, batch 64"])
        _say(f"{cache}: epochs {[f'{n / s:.0f}' for n, s in runs]} images/s, evaluation {_ips(*evaluation)} images/s")
    rows.append(["loader workers", str(workers), "`data.loader.default_workers()` (0: batches made in the "
                 "training process)"])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs, measures nothing")
    p.add_argument("--images", type=int, default=None, help="images in the on-disk dataset (default 400; quick 40)")
    p.add_argument("--size", type=int, default=224, help="loader image size (default 224, the real-data students')")
    p.add_argument("--ext", choices=("jpg", "png"), default="jpg", help="image format on disk (default jpg)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per loader (default 3; quick 2)")
    args = p.parse_args(argv)
    images = args.images or (40 if args.quick else 400)
    epochs = args.epochs or (2 if args.quick else 3)
    load_before = _load_before(args.quick)
    watch, t_start = LoadWatch(), time.perf_counter()

    rows = _renderer_rows(args.quick)
    rows += _synthetic_loader_rows(args.quick)
    rows += _disk_rows(args.quick, images, args.size, args.ext, epochs)
    body = "\n".join([
        f"Images/s, one process, batch {BATCH}. On-disk dataset: {images} synthetic images at 224 px, {args.ext}, "
        f"class folders, split 70/15/15; loaders at {args.size} px.",
        "",
        md_table(["what", "images/s", "notes"], rows),
    ])
    record("Data: renderer and loader throughput", body, quick=args.quick, load_before=load_before, watch=watch,
           wall_s=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
