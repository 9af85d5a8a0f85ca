"""Loaders: views rebuilt exactly from their seed, class-weighted and sharded sampling, model views."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from data.config import AugmentConfig
from data.loader import InspectionDataset, ViewSampler, class_weights, make_loader
from data.pool import HELD_BACK_ORIGIN, hold_back_labels
from core.errors import UserError
from data.manifest import UNLABELED, Sample
from data.transforms import ModelView, augment, model_view


def _dataset(n: int = 8, size: int = 24, augment_cfg: AugmentConfig | None = AugmentConfig()) -> InspectionDataset:
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    samples = [Sample(f"mem{i}", int(i % 4 == 0), str(i), "train") for i in range(n)]
    return InspectionDataset(samples, size, augment_cfg=augment_cfg, pixels=pixels)


def test_view_seed_rebuilds_the_same_pixels() -> None:
    ds = _dataset()
    a, label, index, seed = ds[(3, 12345)]
    b, *_ = ds[(3, 12345)]
    c, *_ = ds[(3, 54321)]
    plain, *_ = ds[3]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (index, seed) == (3, 12345)
    assert torch.equal(plain, torch.from_numpy(ds.pixels[3]).permute(2, 0, 1).float() / 255)


def test_augment_stream_does_not_depend_on_switches() -> None:
    x = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    off = AugmentConfig(hflip=0, vflip=0, rotate=0, translate=0, scale=(1.0, 1.0), brightness=0, contrast=0, saturation=0)
    assert torch.equal(augment(x, off, torch.Generator().manual_seed(1)), x.float() / 255)


def test_sampler_is_reproducible_and_changes_per_epoch() -> None:
    s = ViewSampler(10, seed=0)
    e0 = list(s)
    assert list(s) == e0
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(i for i, _ in e1) == list(range(10)) and e1 != e0
    assert all(v != 0 for _, v in e0 + e1)


def test_cached_views_are_fixed_per_image() -> None:
    s = ViewSampler(6, seed=0, views=3)
    allowed = {i: {s.cached_view_seed(i, k) for k in range(3)} for i in range(6)}
    seen = {i: set() for i in range(6)}
    for epoch in range(20):
        s.set_epoch(epoch)
        for i, v in s:
            assert v in allowed[i]
            seen[i].add(v)
    assert all(len(v) == 3 for v in seen.values())  # over 20 epochs every view comes up


def test_sharding_covers_every_index_once() -> None:
    shards = [list(ViewSampler(10, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(sh) == 4 for sh in shards)
    assert {i for sh in shards for i, _ in sh} == set(range(10))
    single = list(ViewSampler(10, seed=0))
    assert {i: v for sh in shards for i, v in sh} == dict(single)  # same views whichever rank draws them


def test_weighted_sampler_balances_classes() -> None:
    labels = torch.tensor([1] * 10 + [0] * 90)
    w = class_weights(labels)
    assert torch.allclose(w, torch.tensor([100 / 180, 100 / 20]))
    s = ViewSampler(100, seed=0, weights=w[labels])
    drawn = []
    for epoch in range(20):
        s.set_epoch(epoch)
        drawn += [int(labels[i]) for i, _ in s]
    assert abs(np.mean(drawn) - 0.5) < 0.05


def test_label_fraction_holds_back_a_stratified_seeded_part_of_train() -> None:
    samples = [Sample(f"t{i}", int(i < 20), str(i), "train") for i in range(100)]
    samples += [Sample(f"v{i}", i % 2, f"v{i}", "val") for i in range(10)]
    kept = hold_back_labels(samples, 0.1, seed=3)
    train = [s for s in kept if s.split == "train"]
    assert len(train) == 10 and sum(s.label for s in train) == 2  # 10% of each class
    held = [s for s in kept if s.split == UNLABELED]
    assert len(held) == 90 and all(s.origin == HELD_BACK_ORIGIN for s in held)
    assert [s for s in kept if s.split == "val"] == samples[100:]  # validation keeps every label
    assert hold_back_labels(samples, 0.1, seed=3) == kept != hold_back_labels(samples, 0.1, seed=4)
    assert hold_back_labels(samples, 1.0, seed=0) == samples
    with pytest.raises(UserError, match="keeps no labeled defect image of the training split's 20"):
        hold_back_labels(samples, 0.02, seed=0)


def test_a_longer_epoch_passes_over_the_images_again_with_new_views() -> None:
    plain, longer = ViewSampler(10, seed=4), ViewSampler(10, seed=4, length=25)
    for epoch in (0, 3):
        plain.set_epoch(epoch)
        longer.set_epoch(epoch)
        drawn = list(longer)
        assert len(drawn) == len(longer) == 25 and drawn[:10] == list(plain)  # the first pass is the plain epoch
        assert sorted(i for i, _ in drawn[10:20]) == list(range(10))  # each further pass: every image once
        assert len({(i, v) for i, v in drawn[:20]}) == 20  # an image's second pass is a new view of it


def test_a_longer_epoch_with_cached_views_gets_views_for_every_pass() -> None:
    # 10 images drawn 25 times an epoch (3 passes): 2 cached views become 6, each a fixed seed,
    # and every draw of every epoch is one of them (what the teacher cache covers).
    s = ViewSampler(10, seed=1, views=2, length=25)
    assert s.passes == 3 and s.views == 6 and ViewSampler(10, seed=1, views=2).views == 2
    cached = {i: {s.cached_view_seed(i, k) for k in range(s.views)} for i in range(10)}
    assert all(len(v) == 6 for v in cached.values())
    seen: dict[int, set[int]] = {i: set() for i in range(10)}
    for epoch in range(12):
        s.set_epoch(epoch)
        for i, v in s:
            assert v in cached[i]
            seen[i].add(v)
    assert sum(len(v) for v in seen.values()) > 2 * 10 * 2  # far more than 2 distinct views per image


def test_unlabeled_images_load_as_minus_one_and_keep_weight_one_in_a_weighted_sampler() -> None:
    rng = np.random.default_rng(0)
    samples = [Sample(f"m{i}", int(i < 4), str(i), "train") for i in range(16)]
    samples += [Sample(f"u{i}", 1, f"u{i}", UNLABELED) for i in range(16)]  # a true label no stage may see
    pixels = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in samples]
    ds = InspectionDataset(samples, 8, pixels=pixels)
    assert ds.labels[16:].eq(-1).all() and ds[20][1] == -1 and ds[0][1] == 1
    loader = make_loader(ds, 8, train=True, seed=0, weighted=True, num_workers=0)
    weights = loader.sampler.weights
    assert torch.allclose(weights[16:], torch.ones(16))  # an unlabeled image: the weight of a balanced set
    assert torch.allclose(weights[:4], torch.full((4,), 2.0)) and torch.allclose(weights[4:16], torch.full((12,), 2 / 3))


def test_loader_batches_and_workers_agree() -> None:
    ds = _dataset(n=12)
    one = [b[0] for b in make_loader(ds, 4, train=True, seed=0, num_workers=0)]
    two = [b[0] for b in make_loader(ds, 4, train=True, seed=0, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and len(one) == 3


def test_model_view_resizes_and_normalises() -> None:
    view = ModelView(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.full((2, 3, 32, 32), 0.75)
    assert torch.allclose(view(x), torch.ones(2, 3, 16, 16))
    net = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=2)
    v = model_view(net, 48)
    assert v.size == 48 and torch.allclose(v.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32)
    assert torch.allclose(model_view(vit, 32).std.flatten(), torch.tensor([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("epoch", [0, 3])
def test_eval_loader_keeps_order_and_plain_views(epoch: int) -> None:
    ds = _dataset(n=6, augment_cfg=None)
    batches = list(make_loader(ds, 4, train=False, seed=epoch))
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(6))
    assert torch.cat([b[3] for b in batches]).tolist() == [0] * 6


def test_synthetic_beads_rendered_once_give_the_pixels_of_rendering_at_each_size(tmp_path, monkeypatch) -> None:
    """The student's larger size resizes the beads the teacher's stage rendered: same pixels, no second render."""
    import data.loader as loader_module
    from data.config import DataConfig, SyntheticConfig
    from data.prepare import prepare_data

    syn = SyntheticConfig(image_size=32, num_train=6, num_val=3, num_test=3, variants=2)
    data = prepare_data(DataConfig(source="synthetic", synthetic=syn), tmp_path / "data", seed=1)
    keys = [(i, v) for i in range(6) for v in (1, 2)]
    small = data.dataset("train", 32, train=True)
    for key in keys:
        small[key]
    real = loader_module.synthetic_pixels
    renders = []
    monkeypatch.setattr(loader_module, "synthetic_pixels", lambda *a: renders.append(a) or real(*a))
    large = data.dataset("train", 48, train=True)
    beads = [large._pixels(*key, 48) for key in keys]
    plain = data.dataset("test", 48)[0][0]
    assert renders == []  # every bead and plain view at 48 px came from the 32 px renders
    for (index, view), bead in zip(keys, beads):
        assert np.array_equal(bead, real(large.samples[index], syn, 1, view % 2 + 1, 48))
    expected = real(data.split("test")[0], syn, 1, 0, 48)
    assert torch.equal(plain, torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255)


def test_fixed_training_views_are_kept_after_their_first_use_and_shared_by_later_stages(tmp_path, monkeypatch) -> None:
    """With K fixed views per image, each view is augmented once per run: kept views equal fresh ones,
    a second loader (the prune stage's) reuses them, and fresh views per epoch are never kept."""
    import data.loader as loader_module
    from data.config import DataConfig, SyntheticConfig
    from data.prepare import prepare_data

    syn = SyntheticConfig(image_size=32, num_train=6, num_val=3, num_test=3, variants=2)
    data = prepare_data(DataConfig(source="synthetic", synthetic=syn, num_workers=0), tmp_path / "data", seed=1)
    loader = data.loader("train", 32, 4, train=True, views=2)
    assert loader.dataset.view_memo is not None
    first = []
    for epoch in range(6):
        loader.sampler.set_epoch(epoch)
        first += [(int(i), int(v), x) for b in loader for x, i, v in zip(b[0], b[2], b[3])]
    seeds = {(i, v) for i, v, _ in first}
    assert len(loader.dataset.view_memo) == len(seeds) <= 6 * 2
    fresh = data.dataset("train", 32, train=True)
    assert fresh.view_memo is None
    for i, v, x in first:
        assert torch.equal(x, fresh[(i, v)][0])  # a kept view is the view made again

    augments = []
    real = loader_module.augment
    monkeypatch.setattr(loader_module, "augment", lambda *a: augments.append(a) or real(*a))
    again = data.loader("train", 32, 4, train=True, views=2)
    assert again.dataset.view_memo is loader.dataset.view_memo
    for i, v in seeds:
        again.dataset[(i, v)]
    assert augments == []  # the later stage made none of them again
    assert data.loader("train", 32, 4, train=True).dataset.view_memo is None  # a new view every epoch: not kept


@pytest.mark.parametrize("change", [{"cache": "none"}, {"ram_limit_mb": 0}, {"num_workers": 1}])
def test_fixed_views_are_not_kept_without_ram_or_in_loader_processes(tmp_path, change) -> None:
    from data.config import DataConfig, SyntheticConfig
    from data.prepare import prepare_data

    syn = SyntheticConfig(image_size=32, num_train=6, num_val=3, num_test=3, variants=2)
    cfg = DataConfig(source="synthetic", synthetic=syn, **({"num_workers": 0} | change))
    data = prepare_data(cfg, tmp_path / "data", seed=1)
    assert data.loader("train", 32, 4, train=True, views=2).dataset.view_memo is None
