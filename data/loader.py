"""Datasets and loaders: every training item is an (image index, view seed) pair.

The sampler, not the dataset, decides which view of an image a batch gets: it yields
``(index, view_seed)`` pairs, and the dataset rebuilds exactly that view (the rendered bead for
synthetic data, then the augmentation) from the seed. That makes epochs reproducible with any
number of workers, lets a distributed run shard the same order, and lets a cache of teacher
outputs be keyed by the view it was computed on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from data.config import AugmentConfig, SyntheticConfig
from data.images import open_rgb, square
from data.manifest import UNLABELED, Sample
from data.transforms import augment, to_float

__all__ = [
    "mix_seed", "synthetic_seed", "synthetic_pixels", "InspectionDataset", "ViewSampler",
    "make_loader", "class_weights", "default_workers",
]

_SPLIT_IDS = {"train": 1, "val": 2, "test": 3, "unlabeled": 4}
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
    """Images of one or more splits as float tensors in [0, 1] at ``size`` x ``size``.

    ``pixels`` holds the decoded images when they are cached in RAM (decoded once, reused by every
    epoch and stage). Items are ``(image, label, index, view_seed)``; ``view_seed`` 0 means the
    plain, un-augmented view, and ``label`` is -1 for an image whose label no stage may learn from
    (split ``unlabeled``: a pool image, or one held back by ``data.label_fraction``).

    With ``teacher_size``, items carry a fifth element: the teacher's own view of the same image, at
    its own resolution, made from the source pixels with the same augmentation (same seed), not a
    resample of the student's view: the teacher scores the kind of image it was evaluated on.
    ``teacher_view = False`` drops that element from items while keeping ``teacher_size`` (a
    student that learns from cached teacher outputs never reads it, and making it costs as much as
    the student's own view); :meth:`view` still makes it.
    """

    def __init__(self, samples: list[Sample], size: int, *, augment_cfg: AugmentConfig | None = None,
                 crop_pct: float = 1.0, synthetic: SyntheticConfig | None = None, run_seed: int = 0,
                 pixels: list[np.ndarray] | None = None, teacher_size: int | None = None,
                 teacher_pixels: list[np.ndarray] | None = None) -> None:
        self.samples = samples
        self.size = size
        self.teacher_size = teacher_size
        self.teacher_view = True  # whether items carry the teacher's view when teacher_size is set
        self.augment_cfg = augment_cfg
        self.crop_pct = crop_pct
        self.synthetic = synthetic
        self.run_seed = run_seed
        self.cached: dict[int, list[np.ndarray]] = {} if pixels is None else {size: pixels}
        if teacher_size is not None and teacher_pixels is not None:
            self.cached[teacher_size] = teacher_pixels
        self.labels = torch.tensor([-1 if s.split == UNLABELED else s.label for s in samples], dtype=torch.long)
        #: Rendered beads with synthetic.variants, per size and (image path, variant); shared across
        #: stages by :class:`data.prepare.PreparedData` (the renderer's own size included).
        self.variant_cache: dict[int, dict[tuple[str, int], np.ndarray]] = {}
        #: Augmented views at ``size`` kept in RAM by (image path, view seed), or None. Set for a
        #: training loader with a few fixed views per image (cached teacher outputs), where every
        #: epoch would otherwise redo the same augmentations; shared across stages by
        #: :class:`data.prepare.PreparedData`. A view is a function of its key, so a kept view is
        #: the one that making it again would give.
        self.view_memo: dict[tuple[str, int], torch.Tensor] | None = None

    @property
    def pixels(self) -> list[np.ndarray] | None:
        return self.cached.get(self.size)

    def __len__(self) -> int:
        return len(self.samples)

    def _variant(self, index: int, variant: int, size: int) -> np.ndarray:
        """Bead ``variant`` of a synthetic image, rendered once at the renderer's size and kept."""
        cache, key = self.variant_cache.setdefault(size, {}), (self.samples[index].path, variant)
        if key not in cache:
            native = self.synthetic.image_size
            if size == native:
                cache[key] = synthetic_pixels(self.samples[index], self.synthetic, self.run_seed, variant, native)
            else:
                cache[key] = resize_rendered(self._variant(index, variant, native), size)
        return cache[key]

    def _pixels(self, index: int, view_seed: int, size: int) -> np.ndarray:
        sample = self.samples[index]
        if self.synthetic is not None and self.synthetic.fresh and self.augment_cfg is not None and view_seed != 0:
            # Fresh synthetic training data: each view of an index is a newly rendered bead, or
            # one of `variants` beads rendered once and kept.
            count = self.synthetic.variants
            if count is None:
                return synthetic_pixels(sample, self.synthetic, self.run_seed, view_seed, size)
            return self._variant(index, view_seed % count + 1, size)
        if size in self.cached:
            return self.cached[size][index]
        if self.synthetic is not None:
            return synthetic_pixels(sample, self.synthetic, self.run_seed, 0, size)
        return square(open_rgb(sample.path), size, self.crop_pct)

    def view(self, index: int, view_seed: int, size: int) -> torch.Tensor:
        """Image ``index`` at ``size`` px, augmented with ``view_seed`` (0: the plain view)."""
        if self.view_memo is None or size != self.size or view_seed == 0:
            return self._make_view(index, view_seed, size)
        key = (self.samples[index].path, view_seed)
        kept = self.view_memo.get(key)
        if kept is None:
            kept = self.view_memo[key] = self._make_view(index, view_seed, size)
        return kept

    def _make_view(self, index: int, view_seed: int, size: int) -> torch.Tensor:
        chw = torch.from_numpy(np.array(self._pixels(index, view_seed, size), dtype=np.uint8)).permute(2, 0, 1)
        if self.augment_cfg is not None and view_seed != 0:
            return augment(chw, self.augment_cfg, torch.Generator().manual_seed(view_seed))
        return to_float(chw)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        index, view_seed = (key, 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        item = (self.view(index, view_seed, self.size), int(self.labels[index]), index, view_seed)
        if self.teacher_size is None or not self.teacher_view:
            return item
        return (*item, self.view(index, view_seed, self.teacher_size))


class ViewSampler(Sampler):
    """Yields ``(index, view_seed)`` for one epoch: shuffled or class-weighted, sharded by rank.

    ``views=None`` gives every (epoch, index) a new view seed. ``views=K`` restricts each image to
    K fixed views (seeds independent of the epoch), one of them picked per epoch: the views whose
    teacher outputs were cached.

    ``length`` (default: the number of images) is how many items an epoch has: a longer epoch
    goes through the images several times, each pass in a new order with new views. It gives a
    model trained on a few labeled images as many updates per epoch as one trained on many
    (the baseline beside a student distilled on a pool). With ``views=K`` such an epoch of P passes
    has K x P fixed views per image: K alone would show a few images the same K views dozens of
    times an epoch, which a student memorises (a distilled student on 120 labeled images, beside a
    pool, scored 0.59 test AUROC with 2 views, 0.88 with a new view every draw). The teacher's
    cost stays one forward pass per draw, as for a student distilled on the pool.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, weights: torch.Tensor | None = None,
                 views: int | None = None, num_replicas: int = 1, rank: int = 0, length: int | None = None) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.weights = weights
        self.num_replicas, self.rank = num_replicas, rank
        self.length = n if length is None else length
        self.views = views * self.passes if views is not None else None
        self.epoch = 0

    @property
    def passes(self) -> int:
        """How many times an epoch goes through the images (1 unless ``length`` exceeds their number)."""
        return max(1, -(-self.length // self.n)) if self.n else 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_seed(self, index: int, epoch: int, rep: int = 0) -> int:
        """The view of ``index`` in pass ``rep`` of ``epoch`` (``rep`` > 0 only in a longer epoch)."""
        extra = (rep,) if rep else ()
        if self.views is None:
            return mix_seed(self.seed, 1, epoch, index, *extra) or 1
        k = mix_seed(self.seed, 2, epoch, index, *extra) % self.views
        return self.cached_view_seed(index, k)

    def cached_view_seed(self, index: int, k: int) -> int:
        """The seed of fixed view ``k`` of image ``index`` (never 0, which means 'no augmentation')."""
        return mix_seed(self.seed, 3, k, index) or 1

    def _order(self) -> list[tuple[int, int]]:
        """(index, pass) pairs of this rank for the epoch."""
        order: list[tuple[int, int]] = []
        for rep in range(self.passes):
            gen = torch.Generator().manual_seed(mix_seed(self.seed, 4, self.epoch, *((rep,) if rep else ())))
            if self.weights is not None:
                drawn = torch.multinomial(self.weights, self.n, replacement=True, generator=gen)
            elif self.shuffle:
                drawn = torch.randperm(self.n, generator=gen)
            else:
                drawn = torch.arange(self.n)
            order += [(i, rep) for i in drawn.tolist()]
        order = order[:self.length]
        if self.num_replicas > 1:
            total = -(-len(order) // self.num_replicas) * self.num_replicas
            order = (order + order[: total - len(order)])[self.rank::self.num_replicas]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index, rep in self._order():
            yield index, self.view_seed(index, self.epoch, rep)

    def __len__(self) -> int:
        return -(-self.length // self.num_replicas)


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
                epoch_length: int | None = None) -> DataLoader:
    """A DataLoader over (index, view seed) keys; evaluation loaders keep order and plain views.
    A training epoch has ``epoch_length`` items (default: every image once; see :class:`ViewSampler`).

    ``weighted`` draws the labeled images with equal expected counts of each class; an unlabeled
    image (label -1) keeps weight 1, the weight of an image of a balanced set.
    """
    workers = default_workers() if num_workers is None else num_workers
    if train:
        weights = None
        if weighted:
            labels = dataset.labels
            known = labels >= 0
            weights = torch.ones(len(labels))
            weights[known] = class_weights(labels[known])[labels[known]]
        sampler: Sampler = ViewSampler(len(dataset), seed=seed, weights=weights, views=views,
                                       num_replicas=num_replicas, rank=rank, length=epoch_length)
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
