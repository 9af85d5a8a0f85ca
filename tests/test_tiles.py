"""Tiles of whole-part images: geometry, labels from boxes, splits per image, loading, image scores."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from data.config import AugmentConfig, DataConfig, SyntheticConfig, TilesConfig
from core.errors import UserError
from data.images import open_rgb
from data.loader import synthetic_seed
from data.manifest import Sample, read_manifest, write_manifest
from data.prepare import prepare_data, summary_lines
from data.synth import render_sample
from data.tiles import (
    EXCLUDED,
    check_tile_splits,
    image_scores,
    label_tile,
    make_tiles,
    pixel_boxes,
    tile_rects,
    tile_report,
    tile_summary_lines,
)
from data.transforms import augment
from data.yolo import read_yolo
from distill.config import load_config


# ----------------------------------------------------------------------------- geometry
def _check_cover(rects: list[tuple[int, int, int, int]], width: int, height: int, overlap: float) -> None:
    """Tiles cover every pixel, stay inside, and neighbours share at least ``overlap`` of a tile."""
    hits = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in rects:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        hits[y0:y1, x0:x1] += 1
    assert hits.min() >= 1
    xs = sorted({r[0] for r in rects})
    ys = sorted({r[1] for r in rects})
    tw, th = rects[0][2] - rects[0][0], rects[0][3] - rects[0][1]
    assert all(r[2] - r[0] == tw and r[3] - r[1] == th for r in rects)  # one tile size per image
    assert len(rects) == len(xs) * len(ys)
    assert max(xs) + tw == width and max(ys) + th == height  # the last column and row end at the edge
    for starts, side in ((xs, tw), (ys, th)):
        # (tiles are at least a pixel apart: an overlap above 1 - 1/side is as close as they get)
        assert all(b - a <= max(1.0, side - overlap * side + 1e-9) for a, b in itertools.pairwise(starts))


def test_size_tiles_shift_the_last_row_and_column_inward() -> None:
    rects = tile_rects(100, 60, TilesConfig(size=40, overlap=0.25))
    # stride floor(40 * 0.75) = 30: columns at 0, 30 and 60 (ends at 100); rows at 0 and 20 (shifted in).
    assert sorted({r[0] for r in rects}) == [0, 30, 60] and sorted({r[1] for r in rects}) == [0, 20]
    assert rects[0] == (0, 0, 40, 40) and rects[-1] == (60, 20, 100, 60)
    _check_cover(rects, 100, 60, 0.25)
    assert tile_rects(80, 80, TilesConfig(size=40)) == [(0, 0, 40, 40), (40, 0, 80, 40),
                                                        (0, 40, 40, 80), (40, 40, 80, 80)]
    assert tile_rects(40, 40, TilesConfig(size=40, overlap=0.5)) == [(0, 0, 40, 40)]


def test_grid_tiles_are_rows_by_cols_and_cover_the_image() -> None:
    rects = tile_rects(101, 75, TilesConfig(grid=(3, 4)))
    assert len(rects) == 12 and rects[0][2] == 26 and rects[0][3] == 25  # ceil(101 / 4), 75 / 3
    _check_cover(rects, 101, 75, 0.0)
    rects = tile_rects(101, 75, TilesConfig(grid=(3, 4), overlap=0.2))
    assert len(rects) == 12
    _check_cover(rects, 101, 75, 0.2)
    assert tile_rects(50, 30, TilesConfig(grid=(1, 1))) == [(0, 0, 50, 30)]


def test_geometry_holds_for_many_shapes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(8, 300, 2))
        overlap = float(rng.choice([0.0, 0.1, 0.25, 0.5, 0.9]))
        if rng.random() < 0.5:
            cfg = TilesConfig(size=int(rng.integers(8, min(w, h) + 1)), overlap=overlap)
        else:
            cfg = TilesConfig(grid=(int(rng.integers(1, min(6, h) + 1)), int(rng.integers(1, min(6, w) + 1))),
                              overlap=overlap)
        try:
            rects = tile_rects(w, h, cfg)
        except UserError:  # a grid finer than the pixels: refused, never silently repeated
            assert cfg.grid is not None
            continue
        _check_cover(rects, w, h, overlap)
        # A defect no larger than the shared strip lies whole inside at least one tile.
        side = rects[0][2] - rects[0][0], rects[0][3] - rects[0][1]
        bw, bh = (max(1, int(min(overlap, 1 - 1 / s) * s)) for s in side)
        if overlap > 0 and bw <= w and bh <= h:
            x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            assert any(r[0] <= x and x + bw <= r[2] and r[1] <= y and y + bh <= r[3] for r in rects)


# ----------------------------------------------------------------------------- labels
def test_a_box_cut_in_half_makes_both_tiles_defects() -> None:
    cfg = TilesConfig(grid=(1, 2))  # tiles (0, 0, 40, 40) and (40, 0, 80, 40)
    image = Sample("img.png", 1, "g", "train")
    tiles = make_tiles([image], [(80, 40)], {"img.png": [(0, 0.5, 0.5, 0.25, 0.25)]}, cfg, ["gap"])
    assert [t.tile for t in tiles] == [(0, 0, 40, 40), (40, 0, 80, 40)]
    assert [t.label for t in tiles] == [1, 1]
    assert tiles[0].origin == "tile: 0.50 of a gap box"


def test_a_box_mostly_in_one_tile_leaves_the_other_out() -> None:
    cfg = TilesConfig(grid=(1, 2))
    image = Sample("img.png", 1, "g", "train")
    # x from 25 to 45: 15 px (0.75) in the left tile, 5 px (0.25) in the right one.
    tiles = make_tiles([image], [(80, 40)], {"img.png": [(0, 35 / 80, 0.5, 20 / 80, 0.25)]}, cfg, ["gap"])
    assert [t.label for t in tiles] == [1, EXCLUDED]
    assert "sliver, 0.25 of a gap box < data.tiles.min_box_fraction 0.5" in tiles[1].origin
    lenient = make_tiles([image], [(80, 40)], {"img.png": [(0, 35 / 80, 0.5, 20 / 80, 0.25)]},
                         TilesConfig(grid=(1, 2), min_box_fraction=0.2), ["gap"])
    assert [t.label for t in lenient] == [1, 1]


def test_slivers_are_excluded_unless_another_box_is_held() -> None:
    tile = (0, 0, 40, 40)
    sliver_a = (0, 35.0, 0.0, 55.0, 10.0)  # 5 of 20 px wide inside: 0.25
    sliver_b = (1, 0.0, 38.0, 10.0, 48.0)  # 2 of 10 px tall inside: 0.2
    whole = (0, 5.0, 5.0, 15.0, 15.0)
    assert label_tile(tile, [], 0.5) == (0, None, 0.0)
    assert label_tile(tile, [(0, 50.0, 50.0, 60.0, 60.0)], 0.5) == (0, None, 0.0)  # a box elsewhere
    assert label_tile(tile, [sliver_a, sliver_b], 0.5)[0] == EXCLUDED  # never taught as normal
    assert label_tile(tile, [sliver_a, whole], 0.5) == (1, 0, 1.0)
    assert label_tile(tile, [sliver_a], 0.25)[0] == 1


def test_the_report_names_defects_no_tile_holds_and_train_without_defect_tiles_is_refused() -> None:
    cfg = TilesConfig(grid=(1, 2), min_box_fraction=0.6)
    images = [Sample("big.png", 1, "a", "train"), Sample("small.png", 1, "b", "train"), Sample("n.png", 0, "c", "test")]
    boxes = {"big.png": [(0, 0.5, 0.5, 1.0, 1.0)], "small.png": [(0, 0.2, 0.5, 0.1, 0.1)]}
    tiles = make_tiles(images, [(80, 40)] * 3, boxes, cfg)
    report = tile_report(images, tiles, cfg)
    assert report["counts"]["train"] == {"images": {"normal": 0, "defect": 2},
                                         "tiles": {"normal": 1, "defect": 1, "excluded": 2},
                                         "defect_images_without_defect_tile": 1}
    assert report["excluded"] == 2 and report["tiles_per_image"] == {"min": 2, "max": 2}
    assert "{'train': 1}" in tile_summary_lines(report)[-1]
    check_tile_splits(report)
    only_big = tile_report(images[:1], tiles[:2], cfg)
    with pytest.raises(UserError, match=r"data\.tiles: the 'train' split has no defect tiles .*2 excluded as slivers"):
        check_tile_splits(only_big)


def test_boxes_are_clipped_to_the_frame_and_boxes_outside_it_refused() -> None:
    assert pixel_boxes([(2, 0.95, 0.5, 0.2, 0.5)], 100, 50) == [(2, 85.0, 12.5, 100.0, 37.5)]
    assert pixel_boxes([(0, 1.0, 0.5, 0.0, 0.0)], 100, 50) == [(0, 99.0, 24.5, 100.0, 25.5)]  # a point: 1 px
    for box in [(0, 0.5, 1.2, 0.1, 0.1), (0, 1.01, 0.5, 0.0, 0.1), (0, float("nan"), 0.5, 0.1, 0.1)]:
        with pytest.raises(UserError, match=r"a\.png: box .* lies outside the image"):
            pixel_boxes([box], 100, 50, image="a.png")


# ----------------------------------------------------------------------------- image scores
def test_image_score_is_the_maximum_of_its_tiles() -> None:
    scores = np.array([0.1, 0.9, 0.3, 0.2, 0.05, 0.6])
    ids = np.array([0, 0, 1, 1, 2, 2])
    assert image_scores(scores, ids).tolist() == [0.9, 0.3, 0.6]
    rng = np.random.default_rng(0)
    s, i = rng.random(200), rng.integers(0, 17, 200)
    i[:17] = np.arange(17)
    assert np.array_equal(image_scores(s, i), [s[i == k].max() for k in range(17)])
    t = image_scores(torch.tensor(scores, dtype=torch.float32), torch.tensor(ids))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and torch.allclose(t, torch.tensor([0.9, 0.3, 0.6]))
    with pytest.raises(ValueError, match="1 image.* have no tile score, e.g. image 3"):
        image_scores(scores, ids, num_images=4)
    with pytest.raises(ValueError, match="one length"):
        image_scores(scores, ids[:-1])
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        image_scores(scores, ids, num_images=2)


# ----------------------------------------------------------------------------- a YOLO set on disk
def _yolo_set(root: Path, n: int = 24, size: tuple[int, int] = (64, 48)) -> Path:
    """One train folder (the pipeline splits it): every third image has a gap box, every fifth a
    box of the non-defect class 'mark'; images are ``size`` (width, height)."""
    for i in range(n):
        path = write_image(root / "images" / "train" / f"f{i:02d}.png", seed=i, size=8)
        Image.open(path).resize(size).save(path)
        lines = ""
        if i % 3 == 0:
            lines += f"0 {0.2 + 0.02 * (i % 10):.3f} 0.3 0.15 0.2\n"
        if i % 5 == 0:
            lines += "1 0.7 0.7 0.1 0.1\n"
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train" / f"f{i:02d}.txt").write_text(lines)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [gap, mark]\n")
    return root / "data.yaml"


def test_yolo_reader_keeps_the_defect_boxes(tmp_path: Path) -> None:
    y = _yolo_set(tmp_path, n=6)
    ds = read_yolo(y, ["gap"], "normal")
    assert ds.boxes == {str(tmp_path / "images/train/f00.png"): [(0, 0.2, 0.3, 0.15, 0.2)],
                        str(tmp_path / "images/train/f03.png"): [(0, 0.26, 0.3, 0.15, 0.2)]}
    assert set(read_yolo(y, None, "normal").boxes[str(tmp_path / "images/train/f00.png")]) == \
        {(0, 0.2, 0.3, 0.15, 0.2), (1, 0.7, 0.7, 0.1, 0.1)}
    (tmp_path / "labels/train/f01.txt").write_text("0 0.1 0.1 0.3 0.1 0.3 0.5\n")  # a polygon: its box
    cx, cy, w, h = read_yolo(y, None, "normal").boxes[str(tmp_path / "images/train/f01.png")][0][1:]
    assert (cx, cy, w, h) == pytest.approx((0.2, 0.3, 0.2, 0.4))


def _splits_by_image(images: list[Sample], tiles: list[Sample]) -> None:
    """Every tile lives in its image's split and group; no frame has tiles in two splits."""
    parent = {s.path: s for s in images}
    assert tiles and all(t.image in parent for t in tiles)
    splits: dict[str, set] = defaultdict(set)
    for t in tiles:
        assert t.split == parent[t.image].split and t.group == parent[t.image].group
        splits[t.image].add(t.split)
    assert all(len(v) == 1 for v in splits.values())
    by_split = {sp: {t.image for t in tiles if t.split == sp} for sp in ("train", "val", "test")}
    assert not by_split["train"] & by_split["test"] and not by_split["train"] & by_split["val"]
    assert not by_split["val"] & by_split["test"]


def test_yolo_tiles_follow_their_image_split_and_survive_a_rerun(tmp_path: Path) -> None:
    cfg = DataConfig(source="yolo", path=str(_yolo_set(tmp_path / "ds")), defect_classes=["gap"],
                     split=(0.5, 0.25, 0.25), tiles=TilesConfig(size=24, overlap=0.25))
    data = prepare_data(cfg, tmp_path / "run", seed=0)
    assert len(data.samples) == 24 and len(data.tiles) == 24 * 4 * 3  # columns 0, 18, 36, 40; rows 0, 18, 24
    _splits_by_image(data.samples, data.tiles)
    # The 'mark' boxes are not defects: tiles of images with only marks are normal.
    assert all(t.label == 0 for t in data.tiles if t.image.endswith(("f05.png", "f10.png")))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    tiles = report["tiles"]
    assert sum(c["images"]["defect"] for c in tiles["counts"].values()) == 8
    assert sum(sum(c["tiles"].values()) for c in tiles["counts"].values()) == len(data.tiles)
    assert tiles["excluded"] == sum(t.label == EXCLUDED for t in data.tiles) > 0
    assert report["total"] == 24  # images, not tiles: the duplicate check and class counts are per image
    assert any("tiles" in line and "slivers left out" in line for line in summary_lines(report))
    again = prepare_data(cfg, tmp_path / "run", seed=0)
    assert again.tiles == data.tiles and again.samples == data.samples
    # Parents: each tile's image index within its split, for image scores.
    test_images = data.split("test")
    parents = data.tile_parents("test")
    assert [test_images[p].path for p in parents.tolist()] == [t.image for t in data.tile_split("test")]
    scores = torch.arange(len(parents), dtype=torch.float64)
    assert image_scores(scores, parents).tolist() == [float(max(k for k, p in enumerate(parents.tolist()) if p == i))
                                                      for i in range(len(test_images))]


def test_tile_items_are_the_resized_crops_with_the_augmentation_on_the_crop(tmp_path: Path) -> None:
    y = _yolo_set(tmp_path / "ds", size=(64, 48))
    base = {"source": "yolo", "path": str(y), "defect_classes": ["gap"], "split": (0.5, 0.25, 0.25),
            "tiles": TilesConfig(size=24, overlap=0.25)}
    cached = prepare_data(DataConfig(**base), tmp_path / "a", seed=0)
    plain = prepare_data(DataConfig(**base, cache="none"), tmp_path / "b", seed=0)
    ds, ds_plain = cached.tile_dataset("val", 16), plain.tile_dataset("val", 16)
    assert ds.pixels is not None and ds_plain.pixels is None and len(ds) == len(cached.tile_split("val"))
    for k in (0, 5, len(ds) - 1):
        tile = ds.samples[k]
        crop = open_rgb(tile.image).crop(tile.tile).resize((16, 16), Image.Resampling.BICUBIC, reducing_gap=3.0)
        expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
        assert torch.equal(ds[k][0], expected) and torch.equal(ds_plain[k][0], expected)
        assert ds[k][1] == tile.label
    train = cached.tile_dataset("train", 16, train=True)
    assert EXCLUDED not in train.labels.tolist()
    assert len(train) == len(cached.tile_split("train", include_excluded=False))
    chw = torch.from_numpy(np.array(train._pixels(3, 0, 16))).permute(2, 0, 1)
    assert torch.equal(train[(3, 777)][0], augment(chw, AugmentConfig(), torch.Generator().manual_seed(777)))
    with pytest.raises(ValueError, match="never trained on"):
        cached.tile_dataset("train", 16, train=True, include_excluded=True)
    batch = next(iter(cached.tile_loader("train", 16, batch_size=4, train=True)))
    assert batch[0].shape == (4, 3, 16, 16) and set(batch[1].tolist()) <= {0, 1}


# ----------------------------------------------------------------------------- the synthetic part view
def test_synthetic_part_view_tiles_crop_the_render_that_gave_the_boxes(tmp_path: Path) -> None:
    syn = SyntheticConfig(view="part", image_size=96, num_train=10, num_val=4, num_test=4, defect_ratio=0.5,
                          severity=(0.8, 1.0))
    cfg = DataConfig(source="synthetic", synthetic=syn, tiles=TilesConfig(grid=(3, 3), overlap=0.25))
    data = prepare_data(cfg, tmp_path / "run", seed=2)
    _splits_by_image(data.samples, data.tiles)
    assert len(data.tiles) == 18 * 9
    defect_images = {s.path for s in data.samples if s.label == 1}
    assert {t.image for t in data.tiles if t.label != 0} == defect_images  # every defect is in some tile
    ds = data.tile_dataset("test", 40)
    # Without the tile cache the crops come from the renders kept in RAM: the same pixels.
    uncached = dataclasses.replace(data, cfg=dataclasses.replace(cfg, cache="none"), _tile_pixels={})
    ds_uncached = uncached.tile_dataset("test", 40)
    assert ds.pixels is not None and ds_uncached.pixels is None and ds_uncached.sources is not None
    assert all(torch.equal(ds[k][0], ds_uncached[k][0]) for k in range(0, len(ds), 5))
    for k in range(len(ds)):
        tile, parent = ds.samples[k], data.split("test")[int(ds.parents[k])]
        assert tile.image == parent.path
        if k % 4 == 0:
            render = render_sample(synthetic_seed(2, parent, 0), parent.label, syn).image
            x0, y0, x1, y1 = tile.tile
            crop = Image.fromarray(render[y0:y1, x0:x1]).resize((40, 40), Image.Resampling.BICUBIC, reducing_gap=3.0)
            assert torch.equal(ds[k][0], torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255)


# ----------------------------------------------------------------------------- the manifest
def test_manifest_round_trip_with_tile_rows(tmp_path: Path) -> None:
    rows = [Sample("/d/a b,1.png", 1, "g1", "train", "boxes: gap"),
            Sample("/d/a b,1.png#0,0,32,32", 1, "g1", "train", "tile: 0.80 of a gap box", "/d/a b,1.png",
                   (0, 0, 32, 32)),
            Sample("/d/a b,1.png#16,0,48,32", EXCLUDED, "g1", "train", "tile: sliver", "/d/a b,1.png", (16, 0, 48, 32))]
    write_manifest(rows, tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "path,label,group,split,origin,image,tile"
    assert read_manifest(tmp_path / "m.csv") == rows
    write_manifest(rows[:1], tmp_path / "plain.csv")  # no tiles: today's columns, exactly
    assert (tmp_path / "plain.csv").read_text().splitlines()[0] == "path,label,group,split,origin"
    (tmp_path / "bad.csv").write_text("path,label,group,split,origin,image,tile\na#1,1,g,train,,a,0 0 32\n")
    with pytest.raises(UserError, match=r"bad\.csv:2: tile '0 0 32' must be 'x0 y0 x1 y1'"):
        read_manifest(tmp_path / "bad.csv")


def test_an_old_manifest_without_tile_columns_still_reads(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,label,group,split,origin\n"
                                    "/d/a.png,1,a,train,boxes: gap\n/d/b.png,0,b,test,\n")
    rows = read_manifest(tmp_path / "m.csv")
    assert rows == [Sample("/d/a.png", 1, "a", "train", "boxes: gap"), Sample("/d/b.png", 0, "b", "test", "")]
    assert not any(r.is_tile for r in rows)


def test_adding_tiles_to_a_finished_data_stage_is_refused(tmp_path: Path) -> None:
    syn = SyntheticConfig(image_size=16, num_train=4, num_val=2, num_test=2, defect_ratio=0.5)
    data = prepare_data(DataConfig(synthetic=syn, dedup=False), tmp_path, seed=0)
    assert data.tiles == []
    assert prepare_data(DataConfig(synthetic=syn, dedup=False), tmp_path, seed=0).samples == data.samples  # reused
    with pytest.raises(UserError, match=r"changed: data\.tiles"):
        prepare_data(DataConfig(synthetic=syn, dedup=False, tiles=TilesConfig(size=8)), tmp_path, seed=0)
    with pytest.raises(UserError, match="data.tiles is not set"):
        data.tile_dataset("train", 16)


# ----------------------------------------------------------------------------- bad input
def test_a_tile_larger_than_an_image_names_the_key_and_the_image(tmp_path: Path) -> None:
    cfg = DataConfig(source="yolo", path=str(_yolo_set(tmp_path / "ds", n=12)), split=(0.5, 0.25, 0.25),
                     tiles=TilesConfig(size=56))
    with pytest.raises(UserError, match=r"data\.tiles\.size 56 is larger than .*f\d\d\.png \(64 x 48 px\).*at most 48"
                                        r".*and 11 more image"):
        prepare_data(cfg, tmp_path / "run", seed=0)
    with pytest.raises(UserError, match=r"data\.tiles\.grid \[3, 40\] is finer than a\.png"):
        tile_rects(30, 30, TilesConfig(grid=(3, 40)), image="a.png")


_CLI = " (command-line override) "


@pytest.mark.parametrize("overrides, expected", [
    (["data.tiles.size=64", "data.tiles.overlap=1"], f"'data.tiles.overlap'{_CLI}must be >= 0 and < 1"),
    (["data.tiles.size=64", "data.tiles.overlap=-0.1"], "'data.tiles.overlap'"),
    (["data.tiles.size=64", "data.tiles.grid=[2, 2]"], f"'data.tiles.grid'{_CLI}and data.tiles.size are"),
    (["data.tiles.overlap=0.2"], "(or data.tiles.grid) must be given: a tile side in source pixels"),
    (["data.tiles.grid=[0, 2]"], f"'data.tiles.grid'{_CLI}must be [rows, cols] with both >= 1"),
    (["data.tiles.size=64", "data.tiles.min_box_fraction=0"], "'data.tiles.min_box_fraction'"),
    (["data.tiles.size=64", "data.crop_pct=0.9"], f"'data.crop_pct'{_CLI}must be 1.0 with data.tiles"),
])
def test_tiles_config_errors_name_the_key(tmp_path: Path, overrides: list[str], expected: str) -> None:
    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(UserError) as err:
        load_config(tmp_path / "c.yaml", overrides)
    assert expected in str(err.value)
    cfg = load_config(tmp_path / "c.yaml", ["data.tiles.grid=[2, 3]", "data.tiles.overlap=0.25"])
    assert cfg.data.tiles == TilesConfig(grid=(2, 3), overlap=0.25)


def test_tiles_on_a_folder_source_are_refused_for_training(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "ds" / "defect" / f"d{i}.png", seed=i)
        write_image(tmp_path / "ds" / "normal" / f"n{i}.png", seed=10 + i)
    cfg = DataConfig(source="folder", path=str(tmp_path / "ds"), tiles=TilesConfig(grid=(2, 2)))
    with pytest.raises(UserError, match=r"^data\.tiles: .*'folder' has only a label per image.*data\.source=yolo"):
        prepare_data(cfg, tmp_path / "run", seed=0)
    assert len(tile_rects(40, 40, cfg.tiles)) == 4  # the geometry itself serves inference on any image


def test_boxes_outside_the_image_are_refused_with_tiles(tmp_path: Path) -> None:
    y = _yolo_set(tmp_path / "ds", n=12)
    (tmp_path / "ds" / "labels" / "train" / "f01.txt").write_text("0 0.5 1.3 0.1 0.1\n")
    cfg = DataConfig(source="yolo", path=str(y), split=(0.5, 0.25, 0.25), tiles=TilesConfig(size=24))
    with pytest.raises(UserError, match=r"f01\.txt:1: coordinates must be normalised to \[0, 1\]"):
        prepare_data(cfg, tmp_path / "run", seed=0)
