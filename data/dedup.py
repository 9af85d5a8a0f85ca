"""Near-duplicate images across splits, by perceptual hash: the leakage that makes a test lie.

Two photos of the same bead taken a second apart are different files but nearly the same image;
with one in train and one in test, a perfect test score measures memory, not skill. Each image's
64-bit pHash is compared with every image of the other splits; pairs within ``max_distance`` bits
(Hamming) are reported.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from data.manifest import SPLITS, Sample

__all__ = ["hamming_matrix", "cross_split_duplicates"]

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two arrays of 64-bit hashes (uint64)."""
    x = np.bitwise_xor(a[:, None], b[None, :])
    return _POPCOUNT[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def cross_split_duplicates(samples: list[Sample], hashes: list[int | None], max_distance: int,
                           max_examples: int = 50, chunk: int = 2048) -> dict:
    """Count (and give examples of) near-duplicate pairs that straddle two splits."""
    by_split: dict[str, tuple[list[int], np.ndarray]] = {}
    for sp in SPLITS:
        idx = [i for i, s in enumerate(samples) if s.split == sp and hashes[i] is not None]
        by_split[sp] = (idx, np.array([hashes[i] for i in idx], dtype=np.uint64))
    pairs_by_split: dict[str, int] = {}
    examples: list[dict] = []
    for sa, sb in combinations(SPLITS, 2):
        ia, ha = by_split[sa]
        ib, hb = by_split[sb]
        n = 0
        for start in range(0, len(ha), chunk):
            dist = hamming_matrix(ha[start:start + chunk], hb)
            rows, cols = np.nonzero(dist <= max_distance)
            n += len(rows)
            order = np.argsort(dist[rows, cols], kind="stable")
            for r, c in zip(rows[order], cols[order]):
                if len(examples) >= max_examples:
                    break
                examples.append({
                    "a": samples[ia[start + r]].path, "split_a": sa,
                    "b": samples[ib[c]].path, "split_b": sb,
                    "distance": int(dist[r, c]),
                })
        pairs_by_split[f"{sa}-{sb}"] = n
    images_involved = _test_images_with_duplicates(by_split, max_distance, chunk)
    return {
        "method": "pHash (64-bit DCT), Hamming distance",
        "max_distance": max_distance,
        "pairs": sum(pairs_by_split.values()),
        "pairs_by_split": pairs_by_split,
        "test_images_with_duplicate_elsewhere": images_involved,
        "examples": examples,
    }


def _test_images_with_duplicates(by_split: dict, max_distance: int, chunk: int) -> int:
    """How many test images have a near-duplicate in train or val (the ones whose score is suspect)."""
    ht = by_split["test"][1]
    others = np.concatenate([by_split["train"][1], by_split["val"][1]])
    if len(ht) == 0 or len(others) == 0:
        return 0
    hit = 0
    for start in range(0, len(ht), chunk):
        hit += int((hamming_matrix(ht[start:start + chunk], others) <= max_distance).any(axis=1).sum())
    return hit
