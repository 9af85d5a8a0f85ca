"""Seeded, stratified, group-aware train/val/test splits.

Near-identical frames (a burst from one capture session) that land in both train and test make a
test score lie, so whole groups are assigned to one split. Groups come from ``data.group_by``, a
regex on the file name; without it every image is its own group (a plain stratified split).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from core.errors import UserError
from data.manifest import SPLITS, Sample

__all__ = ["with_groups", "split_samples", "complete_splits", "straddling_groups", "check_splits"]


def _group_key(path: str, pattern: re.Pattern[str]) -> str | None:
    match = pattern.search(Path(path).name)
    if match is None:
        return None
    return match.group(1) if match.groups() else match.group(0)


def with_groups(samples: list[Sample], group_by: str | None) -> tuple[list[Sample], int]:
    """Samples with ``group`` set from the regex; also the number of names it did not match
    (each of those stays a group of its own)."""
    if not group_by:
        return samples, 0
    pattern = re.compile(group_by)
    out, unmatched = [], 0
    for s in samples:
        key = _group_key(s.path, pattern)
        if key is None:
            unmatched += 1
            key = Path(s.path).name
        out.append(Sample(s.path, s.label, key, s.split, s.origin))
    return out, unmatched


def split_samples(samples: list[Sample], fractions: dict[str, float], seed: int) -> list[Sample]:
    """Assign each group to the split whose per-class quota is most unfilled (greedy, seeded).

    Groups are placed largest first, so the small ones even out the counts at the end; with
    singleton groups this is an exact stratified split up to rounding.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)
    totals = Counter(s.label for s in samples)
    target = {sp: {c: f * totals[c] for c in totals} for sp, f in fractions.items()}
    filled = {sp: Counter() for sp in fractions}
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(groups[g]))  # stable: ties keep the seeded order

    out: list[Sample] = []
    for g in order:
        members = groups[g]
        counts = Counter(s.label for s in members)

        def unfilled(sp: str) -> float:
            return sum(n * (target[sp][c] - filled[sp][c]) / max(target[sp][c], 1e-9)
                       for c, n in counts.items() if target[sp][c] > 0)

        best = max(fractions, key=unfilled)  # ties: first split in order (train, val, test)
        filled[best].update(counts)
        out.extend(s.with_split(best) for s in members)
    return out


def complete_splits(samples: list[Sample], fractions: tuple[float, float, float], seed: int) -> tuple[list[Sample], str]:
    """Fill in whatever splits the source did not provide, and say what was done.

    No split at all: train/val/test by ``fractions``. Train and val but no test: the test split is
    carved out of train (never out of the user's val). Train and test but no val: likewise.
    """
    have = {s.split for s in samples}
    frac = dict(zip(SPLITS, fractions))
    if None in have and len(have) > 1:
        raise UserError("some images have a split and others do not; give every image a split or none")
    if have == {None}:
        return split_samples(samples, frac, seed), "split by data.split " + str(list(fractions))
    missing = [sp for sp in SPLITS if sp not in have]
    if not missing:
        return samples, "splits as given by the source"
    if "train" in missing:
        raise UserError(f"the dataset has splits {sorted(have)} but no 'train' split")
    train = [s for s in samples if s.split == "train"]
    rest = [s for s in samples if s.split != "train"]
    parts = {"train": frac["train"], **{sp: frac[sp] for sp in missing}}
    total = sum(parts.values())
    resplit = split_samples(train, {k: v / total for k, v in parts.items()}, seed)
    note = f"the source has no {' or '.join(missing)} split: carved out of train by data.split {list(fractions)}"
    return rest + resplit, note


def straddling_groups(samples: list[Sample]) -> dict[str, list[str]]:
    """Groups whose images lie in more than one split (leakage when splits came from the source)."""
    where: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        where[s.group].add(s.split or "")
    return {g: sorted(sp) for g, sp in where.items() if len(sp) > 1}


def check_splits(samples: list[Sample]) -> dict[str, dict[str, int]]:
    """Class counts per split; an empty split or a split with one class is an error."""
    counts = {sp: {"normal": 0, "defect": 0} for sp in SPLITS}
    for s in samples:
        counts[s.split]["defect" if s.label == 1 else "normal"] += 1
    for sp, c in counts.items():
        if c["normal"] + c["defect"] == 0:
            raise UserError(f"the '{sp}' split is empty; add images or change data.split")
        if c["normal"] == 0 or c["defect"] == 0:
            missing = "defect" if c["defect"] == 0 else "normal"
            raise UserError(
                f"the '{sp}' split has only one class (normal: {c['normal']}, defect: {c['defect']}); "
                f"it needs {missing} images too — add some, or change data.split so the pipeline can stratify"
            )
    return counts
