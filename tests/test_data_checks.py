"""Image checks, splits, near-duplicates and the data stage on real files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from data.config import DataConfig
from data.dedup import cross_split_duplicates, hamming_matrix
from core.errors import UserError
from data.images import BadImage, open_rgb, phash_bits, square, thumbnail
from data.manifest import Sample, read_manifest
from data.prepare import LeakageWarning, prepare_data
from data.split import check_splits, complete_splits, split_samples, with_groups


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_modes_load_as_rgb(tmp_path: Path, mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    p = write_image(tmp_path / f"x.{fmt.lower()}", mode=mode, fmt=fmt)
    img = open_rgb(p)
    assert img.mode == "RGB" and img.size == (40, 40)


def test_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    assert abs(int(np.asarray(open_rgb(tmp_path / "g.png"))[0, 0, 0]) - 128) <= 1


def test_bad_files_raise_bad_image(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = write_image(tmp_path / "good.jpg", fmt="JPEG", size=64)
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(BadImage, match="empty file"):
        open_rgb(tmp_path / "zero.png")
    with pytest.raises(BadImage, match="not an image"):
        open_rgb(tmp_path / "text.jpg")
    with pytest.raises(BadImage, match="truncated"):
        open_rgb(tmp_path / "trunc.jpg")


def test_square_keeps_whole_image_by_default() -> None:
    img = Image.new("RGB", (80, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 40))  # a white stripe at the left border
    assert square(img, 32).shape == (32, 32, 3)
    assert square(img, 32)[:, 0].mean() > 100  # squashed, not cropped: the border survives
    assert square(img, 32, crop_pct=0.8)[:, 0].mean() < 20  # a deliberate crop removes it


# ----------------------------------------------------------------------------- splits
def _samples(n_normal: int, n_defect: int, prefix: str = "img") -> list[Sample]:
    return [Sample(f"/d/{prefix}{i:03d}.png", int(i >= n_normal), f"{prefix}{i:03d}") for i in range(n_normal + n_defect)]


def test_stratified_split_counts_and_reproducible() -> None:
    samples = _samples(80, 20)
    out = split_samples(samples, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
    counts = Counter((s.split, s.label) for s in out)
    assert counts[("train", 0)] == 56 and counts[("train", 1)] == 14
    assert counts[("val", 0)] == 12 and counts[("val", 1)] == 3
    assert counts[("test", 0)] == 12 and counts[("test", 1)] == 3
    again = split_samples(samples, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
    other = split_samples(samples, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=2)
    assert [s.split for s in out] == [s.split for s in again]
    assert [s.split for s in out] != [s.split for s in other]


def test_grouped_split_keeps_groups_whole() -> None:
    # 30 capture sessions of 4 near-identical frames each: 'sessNN_frameK.png'.
    samples = [Sample(f"/d/sess{g:02d}_frame{k}.png", int(g % 5 == 0), "") for g in range(30) for k in range(4)]
    grouped, unmatched = with_groups(samples, r"^(sess\d+)_")
    assert unmatched == 0
    out = split_samples(grouped, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    splits_of = {}
    for s in out:
        splits_of.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in splits_of.values())
    counts = check_splits(out)
    assert all(c["defect"] >= 1 and c["normal"] >= 1 for c in counts.values())


def test_complete_splits_carves_test_from_train() -> None:
    samples = [s.with_split("train") for s in _samples(70, 30)] + [s.with_split("val") for s in _samples(8, 2, "v")]
    out, note = complete_splits(samples, (0.7, 0.15, 0.15), seed=0)
    counts = Counter(s.split for s in out)
    assert counts["val"] == 10 and counts["test"] > 0 and counts["train"] + counts["test"] == 100
    assert "no test split" in note


def test_split_with_one_class_names_it() -> None:
    samples = [s.with_split(sp) for sp in ("train", "val") for s in _samples(5, 5, sp)]
    samples += [s.with_split("test") for s in _samples(5, 0, "t")]
    with pytest.raises(UserError, match=r"'test' split has only one class \(normal: 5, defect: 0\)"):
        check_splits(samples)


# ----------------------------------------------------------------------------- duplicates
def test_hamming_matrix_counts_bits() -> None:
    a = np.array([0, 0b1011], dtype=np.uint64)
    b = np.array([0, (1 << 63) | 1], dtype=np.uint64)
    assert hamming_matrix(a, b).tolist() == [[0, 2], [3, 3]]


def test_planted_duplicates_are_found(tmp_path: Path) -> None:
    imgs = [write_image(tmp_path / f"{i}.png", seed=i, size=64) for i in range(12)]
    # A near-duplicate of image 0 (slightly brighter, recompressed) goes to test.
    arr = np.clip(np.asarray(Image.open(imgs[0]), dtype=np.int16) + 6, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "dup.jpg", quality=90)
    samples = [Sample(str(p), i % 2, str(i), ("train", "val", "test")[i % 3]) for i, p in enumerate(imgs)]
    samples.append(Sample(str(tmp_path / "dup.jpg"), 0, "dup", "test"))
    images = [open_rgb(s.path) for s in samples]
    hashes, thumbs = [phash_bits(i) for i in images], [thumbnail(i) for i in images]
    report = cross_split_duplicates(samples, hashes, thumbs, max_distance=8, max_pixel_diff=0.05)
    assert report["pairs"] == 1 and report["pairs_by_split"]["train-test"] == 1  # distinct images: ~30 bits apart
    assert report["test_images_with_duplicate_elsewhere"] == 1
    assert {report["examples"][0]["a"], report["examples"][0]["b"]} == {str(imgs[0]), str(tmp_path / "dup.jpg")}


def test_same_layout_in_another_colour_is_not_a_duplicate(tmp_path: Path) -> None:
    # Two beads with the same curve on the same kind of part, one grey and one brown: pHash (grey
    # layout only) pairs them; the colour thumbnails tell them apart.
    base = np.asarray(Image.open(write_image(tmp_path / "a.png", seed=3, size=64)), dtype=np.float32)
    recoloured = np.clip(base[..., ::-1] * [1.0, 0.6, 0.3], 0, 255).astype(np.uint8)
    grey = np.repeat(base.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    samples = [Sample("grey", 0, "g", "train"), Sample("brown", 0, "b", "test")]
    images = [grey, recoloured]
    hashes = [phash_bits(i) for i in images]
    report = cross_split_duplicates(samples, hashes, [thumbnail(i) for i in images], max_distance=64,
                                    max_pixel_diff=0.05)
    assert report["pairs"] == 0 and report["phash_candidates_rejected"] == 1


# ----------------------------------------------------------------------------- the stage
def _folder_dataset(root: Path, n_normal: int = 24, n_defect: int = 12) -> None:
    for i in range(n_normal):
        write_image(root / "normal" / f"n{i:02d}.png", seed=i)
    for i in range(n_defect):
        write_image(root / "defect" / f"d{i:02d}.png", seed=100 + i)


def test_prepare_folder_writes_reports_and_reuses_manifest(tmp_path: Path) -> None:
    _folder_dataset(tmp_path / "ds")
    cfg = DataConfig(source="folder", path=str(tmp_path / "ds"), split=(0.5, 0.25, 0.25))
    data = prepare_data(cfg, tmp_path / "run" / "data", seed=0)
    out = tmp_path / "run" / "data"
    assert {p.name for p in out.iterdir()} == {"manifest.csv", "report.json", "duplicates.json", "skipped.csv",
                                               "stage.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["train"] == {"normal": 12, "defect": 6}
    assert report["duplicates"]["pairs"] == 0
    manifest = read_manifest(out / "manifest.csv")
    assert len(manifest) == 36 and {s.split for s in manifest} == {"train", "val", "test"}
    # Rerun: the manifest is reused (not rewritten), nothing reshuffles.
    stamp = (out / "manifest.csv").stat().st_mtime_ns
    again = prepare_data(cfg, out, seed=0)
    assert [s.split for s in again.samples] == [s.split for s in data.samples]
    assert (out / "manifest.csv").stat().st_mtime_ns == stamp
    # A changed data config (or seed) must not silently reuse the old splits.
    with pytest.raises(UserError, match=r"different config \(changed: data.split, seed\).*--force data"):
        prepare_data(DataConfig(source="folder", path=str(tmp_path / "ds"), split=(0.6, 0.2, 0.2)), out, seed=1)
    batch = next(iter(data.loader("train", 32, batch_size=4, train=True)))
    assert batch[0].shape == (4, 3, 32, 32) and 0.0 <= float(batch[0].min()) and float(batch[0].max()) <= 1.0


def test_prepare_lists_all_corrupt_files_then_skips(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _folder_dataset(root)
    (root / "normal" / "zero.png").write_bytes(b"")
    (root / "defect" / "fake.jpg").write_text("hello")
    good = (root / "normal" / "n00.png").read_bytes()
    (root / "normal" / "half.png").write_bytes(good[: len(good) // 2])
    cfg = DataConfig(source="folder", path=str(root), split=(0.5, 0.25, 0.25))
    with pytest.raises(UserError) as err:
        prepare_data(cfg, tmp_path / "r1", seed=0)
    text = str(err.value)
    assert "3 unreadable image(s)" in text and "zero.png" in text and "fake.jpg" in text and "half.png" in text
    assert "data.on_corrupt=skip" in text
    assert not (tmp_path / "r1" / "manifest.csv").exists()
    cfg = DataConfig(source="folder", path=str(root), split=(0.5, 0.25, 0.25), on_corrupt="skip")
    data = prepare_data(cfg, tmp_path / "r2", seed=0)
    skipped = (tmp_path / "r2" / "skipped.csv").read_text()
    assert all(name in skipped for name in ("zero.png", "fake.jpg", "half.png"))
    assert len(data.samples) == 36


def test_prepare_warns_about_planted_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _folder_dataset(root)
    # Every image copied under a new name: a copy must land in another split for some of them.
    for p in list(root.rglob("*.png")):
        p.with_name(p.stem + "_copy.png").write_bytes(p.read_bytes())
    cfg = DataConfig(source="folder", path=str(root), split=(0.5, 0.25, 0.25))
    with pytest.warns(LeakageWarning, match="near-duplicate image pair"):
        data = prepare_data(cfg, tmp_path / "run", seed=0)
    dup = json.loads((tmp_path / "run" / "duplicates.json").read_text())
    assert dup["pairs"] > 0 and dup["examples"][0]["distance"] == 0
    # Grouping by the name stem before '_copy' keeps each pair in one split: no leakage left.
    cfg = DataConfig(source="folder", path=str(root), split=(0.5, 0.25, 0.25), group_by=r"^([nd]\d+)")
    data = prepare_data(cfg, tmp_path / "run2", seed=0)
    assert data.report["duplicates"]["pairs"] == 0


def test_unicode_and_spaces_in_paths(tmp_path: Path) -> None:
    root = tmp_path / "données de test" / "ligne 1"
    _folder_dataset(root, 8, 8)
    data = prepare_data(DataConfig(source="folder", path=str(root), split=(0.5, 0.25, 0.25)), tmp_path / "run", 0)
    batch = next(iter(data.loader("val", 16, batch_size=2)))
    assert batch[0].shape == (2, 3, 16, 16)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        prepare_data(DataConfig(source="folder", path=str(tmp_path / "nope")), tmp_path / "run", 0)
