"""Near-duplicate images across splits, by perceptual hash: the leakage that makes a test lie.

Two photos of the same bead taken a second apart are different files but nearly the same image;
with one in train and one in test, a perfect test score measures memory, not skill. Each image's
64-bit pHash is compared with every image of the other splits; a pair within ``max_distance``
bits (Hamming) is a candidate, confirmed when the two images' small colour thumbnails also differ
by at most ``max_pixel_diff`` (mean absolute difference, as a fraction of 255). pHash sees only
the coarse grey layout, so on inspection images, which all look alike (one bead across one kind
of part), it pairs different beads with the same curve; the thumbnail check removes those.
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


def cross_split_duplicates(samples: list[Sample], hashes: list[int], thumbs: list[np.ndarray],
                           max_distance: int, max_pixel_diff: float, max_examples: int = 50,
                           chunk: int = 2048, splits: tuple[str, ...] = SPLITS) -> dict:
    """Count (and give examples of) near-duplicate pairs that straddle two of ``splits``."""
    flat = np.stack([t.reshape(-1) for t in thumbs]).astype(np.int16) if thumbs else np.zeros((0, 1), np.int16)
    by_split: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for sp in splits:
        idx = np.array([i for i, s in enumerate(samples) if s.split == sp], dtype=np.int64)
        by_split[sp] = (idx, np.array([hashes[i] for i in idx], dtype=np.uint64))
    pairs: list[dict] = []
    candidates = 0
    for sa, sb in combinations(splits, 2):
        ia, ha = by_split[sa]
        ib, hb = by_split[sb]
        for start in range(0, len(ha), chunk):
            dist = hamming_matrix(ha[start:start + chunk], hb)
            rows, cols = np.nonzero(dist <= max_distance)
            candidates += len(rows)
            a, b = ia[start + rows], ib[cols]
            diff = np.abs(flat[a] - flat[b]).mean(axis=1) / 255.0 if len(rows) else np.zeros(0)
            for k in np.nonzero(diff <= max_pixel_diff)[0]:
                pairs.append({"a": samples[a[k]].path, "split_a": sa, "b": samples[b[k]].path, "split_b": sb,
                              "distance": int(dist[rows[k], cols[k]]), "pixel_diff": round(float(diff[k]), 4)})
    pairs.sort(key=lambda p: (p["distance"], p["pixel_diff"]))
    by_pair = {f"{sa}-{sb}": sum(p["split_a"] == sa and p["split_b"] == sb for p in pairs)
               for sa, sb in combinations(splits, 2)}
    test_hit = {p["b"] if p["split_b"] == "test" else p["a"] for p in pairs if "test" in (p["split_a"], p["split_b"])}
    return {
        "method": "pHash (64-bit DCT) within max_distance bits, confirmed by 16x16 colour thumbnails "
                  "within max_pixel_diff",
        "max_distance": max_distance,
        "max_pixel_diff": max_pixel_diff,
        "pairs": len(pairs),
        "pairs_by_split": by_pair,
        "phash_candidates_rejected": candidates - len(pairs),
        "test_images_with_duplicate_elsewhere": len(test_hit),
        "examples": pairs[:max_examples],
    }
