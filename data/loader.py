"""Datasets and loaders: every training item is an (image index, view seed) pair.

The sampler, not the dataset, decides which view of an image a batch gets: it yields
``(index, view_seed)`` pairs, and the dataset rebuilds exactly that view (the rendered bead for
synthetic data, then the augmentation) from the seed. That makes epochs reproducible with any
number of workers, lets a distributed run shard the same order, and lets a cache of teacher
outputs be keyed by the view it was computed on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from data.config import AugmentConfig, SyntheticConfig
from data.images import open_rgb, square
from data.manifest import Sample
from data.transforms import augment, to_float

__all__ = [
    "mix_seed", "synthetic_seed", "synthetic_pixels", "InspectionDataset", "ViewSampler",
    "make_loader", "class_weights", "default_workers",
]

_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
_MASK = (1 << 62) - 1


def mix_seed(*parts: int) -> int:
    """A well-mixed 62-bit seed from integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([p & 0xFFFFFFFF for p in parts] + [p >> 32 & 0xFFFFFFFF for p in parts])
    a, b = state.generate_state(2, dtype=np.uint32)
    return ((int(a) << 32) | int(b)) & _MASK


def synthetic_seed(run_seed: int, sample: Sample, variant: int) -> int:
    """The renderer seed of a synthetic sample ``synthetic:<split>/<index>`` in a given variant."""
    split, index = sample.path.removeprefix("synthetic:").split("/")
    return mix_seed(run_seed, _SPLIT_IDS[split], int(index), variant)


def synthetic_pixels(sample: Sample, cfg: SyntheticConfig, run_seed: int, variant: int, size: int) -> np.ndarray:
    """Render one synthetic bead (uint8 HWC) at ``size``."""
    from data.synth import render_sample

    return resize_rendered(render_sample(synthetic_seed(run_seed, sample, variant), sample.label, cfg).image, size)


def resize_rendered(image: np.ndarray, size: int) -> np.ndarray:
    """A bead rendered at ``synthetic.image_size``, at a model's ``size`` (bicubic; itself when equal).

    The only way a render changes size, so a render kept at its own size and resized later is
    pixel for pixel what rendering at ``size`` gives.
    """
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


class InspectionDataset(Dataset):
    """Images of one split as float tensors in [0, 1] at ``size`` x ``size``.

    ``pixels`` holds the decoded images when they are cached in RAM (decoded once, reused by
    every epoch and stage). Items are ``(image, label, index, view_seed)``; ``view_seed`` 0 means
    the plain, un-augmented view.
    """

    def __init__(self, samples: list[Sample], size: int, *, augment_cfg: AugmentConfig | None = None,
                 crop_pct: float = 1.0, synthetic: SyntheticConfig | None = None, run_seed: int = 0,
                 pixels: list[np.ndarray] | None = None) -> None:
        self.samples = samples
        self.size = size
        self.augment_cfg = augment_cfg
        self.crop_pct = crop_pct
        self.synthetic = synthetic
        self.run_seed = run_seed
        self.pixels = pixels
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        self._variants: dict[tuple[int, int], np.ndarray] = {}  # rendered beads, with synthetic.variants
        self._native_variants: dict[tuple[int, int], np.ndarray] | None = None  # the same at the render size

    def __len__(self) -> int:
        return len(self.samples)

    def _pixels(self, index: int, view_seed: int) -> np.ndarray:
        sample = self.samples[index]
        if self.synthetic is not None and self.synthetic.fresh and self.augment_cfg is not None and view_seed != 0:
            # Fresh synthetic training data: each view of an index is a newly rendered bead, or
            # one of `variants` beads rendered once and kept.
            count = self.synthetic.variants
            if count is None:
                return synthetic_pixels(sample, self.synthetic, self.run_seed, view_seed, self.size)
            key = (index, view_seed % count + 1)
            if key not in self._variants:
                # Rendered once at the renderer's own size (kept for every stage), resized per model size.
                native = self._native_variants
                if native is None or key not in native:
                    image = synthetic_pixels(sample, self.synthetic, self.run_seed, key[1], self.synthetic.image_size)
                    if native is not None:
                        native[key] = image
                else:
                    image = native[key]
                self._variants[key] = resize_rendered(image, self.size)
            return self._variants[key]
        if self.pixels is not None:
            return self.pixels[index]
        if self.synthetic is not None:
            return synthetic_pixels(sample, self.synthetic, self.run_seed, 0, self.size)
        return square(open_rgb(sample.path), self.size, self.crop_pct)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, view_seed = (key, 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        chw = torch.from_numpy(np.array(self._pixels(index, view_seed), dtype=np.uint8)).permute(2, 0, 1)
        if self.augment_cfg is not None and view_seed != 0:
            image = augment(chw, self.augment_cfg, torch.Generator().manual_seed(view_seed))
        else:
            image = to_float(chw)
        return image, self.samples[index].label, index, view_seed


class ViewSampler(Sampler):
    """Yields ``(index, view_seed)`` for one epoch: shuffled or class-weighted, sharded by rank.

    ``views=None`` gives every (epoch, index) a new view seed. ``views=K`` restricts each image to
    K fixed views (seeds independent of the epoch), one of them picked per epoch: the views whose
    teacher outputs were cached.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, weights: torch.Tensor | None = None,
                 views: int | None = None, num_replicas: int = 1, rank: int = 0,
                 subset: Sequence[int] | None = None) -> None:
        # ``subset``: only these indices are drawn (a fraction of the labels); the indices keep
        # their meaning in the full dataset, so view seeds and cached outputs still match.
        self.indices = torch.arange(n) if subset is None else torch.as_tensor(sorted(subset), dtype=torch.long)
        self.n, self.seed, self.shuffle = len(self.indices), seed, shuffle
        self.weights = None if weights is None else weights[self.indices]
        self.views, self.num_replicas, self.rank = views, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_seed(self, index: int, epoch: int) -> int:
        if self.views is None:
            return mix_seed(self.seed, 1, epoch, index) or 1
        k = mix_seed(self.seed, 2, epoch, index) % self.views
        return self.cached_view_seed(index, k)

    def cached_view_seed(self, index: int, k: int) -> int:
        """The seed of fixed view ``k`` of image ``index`` (never 0, which means 'no augmentation')."""
        return mix_seed(self.seed, 3, k, index) or 1

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 4, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=gen)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.arange(self.n)
        order = self.indices[order].tolist()
        if self.num_replicas > 1:
            total = -(-len(order) // self.num_replicas) * self.num_replicas
            order = (order + order[: total - len(order)])[self.rank::self.num_replicas]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._order():
            yield index, self.view_seed(index, self.epoch)

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> list[int]:
    """``fraction`` of the indices of each class (at least one per class), drawn with ``seed``."""
    rng = np.random.default_rng([seed, 5])
    keep: list[int] = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten().numpy()
        keep += rng.permutation(members)[: max(1, round(fraction * len(members)))].tolist()
    return sorted(keep)


def default_workers() -> int:
    """Loader processes: none on a 2-core machine (they would fight the training threads)."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores - 1)


def class_weights(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """Inverse-frequency weights, normalised so a balanced set gets 1.0 for each class."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    return counts.sum() / (num_classes * counts)


def make_loader(dataset: InspectionDataset, batch_size: int, *, train: bool, seed: int,
                weighted: bool = False, views: int | None = None, num_workers: int | None = None,
                num_replicas: int = 1, rank: int = 0, drop_last: bool | None = None,
                fraction: float = 1.0) -> DataLoader:
    """A DataLoader over (index, view seed) keys; evaluation loaders keep order and plain views.

    ``fraction`` < 1 (training only) draws from a stratified, seeded subset of the images.
    """
    workers = default_workers() if num_workers is None else num_workers
    if train:
        subset = stratified_subset(dataset.labels, fraction, seed) if fraction < 1.0 else None
        labels = dataset.labels if subset is None else dataset.labels[subset]
        weights = class_weights(labels)[dataset.labels] if weighted else None
        sampler: Sampler = ViewSampler(len(dataset), seed=seed, weights=weights, views=views,
                                       num_replicas=num_replicas, rank=rank, subset=subset)
    else:
        indices = list(range(len(dataset)))[rank::num_replicas]
        sampler = indices  # type: ignore[assignment]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=(train and len(sampler) > batch_size) if drop_last is None else drop_last,
        pin_memory=torch.cuda.is_available(),
    )
