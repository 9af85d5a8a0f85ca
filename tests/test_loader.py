"""Loaders: views rebuilt exactly from their seed, class-weighted and sharded sampling, model views."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from data.config import AugmentConfig
from data.loader import InspectionDataset, ViewSampler, class_weights, make_loader, stratified_subset
from data.manifest import Sample
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


def test_label_fraction_is_stratified_and_keeps_the_views_of_the_full_set() -> None:
    labels = torch.tensor([1] * 20 + [0] * 80)
    subset = stratified_subset(labels, 0.1, seed=3)
    assert len(subset) == 10 and int(labels[subset].sum()) == 2  # 10% of each class
    assert stratified_subset(labels, 0.1, seed=3) == subset != stratified_subset(labels, 0.1, seed=4)
    assert sum(labels[stratified_subset(labels, 0.01, seed=0)].tolist()) == 1  # never a class dropped
    full, part = ViewSampler(100, seed=0, views=2), ViewSampler(100, seed=0, views=2, subset=subset)
    for epoch in range(3):
        full.set_epoch(epoch)
        part.set_epoch(epoch)
        drawn = list(part)
        assert sorted(i for i, _ in drawn) == subset and len(part) == 10
        assert all(v == full.view_seed(i, epoch) for i, v in drawn)  # a cached output still fits its view


def test_loader_with_a_label_fraction_draws_only_its_subset() -> None:
    ds = _dataset(n=40)
    loader = make_loader(ds, 4, train=True, seed=0, num_workers=0, fraction=0.25)
    seen = torch.cat([b[2] for b in loader]).tolist()
    assert set(seen) <= set(stratified_subset(ds.labels, 0.25, seed=0))
    assert len(seen) == len(set(seen)) == 8  # 10 images in batches of 4, the last partial one dropped


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
    beads = [large._pixels(*key) for key in keys]
    plain = data.dataset("test", 48)[0][0]
    assert renders == []  # every bead and plain view at 48 px came from the 32 px renders
    for (index, view), bead in zip(keys, beads):
        assert np.array_equal(bead, real(large.samples[index], syn, 1, view % 2 + 1, 48))
    expected = real(data.split("test")[0], syn, 1, 0, 48)
    assert torch.equal(plain, torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255)
