"""Few labels and an unlabeled pool: what no stage may learn from, and what a distilled student may.

The poison test is the proof that no held-back label reaches any loss: the same run with every
held-back training label flipped ends with bit-identical weights in every model. The pool rides
through cached teacher outputs and through an interrupted, resumed run. Bad input is refused with
one message naming the key or the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import distill.run
from conftest import write_image
from core.errors import UserError
from data.config import DataConfig, SyntheticConfig
from data.manifest import UNLABELED, read_manifest
from data.prepare import prepare_data
from distill.run import main

TINY = """\
run: {{name: {name}, output_dir: '{out}', seed: 0, device: cpu}}
data:
  source: folder
  path: '{data}'
  split: [0.6, 0.2, 0.2]
  num_workers: 0
  label_fraction: 0.5
  unlabeled: '{pool}'
teacher:
  arch: vit_tiny_patch16_224
  pretrained: false
  img_size: 32
  model_kwargs: {{patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}}
  drop_path: 0.0
  layer_decay: null
  epochs: 1
  batch_size: 8
student: {{arch: mobilenetv3_small_050, pretrained: false, img_size: 24, epochs: 2, batch_size: 8}}
distill: {{teacher_outputs: {outputs}, baseline: true}}
prune: {{target: {{macs: 0.6}}, steps: 1, epochs: 1, batch_size: 8}}
export: {{int8: false}}
profile: {{runtimes: [onnx], runs: 30, warmup: 0, allow_busy: true, peak_memory: false}}
"""
MODELS = ("teacher", "student", "student_baseline", "student_pruned")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Class folders (20 normal, 20 defect) and a pool folder of 12 other images."""
    root = tmp_path_factory.mktemp("pool_data")
    for i in range(20):
        write_image(root / "ds" / "normal" / f"n{i:02d}.png", seed=i, size=32)
        write_image(root / "ds" / "defect" / f"d{i:02d}.png", seed=100 + i, size=32)
    for i in range(12):
        write_image(root / "pool" / "cam1" / f"p{i:02d}.png", seed=500 + i, size=32)
    (root / "pool" / "notes.txt").write_text("not an image")
    return root / "ds", root / "pool"


def _config(tmp_path: Path, dataset: tuple[Path, Path], name: str, outputs: str = "live") -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(TINY.format(name=name, out=tmp_path / "runs", data=dataset[0], pool=dataset[1], outputs=outputs))
    return cfg


def _weights(run: Path, model: str) -> dict:
    return load_file(str(run / model / "model.safetensors"))


def test_the_data_stage_splits_labeled_held_back_and_pool(tmp_path: Path, dataset: tuple[Path, Path]) -> None:
    cfg = DataConfig(source="folder", path=str(dataset[0]), split=(0.6, 0.2, 0.2), label_fraction=0.5,
                     unlabeled=str(dataset[1]))
    data = prepare_data(cfg, tmp_path / "data", seed=0)
    rows = read_manifest(tmp_path / "data" / "manifest.csv")
    unlabeled = [r for r in rows if r.split == UNLABELED]
    assert len(data.split("train")) == 12 and len(unlabeled) == 12 + 12  # half of 24 held back, and the pool
    assert sum(r.label == -1 for r in unlabeled) == 12  # the pool has no label; held-back rows keep theirs
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["unlabeled"] == {"images": 24, "held_back_from_train": 12, "pool": 12, "label_fraction": 0.5}
    assert report["counts"]["train"] == {"normal": 6, "defect": 6}
    assert "notes.txt" in (tmp_path / "data" / "skipped.csv").read_text()  # listed, not dropped silently


def test_no_held_back_label_reaches_any_loss(tmp_path: Path, dataset: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Flip every held-back label (and label the pool): every model ends bit-identical."""
    real = distill.run.prepare_data

    def poisoned(cfg, out_dir, seed):
        data = real(cfg, out_dir, seed)
        data.samples = [dataclasses.replace(s, label=1 - max(s.label, 0)) if s.split == UNLABELED else s
                        for s in data.samples]
        return data

    assert main([str(_config(tmp_path, dataset, "clean"))]) == 0
    monkeypatch.setattr(distill.run, "prepare_data", poisoned)
    assert main([str(_config(tmp_path, dataset, "poisoned"))]) == 0
    clean, dirty = tmp_path / "runs" / "clean", tmp_path / "runs" / "poisoned"
    for model in MODELS:
        a, b = _weights(clean, model), _weights(dirty, model)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), model
    meta = json.loads((clean / "student" / "meta.json").read_text())
    assert meta["learned_from"] == {"labeled": 12, "unlabeled": 24}
    assert json.loads((clean / "teacher" / "meta.json").read_text())["learned_from"] == {"labeled": 12, "unlabeled": 0}
    assert json.loads((clean / "student_baseline" / "meta.json").read_text())["learned_from"]["unlabeled"] == 0
    report = json.loads((clean / "report.json").read_text())
    assert report["models"]["student"]["learned_from"] == {"labeled": 12, "unlabeled": 24}
    text = (clean / "report.md").read_text()
    assert "12 labeled + 24 unlabeled" in text and "Unlabeled: 24 images, no model learned a label from them" in text


def test_the_pool_through_cached_outputs_and_a_resume(tmp_path: Path, dataset: tuple[Path, Path],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Cached teacher outputs cover every image the student learns from, the pool included; a run
    interrupted after the student's first epoch resumes to the weights of one never interrupted."""
    from distill.teacher_cache import TeacherCache

    assert main([str(_config(tmp_path, dataset, "whole", "cached")), "--stages", "data,teacher,student"]) == 0
    cache, _ = TeacherCache.load(tmp_path / "runs" / "whole" / "student" / "teacher_cache.safetensors")
    assert cache.logits.shape[:2] == (12 + 24, 4)  # labeled + unlabeled, 4 views each

    real = distill.run._say

    def say(text: str) -> None:
        real(text)
        if text.startswith("[student] epoch 1/"):
            raise KeyboardInterrupt

    cfg = _config(tmp_path, dataset, "killed", "cached")
    monkeypatch.setattr(distill.run, "_say", say)
    assert main([str(cfg), "--stages", "data,teacher,student"]) == 130
    monkeypatch.setattr(distill.run, "_say", real)
    assert main([str(cfg), "--stages", "data,teacher,student"]) == 0
    assert "[student] resuming at epoch 2/2" in capsys.readouterr().out
    a, b = _weights(tmp_path / "runs" / "whole", "student"), _weights(tmp_path / "runs" / "killed", "student")
    assert all(a[k].equal(b[k]) for k in a)


# ----------------------------------------------------------------------------- bad input
def test_a_pool_folder_with_no_images_is_refused(tmp_path: Path, dataset: tuple[Path, Path]) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    cfg = DataConfig(source="folder", path=str(dataset[0]), unlabeled=str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"data.unlabeled: the folder '.*empty' holds no images"):
        prepare_data(cfg, tmp_path / "data", seed=0)


def test_a_pool_list_naming_missing_files_is_refused(tmp_path: Path, dataset: tuple[Path, Path]) -> None:
    pool = tmp_path / "pool.txt"
    pool.write_text(f"{dataset[1] / 'cam1' / 'p00.png'}\nnowhere/p99.png\n")
    cfg = DataConfig(source="folder", path=str(dataset[0]), unlabeled=str(pool))
    with pytest.raises(UserError, match=r"1 file\(s\) of the list do not exist:\n  .*pool.txt:2: nowhere/p99.png"):
        prepare_data(cfg, tmp_path / "data", seed=0)


def test_a_pool_image_copying_a_test_image_is_refused(tmp_path: Path, dataset: tuple[Path, Path]) -> None:
    import shutil

    cfg = DataConfig(source="folder", path=str(dataset[0]), split=(0.6, 0.2, 0.2))
    data = prepare_data(cfg, tmp_path / "plain", seed=0)
    test_image = Path(data.split("test")[0].path)
    pool = tmp_path / "pool"
    shutil.copytree(dataset[1], pool)
    shutil.copy(test_image, pool / "copy_of_a_test_image.png")
    with pytest.raises(UserError, match=r"1 unlabeled pool image\(s\) are copies or near-copies of validation or test"):
        prepare_data(dataclasses.replace(cfg, unlabeled=str(pool)), tmp_path / "leaky", seed=0)


def test_a_label_fraction_that_leaves_a_class_unlabeled_is_refused(tmp_path: Path) -> None:
    syn = SyntheticConfig(image_size=16, num_train=40, num_val=10, num_test=10, defect_ratio=0.1)
    with pytest.raises(UserError, match=r"data.label_fraction 0.1 keeps no labeled defect image of the training "
                                        r"split's 4; raise it to at least 0.25"):
        prepare_data(DataConfig(synthetic=syn, label_fraction=0.1, dedup=False), tmp_path, seed=0)


def test_a_synthetic_pool_renders_beads_with_the_class_mix_of_the_data(tmp_path: Path) -> None:
    syn = SyntheticConfig(image_size=16, num_train=10, num_val=4, num_test=4, num_unlabeled=20, defect_ratio=0.25)
    data = prepare_data(DataConfig(synthetic=syn, dedup=False), tmp_path, seed=0)
    pool = data.split(UNLABELED)
    assert len(pool) == 20 and sum(s.label for s in pool) == 5
    items = data.dataset(("train", UNLABELED), 16)
    assert items.labels[:10].ge(0).all() and items.labels[10:].eq(-1).all()
