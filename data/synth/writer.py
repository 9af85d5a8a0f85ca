"""Writing the synthetic beads to disk: a YOLO or class-folder dataset, and a grid of samples."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UserError
from data.config import DEFECT_TYPES, SyntheticConfig
from data.synth.render import VIEWS, render, render_sample

__all__ = ["write_dataset", "write_grid"]


def _plan(n: int, defect_ratio: float, split: tuple[float, float, float], seed: int) -> list[tuple[int, str, int]]:
    """(label, split, render seed) per image: exact class counts, each class split in proportion."""
    rng = np.random.default_rng(seed)
    n_defect = min(n - 1, max(1, round(n * defect_ratio)))  # both classes, always
    labels = np.zeros(n, dtype=int)
    labels[rng.permutation(n)[:n_defect]] = 1
    splits = np.empty(n, dtype=object)
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.round(np.cumsum(split) * len(members)).astype(int)
        for name, lo, hi in zip(("train", "val", "test"), [0, *bounds[:2]], bounds):
            splits[members[lo:hi]] = name
    seeds = rng.integers(0, 2**62, n)
    return [(int(labels[i]), str(splits[i]), int(seeds[i])) for i in range(n)]


def _check_args(out: Path, num_images: int, fmt: str, split: tuple[float, ...], ext: str, seed: int,
                overwrite: bool, **cfg: object) -> SyntheticConfig:
    """Every user mistake becomes a :class:`UserError` naming the option."""
    if num_images < 2:
        raise UserError(f"--num-images must be >= 2 (one normal and one defect at least), got {num_images}")
    if fmt not in ("yolo", "folder"):
        raise UserError(f"--format must be 'yolo' or 'folder', got '{fmt}'")
    if cfg.get("view") not in VIEWS:
        raise UserError(f"--view must be one of {', '.join(VIEWS)}, got '{cfg.get('view')}'")
    if ext not in ("png", "jpg"):
        raise UserError(f"--ext must be 'png' or 'jpg', got '{ext}'")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if len(split) != 3 or min(split) < 0 or split[0] <= 0 or abs(sum(split) - 1) > 1e-6:
        raise UserError(f"--split must be three fractions train val test summing to 1, got {list(split)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder '{out}' is not empty; choose another or pass --overwrite")
    try:
        return SyntheticConfig(**cfg)  # type: ignore[arg-type]
    except ValueError as exc:  # FieldError names the field; say it as the command-line option
        option = {"image_size": "size"}.get(getattr(exc, "key", ""), getattr(exc, "key", "")).replace("_", "-")
        raise UserError(f"--{option}: {getattr(exc, 'message', exc)}") from None


def write_dataset(out: str | Path, num_images: int, fmt: str = "yolo", *, size: int = 96, view: str = "segment",
                  defect_ratio: float = 0.2, severity: tuple[float, float] = (0.5, 1.0), seed: int = 0,
                  split: tuple[float, float, float] = (0.7, 0.15, 0.15), ext: str = "png",
                  overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Render a dataset to disk (YOLO detection layout or class folders); returns the number of
    images per split and class. ``round(num_images * defect_ratio)`` images are defects (at least
    one of each class), each class split in the given proportions; image ``i`` is the same for
    the same seed in either format."""
    from tqdm import tqdm

    out = Path(out)
    cfg = _check_args(out, num_images, fmt, tuple(split), ext, seed, overwrite, view=view, image_size=size,
                      severity=tuple(severity), defect_ratio=defect_ratio)
    for name in ("images", "labels", "train", "val", "test"):  # what an earlier run wrote; nothing else
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    (out / "data.yaml").unlink(missing_ok=True)
    counts = {s: {"normal": 0, "defect": 0} for s in ("train", "val", "test")}
    used = [s for s, fraction in zip(counts, split) if fraction > 0]  # no empty split folders
    for s in used:
        for sub in ([f"images/{s}", f"labels/{s}"] if fmt == "yolo" else [f"{s}/normal", f"{s}/defect"]):
            (out / sub).mkdir(parents=True, exist_ok=True)
    for i, (label, sp, render_seed) in enumerate(tqdm(_plan(num_images, defect_ratio, split, seed), desc="rendering",
                                                       unit="img", disable=None)):
        bead = render_sample(render_seed, label, cfg)
        cls = "defect" if label else "normal"
        counts[sp][cls] += 1
        stem = f"{i:06d}"
        image_path = out / (f"images/{sp}/{stem}.{ext}" if fmt == "yolo" else f"{sp}/{cls}/{stem}.{ext}")
        Image.fromarray(bead.image).save(image_path, **({"quality": 95} if ext == "jpg" else {}))
        if fmt == "yolo":
            lines = "".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in bead.boxes)
            (out / f"labels/{sp}/{stem}.txt").write_text(lines, encoding="utf-8")
    if fmt == "yolo":
        import yaml

        doc = {"path": ".", **{s: f"images/{s}" for s in used}, "nc": len(DEFECT_TYPES), "names": list(DEFECT_TYPES)}
        (out / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return counts


def write_grid(path: str | Path, views: tuple[str, ...] = VIEWS, size: int = 96, seed: int = 0) -> None:
    """A labelled grid for the README: per view, a normal bead and each defect, obvious (severity
    1.0) and subtle (0.5), with the YOLO boxes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    kinds = (None, *DEFECT_TYPES)
    rows = [(v, s) for v in views for s in (1.0, 0.5)]
    fig, axes = plt.subplots(len(rows), len(kinds), figsize=(1.3 * len(kinds), 1.45 * len(rows)), squeeze=False)
    for r, (view, sev) in enumerate(rows):
        for c, kind in enumerate(kinds):
            bead = render(seed + 7 * r + c, size=size, view=view, defect=kind, severity=sev)
            ax = axes[r][c]
            ax.imshow(bead.image)
            for _, cx, cy, w, h in bead.boxes:
                ax.add_patch(Rectangle(((cx - w / 2) * size - 0.5, (cy - h / 2) * size - 0.5), w * size, h * size,
                                       fill=False, edgecolor="red", linewidth=0.8))
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(kind or "normal", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{view}\nseverity {sev}", fontsize=7)
    fig.tight_layout(pad=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80)
    plt.close(fig)
    # 256 colours keep the file small enough for a README; the noise defeats plain PNG compression.
    rgb = Image.open(buffer).convert("RGB")
    rgb.quantize(palette=rgb.quantize(256), dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)
