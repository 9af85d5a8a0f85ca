"""The synthetic sealant-bead renderer and its dataset writer (``data/synth.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from data.config import DEFECT_TYPES, SyntheticConfig
from data.synth import render, render_sample
from data.synth.__main__ import main
from data.synth.writer import write_dataset, write_grid
from data.yolo import parse_label_file, read_yolo

SEEDS = (0, 1, 2)


def _box_mask(boxes: list[tuple[int, float, float, float, float]], size: int, margin: int = 0) -> np.ndarray:
    """Pixels covered by the boxes, grown by ``margin`` pixels (blur spreads an edge that far)."""
    mask = np.zeros((size, size), dtype=bool)
    for _, cx, cy, w, h in boxes:
        x0, x1 = int((cx - w / 2) * size) - margin, int(np.ceil((cx + w / 2) * size)) + margin
        y0, y1 = int((cy - h / 2) * size) - margin, int(np.ceil((cy + h / 2) * size)) + margin
        mask[max(y0, 0):y1, max(x0, 0):x1] = True
    return mask


def _changed(seed: int, defect: str, size: int = 96, view: str = "segment", severity: float = 1.0):
    """The defect image and where it differs from the same seed rendered without the defect."""
    normal = render(seed, size=size, view=view).image.astype(int)
    bead = render(seed, size=size, view=view, defect=defect, severity=severity)
    return bead, np.abs(bead.image.astype(int) - normal).max(axis=-1)


# ----------------------------------------------------------------------------- render
@pytest.mark.parametrize("view", ["segment", "part"])
@pytest.mark.parametrize("size", [32, 96])
def test_image_shape_and_type(view: str, size: int) -> None:
    for defect in (None, "gap"):
        image = render(3, size=size, view=view, defect=defect).image
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert image.std() > 5  # a scene, not a blank frame


@pytest.mark.parametrize("view", ["segment", "part"])
def test_same_seed_same_bytes_other_seed_differs(view: str) -> None:
    for defect in (None, "bubble", "overlap"):
        a, b = (render(2**62 - 1, view=view, defect=defect, severity=0.7) for _ in range(2))
        assert a.image.tobytes() == b.image.tobytes() and a.boxes == b.boxes
    assert render(0, view=view).image.tobytes() != render(1, view=view).image.tobytes()


@pytest.mark.parametrize("view", ["segment", "part"])
def test_many_seeds_render_and_every_defect_is_boxed(view: str) -> None:
    for seed in range(150):
        defect = (None, *DEFECT_TYPES)[seed % 8]
        bead = render(seed, size=32, view=view, defect=defect, severity=(seed % 11) / 10)
        assert bool(bead.boxes) == (defect is not None)


def test_normal_bead_has_no_boxes_and_no_severity() -> None:
    bead = render(5, defect=None, severity=0.9)
    assert bead.defect is None and bead.severity == 0.0 and bead.boxes == []


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_changes_the_image_only_inside_its_boxes(defect: str) -> None:
    fills = []
    for seed in SEEDS:
        bead, diff = _changed(seed, defect)
        assert bead.defect == defect and bead.severity == 1.0 and bead.boxes
        for cls, cx, cy, w, h in bead.boxes:
            assert cls == DEFECT_TYPES.index(defect)
            assert -1e-9 <= cx - w / 2 < cx + w / 2 <= 1 + 1e-9 and -1e-9 <= cy - h / 2 < cy + h / 2 <= 1 + 1e-9
        changed = diff > 20
        assert changed.sum() > 30, "the defect must be visible"
        # Every visible change lies in a box (grown by the 2 px the blur and shading reach) ...
        assert (changed & _box_mask(bead.boxes, 96, margin=2)).sum() >= 0.98 * changed.sum()
        # ... and the boxes are not much larger than the change.
        inside = _box_mask(bead.boxes, 96)
        fills.append((changed & inside).sum() / inside.sum())
    assert min(fills) > 0.05 and np.mean(fills) > 0.15, fills


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_is_marked_in_the_part_view(defect: str) -> None:
    for seed in SEEDS:
        bead, diff = _changed(seed, defect, view="part")
        assert bead.boxes and diff[_box_mask(bead.boxes, 96)].max() > 10
        assert (diff > 20).sum() <= (diff[_box_mask(bead.boxes, 96, margin=2)] > 20).sum()


@pytest.mark.parametrize("size, seeds", [(256, (0, 1)), (512, (9,))])
def test_part_view_at_tiling_sizes_boxes_small_defects_tightly(size: int, seeds: tuple[int, ...]) -> None:
    """The whole-part frames that tiles are cut from: each defect is about 1% of the frame, and
    every change lies within its box grown by the blur (up to 0.7 * size / 96 px). At 512 px the
    overlap strand's tip once reached 10 px past its box (seed 9)."""
    areas = []
    for seed in seeds:
        for defect in DEFECT_TYPES:
            bead, diff = _changed(seed, defect, size=size, view="part")
            areas += [w * h for *_, w, h in bead.boxes]
            changed = diff > 8
            margin = 4 if size == 256 else 7  # offset's shading fades over 6 px at 512 px
            assert not (changed & ~_box_mask(bead.boxes, size, margin=margin)).any(), defect
    assert 0.003 < float(np.median(areas)) < 0.03 and max(areas) < 0.05


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_severity_makes_the_defect_larger(defect: str) -> None:
    subtle = sum((_changed(s, defect, severity=0.1)[1] > 20).sum() for s in SEEDS)
    obvious = sum((_changed(s, defect, severity=1.0)[1] > 20).sum() for s in SEEDS)
    assert obvious > 1.5 * subtle > 0


def test_segment_defect_covers_several_patches() -> None:
    """At severity >= 0.5 the quickstart's defects span several 8 px patches at 64 px."""
    areas = [w * h for seed in range(20) for defect in DEFECT_TYPES
             for _, _, _, w, h in render(seed, size=64, defect=defect, severity=0.5).boxes]
    assert 0.05 < float(np.median(areas)) < 0.3 and min(areas) * 64 * 64 > 2 * 64


def test_bad_render_arguments() -> None:
    with pytest.raises(ValueError, match="view"):
        render(0, view="top")
    with pytest.raises(ValueError, match="defect"):
        render(0, defect="crack")
    with pytest.raises(ValueError, match="size"):
        render(0, size=8)


# ----------------------------------------------------------------------------- render_sample
def test_render_sample_draws_type_and_severity_from_the_seed() -> None:
    cfg = SyntheticConfig(image_size=48, severity=(0.6, 0.8), defect_types=("gap", "spill"))
    normal = render_sample(11, 0, cfg)
    assert normal.defect is None and normal.image.shape == (48, 48, 3)
    beads = [render_sample(seed, 1, cfg) for seed in range(12)]
    assert {b.defect for b in beads} == {"gap", "spill"}
    assert all(0.6 <= b.severity <= 0.8 and b.boxes for b in beads)
    again = render_sample(4, 1, cfg)
    assert again.image.tobytes() == beads[4].image.tobytes() and again.severity == beads[4].severity
    with pytest.raises(ValueError, match="label"):
        render_sample(0, 2, cfg)


# ----------------------------------------------------------------------------- the command line
def test_cli_writes_a_yolo_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "beads"
    assert main([str(out), "--num-images", "20", "--format", "yolo", "--size", "40", "--defect-ratio", "0.25"]) == 0
    assert "5 defect, 15 normal" in capsys.readouterr().out
    doc = yaml.safe_load((out / "data.yaml").read_text())
    assert doc["names"] == list(DEFECT_TYPES) and doc["nc"] == 7 and doc["path"] == "."
    defects = 0
    for split in ("train", "val", "test"):
        for image in (out / "images" / split).glob("*.png"):
            label = out / "labels" / split / f"{image.stem}.txt"
            classes, problems = parse_label_file(label, nc=7)
            assert problems == [] and Image.open(image).size == (40, 40)
            defects += bool(classes)
    assert defects == 5
    ds = read_yolo(out, None, "error")  # the project's own reader takes it as it is
    assert len(ds.samples) == 20 and sum(s.label for s in ds.samples) == 5
    assert sorted({s.split for s in ds.samples}) == ["test", "train", "val"]


def test_cli_writes_class_folders_with_stratified_splits(tmp_path: Path) -> None:
    counts = write_dataset(tmp_path / "f", 40, "folder", size=32, defect_ratio=0.3, split=(0.5, 0.25, 0.25), ext="jpg")
    assert counts == {"train": {"normal": 14, "defect": 6}, "val": {"normal": 7, "defect": 3},
                      "test": {"normal": 7, "defect": 3}}
    for split, by_class in counts.items():
        for cls, n in by_class.items():
            assert len(list((tmp_path / "f" / split / cls).glob("*.jpg"))) == n


def test_same_seed_same_dataset(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_dataset(tmp_path / name, 6, "folder", size=24, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


@pytest.mark.parametrize("args, message", [
    (["--num-images", "1", "--format", "yolo"], "--num-images must be >= 2"),
    (["--num-images", "10", "--format", "folder", "--severity", "0.5", "1.5"], "--severity"),
    (["--num-images", "10", "--format", "folder", "--split", "0.5", "0.2", "0.2"], "--split"),
    (["--num-images", "10", "--format", "folder", "--size", "8"], "--size"),
    (["--num-images", "10"], "--format"),
    (["--num-images", "10", "--format", "yolo", "--seed", "-1"], "--seed"),
    (["--num-images", "10", "--format", "yolo", "--defect-ratio", "1.5"], "--defect-ratio"),
])
def test_cli_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                  message: str) -> None:
    assert main([str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main([str(tmp_path), "--num-images", "4", "--format", "folder", "--size", "24"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(tmp_path), "--num-images", "4", "--format", "folder", "--size", "24", "--overwrite"]) == 0
    assert (tmp_path / "keep.txt").read_text() == "mine"  # only the dataset's own entries are replaced


def test_cli_unknown_format_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "out"), "--num-images", "4", "--format", "coco"])
    assert stop.value.code == 2 and "invalid choice: 'coco'" in capsys.readouterr().err


def test_grid(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"
    write_grid(path, views=("segment",), size=48)
    with Image.open(path) as grid:
        assert grid.width > 3 * grid.height  # one view: two rows of eight tiles (both views: four)
    assert path.stat().st_size < 300_000
