"""Unlabeled images: a pool the teacher labels for the student, and labels held back from training.

An inspection line labels little (someone must judge every image) and records much (the camera
sees every bead). Two things make images unlabeled, and both end in the manifest's ``unlabeled``
split, which no stage learns a label from:

- a *pool*: ``data.unlabeled`` (a folder or a ``.txt`` list), a YOLO split named ``unlabeled``,
  or ``data.synthetic.num_unlabeled`` rendered beads;
- *held-back labels*: ``data.label_fraction`` keeps the labels of a stratified, seeded fraction of
  the training split, and the rest of it becomes unlabeled (to measure what few labels give).

A pool image that is a copy (or near-copy) of a validation or test image is leakage like any other:
the student would be taught the teacher's answer on a test image. That is refused, not warned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import UserError
from data.config import SyntheticConfig
from data.manifest import UNLABELED, Sample, SkippedFile

__all__ = ["POOL_ORIGIN", "HELD_BACK_ORIGIN", "read_pool", "synthetic_pool", "hold_back_labels", "pool_leaks",
           "pool_counts"]

POOL_ORIGIN = "pool"
HELD_BACK_ORIGIN = "label held back (data.label_fraction)"
_MAX_LISTED = 20


def _pool_sample(path: Path, origin: str) -> Sample:
    return Sample(str(path), -1, path.stem, UNLABELED, origin)


def read_pool(path: str, extensions: frozenset[str] | set[str]) -> tuple[list[Sample], list[SkippedFile]]:
    """``data.unlabeled``: a folder (searched recursively; other files are listed as skipped) or a
    ``.txt`` list of image paths, one per line, relative to the list's folder."""
    given = Path(path).expanduser()
    origin = f"{POOL_ORIGIN} (data.unlabeled)"
    if given.is_dir():
        files = sorted(p for p in given.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in extensions]
        skipped = [SkippedFile(str(p), f"pool: not an image extension ({p.suffix or 'none'})")
                   for p in files if p.suffix.lower() not in extensions]
        if not images:
            raise UserError(f"data.unlabeled: the folder '{given}' holds no images (looked for "
                            f"{', '.join(sorted(extensions))}, recursively); point it at the unlabeled images")
        return [_pool_sample(p, origin) for p in images], skipped
    if given.is_file() and given.suffix.lower() == ".txt":
        images, missing = [], []
        for number, line in enumerate(given.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            p = p if p.is_absolute() else given.parent / p
            (images if p.is_file() else missing).append(p if p.is_file() else f"{given}:{number}: {line}")
        if missing:
            more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            raise UserError(f"data.unlabeled: {len(missing)} file(s) of the list do not exist:\n  "
                            + "\n  ".join(map(str, missing[:_MAX_LISTED])) + more
                            + "\nFix the list (paths are relative to its folder) or remove those lines.")
        if not images:
            raise UserError(f"data.unlabeled: the list '{given}' names no images")
        return [_pool_sample(p, origin) for p in images], []
    raise UserError(f"data.unlabeled: '{given}' is neither a folder nor a .txt list of images; give one of them")


def synthetic_pool(cfg: SyntheticConfig, seed: int) -> list[Sample]:
    """``num_unlabeled`` beads, defects in the proportion ``defect_ratio`` (seeded). Their class is
    kept in the sample because the renderer draws from it; the loaders give -1."""
    n = cfg.num_unlabeled
    labels = np.zeros(n, dtype=int)
    labels[np.random.default_rng([seed, n, 9]).permutation(n)[:round(n * cfg.defect_ratio)]] = 1
    return [Sample(f"synthetic:{UNLABELED}/{i:06d}", int(labels[i]), f"{UNLABELED}/{i:06d}", UNLABELED,
                   f"{POOL_ORIGIN} (synthetic {cfg.view})") for i in range(n)]


def hold_back_labels(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """Keep the labels of ``fraction`` of each class of the training split (seeded); the other
    training images move to the ``unlabeled`` split. A class left without a labeled image is an error."""
    if fraction >= 1.0:
        return samples
    rng = np.random.default_rng([seed, 5])
    train = [i for i, s in enumerate(samples) if s.split == "train"]
    held: set[int] = set()
    for cls, name in ((0, "normal"), (1, "defect")):
        members = [i for i in train if samples[i].label == cls]
        keep = round(fraction * len(members))
        if keep < 1:
            raise UserError(f"data.label_fraction {fraction} keeps no labeled {name} image of the training split's "
                            f"{len(members)}; raise it to at least {1 / max(len(members), 1):.3g}, or add images")
        held.update(rng.permutation(members)[keep:].tolist())
    out = list(samples)
    for i in held:
        out[i] = Sample(samples[i].path, samples[i].label, samples[i].group, UNLABELED, HELD_BACK_ORIGIN,
                        samples[i].image, samples[i].tile)
    return out


def pool_leaks(samples: list[Sample], duplicates: dict) -> None:
    """Refuse a pool image that is a (near-)copy of a validation or test image."""
    leaks = [p for p in duplicates.get("examples", [])
             if {p["split_a"], p["split_b"]} & {"val", "test"} and UNLABELED in (p["split_a"], p["split_b"])]
    count = sum(n for pair, n in duplicates.get("pairs_by_split", {}).items()
                if UNLABELED in pair and ("val" in pair or "test" in pair))
    if count:
        lines = [f"{p['a']} ~ {p['b']} ({p['distance']} bits, pixel diff {p['pixel_diff']})" for p in leaks]
        raise UserError(
            f"{count} unlabeled pool image(s) are copies or near-copies of validation or test images: the student "
            "would learn the teacher's answers on held-out images, and the test would lie:\n  "
            + "\n  ".join(lines[:_MAX_LISTED])
            + "\nRemove them from the pool (data.unlabeled), or set data.dedup_distance lower if they differ")


def pool_counts(samples: list[Sample]) -> dict[str, int]:
    """How many unlabeled images there are, and where they come from."""
    unlabeled = [s for s in samples if s.split == UNLABELED]
    held = sum(s.origin == HELD_BACK_ORIGIN for s in unlabeled)
    return {"images": len(unlabeled), "held_back_from_train": held, "pool": len(unlabeled) - held}
