"""Which figures the report draws from a run, and the example images for its error grid.

The images of the worst test errors come from the data layer exactly as the models saw them
(the same decoding, crop and resize; synthetic beads re-rendered from their seed), at a size a
person can inspect, with the deployed model's Grad-CAM heatmap for *defect* drawn over them.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.config import DataConfig
from core.errors import UserError
from core.rundir import RunDir, read_json
from data.loader import InspectionDataset
from data.manifest import Sample, read_manifest
from core.schema import build
from profiling.report import plots
from profiling.report.constraints import latency_of
from profiling.report.runfiles import RunFiles

__all__ = ["ERRORS_SHOWN", "IMAGE_SIZE", "load_images", "write_plots"]

ERRORS_SHOWN = 8  # per row of the error grid
IMAGE_SIZE = 128  # pixels per side in the error grid
_TILE = re.compile(r"#(\d+),(\d+),(\d+),(\d+)$")  # a tile row's path: <image>#x0,y0,x1,y1 (data.tiles.tile_id)


def load_images(files: RunFiles, items: list[tuple[str, int]], size: int = IMAGE_SIZE) -> list[np.ndarray | None]:
    """HWC float images in [0, 1] for ``(path, label)`` pairs of predictions.csv; None where one cannot be read.

    A file path is decoded as the data stage does; ``synthetic:<split>/<index>`` is rendered again
    from the run's seed (the label decides whether the bead has its defect).
    """
    try:
        cfg = build(DataConfig, files.config.get("data") or {})
    except UserError:
        return [None] * len(items)
    seed = int((files.config.get("run") or {}).get("seed", 0))
    out: list[np.ndarray | None] = []
    parents: dict[str, int] | None = None
    for path, label in items:
        tile = _TILE.search(path) if cfg.tiles is not None else None
        if tile is not None:  # a tile row: its crop of the parent image (a synthetic parent needs its own label)
            if parents is None:
                manifest = RunDir(files.run_dir).manifest
                parents = ({s.path: s.label for s in read_manifest(manifest) if not s.is_tile}
                           if manifest.is_file() else {})
            out.append(_tile(cfg, seed, path[:tile.start()], tuple(int(v) for v in tile.groups()), parents, size))
            continue
        synthetic = cfg.synthetic if path.startswith("synthetic:") else None
        dataset = InspectionDataset([Sample(path=path, label=label, group="", split="test")], size,
                                    crop_pct=cfg.crop_pct, synthetic=synthetic, run_seed=seed)
        try:
            out.append(dataset[0][0].permute(1, 2, 0).numpy())
        except (OSError, ValueError):  # a file moved or deleted since the run (BadImage is a ValueError)
            out.append(None)
    return out


def _tile(cfg: DataConfig, seed: int, parent: str, rect: tuple[int, ...], labels: dict[str, int],
          size: int) -> np.ndarray | None:
    from data.tile_data import crop_tile, source_pixels

    if parent not in labels:
        return None
    synthetic = cfg.synthetic if parent.startswith("synthetic:") else None
    try:
        pixels = source_pixels(Sample(path=parent, label=labels[parent], group="", split="test"), synthetic, seed)
        return crop_tile(pixels, rect, size).astype(np.float32) / 255.0  # type: ignore[arg-type]
    except (OSError, ValueError, UserError):  # moved, changed or deleted since the run
        return None


def _with_gradcam(files: RunFiles, model: str, images: list[np.ndarray | None]) -> list[np.ndarray | None] | None:
    """The images with the model's Grad-CAM for *defect* drawn over them; None when the PyTorch
    model cannot be opened (an int8 model is explained by the fp32 model it was quantised from)."""
    from deploy.explain import gradcam, overlay
    from training.modeling import load_model

    try:
        loaded = load_model(files.run_dir / model.removesuffix("_int8"))
    except (UserError, OSError, KeyError, ValueError):
        return None
    present = [i for i, img in enumerate(images) if img is not None]
    if not present:
        return images
    batch = loaded.view(torch.stack([torch.from_numpy(images[i]).permute(2, 0, 1).float() for i in present]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-cell map on tiny test images: drawn anyway
        cams = gradcam(loaded.net, batch)
    out = list(images)
    for i, cam in zip(present, cams):
        out[i] = overlay((np.clip(images[i], 0, 1) * 255).astype(np.uint8), cam)
    return out


def _worst(files: RunFiles, model: str, threshold: float) -> dict[str, list[tuple[np.ndarray | None, str]]]:
    """The deployed model's worst false negatives (lowest-scored defects below the threshold) and
    worst false positives (highest-scored normals at or above it) on test, with its Grad-CAM
    heatmap for the defect class where the PyTorch model can be opened."""
    test = files.models[model].splits["test"]
    called = test.probs >= threshold
    fn = [i for i in np.argsort(test.probs, kind="stable") if test.labels[i] == 1 and not called[i]]
    fp = [i for i in np.argsort(-test.probs, kind="stable") if test.labels[i] == 0 and called[i]]
    rows = {}
    for label, picked in (("missed defects (false negatives)", fn[:ERRORS_SHOWN]),
                          ("false alarms (false positives)", fp[:ERRORS_SHOWN])):
        images = load_images(files, [(test.paths[i], int(test.labels[i])) for i in picked])
        images = _with_gradcam(files, model, images) or images
        rows[label] = [(img, f"p={test.probs[i]:.3f}\n{Path(test.paths[i]).name[:18]}")
                       for img, i in zip(images, picked)]
    return rows


def _pareto_points(report: dict[str, Any]) -> dict[str, tuple[float, float, tuple[float, float] | None]]:
    c = report["constraints"]
    points = {}
    for name, row in report["models"].items():
        figure = latency_of(row, c["runtime"], c["batch"])
        test = (row.get("image") or row)["test"]  # a tiled model: whole images, as its latency is per image
        auroc = test.get("auroc")
        if figure and figure.get("median") is not None and auroc is not None:
            ci = test.get("auroc_ci")
            points[name] = (figure["median"], auroc, tuple(ci) if ci else None)
    return points


def _latency_curve(files: RunFiles) -> dict[str, Any] | None:
    """The latency-target search of the pruned student (meta.json's ``pruning.latency``), if any."""
    meta = RunDir(files.run_dir).meta("student_pruned")
    if not meta.is_file():
        return None
    curve = (read_json(meta).get("pruning") or {}).get("latency")
    return curve if curve and curve.get("points") else None


def write_plots(files: RunFiles, report: dict[str, Any]) -> list[Path]:
    """Draw every figure into ``run_dir/plots/`` and return the paths written."""
    out = files.run_dir / "plots"
    rows = report["models"]
    scores = {n: (files.models[n].splits["test"].probs, files.models[n].splits["test"].labels, r["threshold"])
              for n, r in rows.items()}
    written = [
        plots.roc_curves(scores, {n: r["test"].get("auroc") for n, r in rows.items()}, out / "roc.png"),
        plots.pr_curves(scores, out / "pr.png"),
        plots.confusion_matrices({n: r["test"]["confusion_matrix"] for n, r in rows.items()},
                                 {n: r["threshold"] for n, r in rows.items()}, out / "confusion.png"),
        plots.score_histograms(scores, out / "scores.png"),
    ]
    points = _pareto_points(report)
    c = report["constraints"]
    deployed = (report.get("deployed") or {}).get("model")
    if points:
        tiled = any(r.get("tiles_per_image") for r in rows.values())
        per = f"{c['batch']} image(s), all tiles in one batch" if tiled else f"batch {c['batch']}"
        xlabel = f"median latency, ms ({c['runtime']} {per}; int8: onnx_int8)"
        limit = (c.get("set") or {}).get("max_latency_ms")
        written.append(plots.pareto(points, xlabel, out / "pareto.png", deployed=deployed, max_latency=limit))
    if deployed is not None:
        title = (f"{deployed} on test, threshold {rows[deployed]['threshold']:.3g}: worst errors with their scores "
                 "and Grad-CAM for 'defect'")
        written.append(plots.error_grid(_worst(files, deployed, rows[deployed]["threshold"]), title,
                                        out / "errors.png"))
    curve = _latency_curve(files)
    if curve is not None:  # the pruned student was pruned to a latency target: the measured search
        from profiling.report.latency_curve import plot_latency_curve

        written.append(plot_latency_curve(curve, out / "latency_curve.png",
                                          title="student_pruned: channel ratio searched by measured latency"))
    for stale in ("pareto.png", "errors.png", "latency_curve.png"):  # from an earlier rendering that could still draw them
        if out / stale not in written:
            (out / stale).unlink(missing_ok=True)
    return written
