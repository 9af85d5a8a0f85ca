"""Tiles through the pipeline: tile and image levels, the tiling in the ONNX metadata, predicting a
whole image by its worst tile, and a tiny tiled run through the runner (report.json has both levels)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from core.rundir import RunDir, read_predictions
from data.config import DataConfig, SyntheticConfig, TilesConfig
from data.images import square
from data.prepare import prepare_data
from data.tiles import image_scores, tile_rects, worst_tiles
from data.transforms import ModelView
from deploy.export import export_onnx, read_metadata, read_tiles, update_metadata
from deploy.predict import main as predict_main
from deploy.runtime import defect_probability, onnx_session
from deploy.tiled import tiling_of
from distill.run import main as run_main
from distill.stages import image_level, image_outputs, levels
from profiling.report.thresholds import choose_threshold
from training.engine import EvalOutput
from training.modeling import Classifier, save_artifact

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

TINY = """\
run: {{name: {name}, output_dir: '{out}', seed: 0, device: cpu}}
data:
  source: synthetic
  num_workers: 0
  synthetic: {{view: part, image_size: 64, num_train: 8, num_val: 6, num_test: 6, defect_ratio: 0.5,
               severity: [0.8, 1.0]}}
  tiles: {{grid: [2, 2], overlap: 0.25}}
teacher:
  arch: vit_tiny_patch16_224
  pretrained: false
  img_size: 32
  model_kwargs: {{patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}}
  drop_path: 0.0
  layer_decay: null
  epochs: 1
  batch_size: 8
student: {{arch: mobilenetv3_small_050, pretrained: false, img_size: 32, epochs: 1, batch_size: 8}}
distill: {{teacher_outputs: live, baseline: false}}
prune: {{target: {{macs: 0.6}}, steps: 1, epochs: 1, batch_size: 8}}
export: {{int8: false, models: [student_pruned, student]}}
profile: {{runtimes: [onnx], batch_sizes: [1], runs: 30, warmup: 0, allow_busy: true, peak_memory: false}}
constraints: {{runtime: onnx, batch: 1, min_auroc: 0.0}}
"""


@pytest.fixture(scope="module")
def part(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic part-view data stage with 2x2 tiles."""
    syn = SyntheticConfig(view="part", image_size=64, num_train=6, num_val=6, num_test=6, defect_ratio=0.5,
                          severity=(0.8, 1.0))
    cfg = DataConfig(source="synthetic", synthetic=syn, tiles=TilesConfig(grid=(2, 2), overlap=0.25))
    return prepare_data(cfg, tmp_path_factory.mktemp("part") / "data", seed=1)


def _fake_outputs(data, seed: int) -> dict[str, EvalOutput]:
    """Random logits for every tile of every split, in the order an every-tile loader gives them."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for sp in ("train", "val", "test"):
        tiles = data.unit_samples(sp, every_tile=True)
        labels = torch.tensor([t.label for t in tiles])
        out[sp] = EvalOutput(torch.randn(len(tiles), 2, generator=gen), labels, torch.arange(len(tiles)))
    return out


def test_an_image_scores_its_worst_tile_and_keeps_its_own_label(part) -> None:
    outputs = _fake_outputs(part, seed=0)
    tiles, images = levels(part, outputs)
    for sp, out in outputs.items():
        assert (tiles[sp].labels >= 0).all() and len(tiles[sp].labels) == int((out.labels >= 0).sum())
        parents = part.tile_parents(sp, include_excluded=True)
        expected = image_scores(out.probs.double().numpy(), parents.numpy(), len(part.split(sp)))
        assert np.allclose(images[sp].probs.double().numpy(), expected, rtol=0, atol=1e-7)
        assert torch.equal(images[sp].labels, part.labels(sp))
    # A sliver (label -1) is scored: raising it alone raises its image's score.
    sp = next(s for s in ("train", "val", "test") if (outputs[s].labels < 0).any())
    k = int(torch.nonzero(outputs[sp].labels < 0)[0])
    boosted = EvalOutput(outputs[sp].logits.clone(), outputs[sp].labels, outputs[sp].index)
    boosted.logits[k] = torch.tensor([-20.0, 20.0])
    image = int(part.tile_parents(sp, include_excluded=True)[k])
    assert image_outputs(part, sp, boosted).probs[image] > 0.999


def test_worst_tiles_points_at_the_first_maximum() -> None:
    scores = np.array([0.1, 0.9, 0.9, 0.3, 0.2, 0.05])
    ids = np.array([0, 0, 0, 1, 1, 2])
    assert worst_tiles(scores, ids, 3).tolist() == [1, 3, 5]


def test_the_image_threshold_is_chosen_on_validation_images_only(part) -> None:
    outputs = _fake_outputs(part, seed=3)
    _, images = levels(part, outputs)
    level = image_level(images, "f1")
    assert level["threshold"] == choose_threshold(images["val"].probs, images["val"].labels, "f1").threshold
    # Other test scores change the test metrics, never the threshold.
    shuffled = dict(outputs, test=EvalOutput(-outputs["test"].logits, outputs["test"].labels, outputs["test"].index))
    again = image_level(levels(part, shuffled)[1], "f1")
    assert again["threshold"] == level["threshold"]
    assert set(level["metrics"]) == {"train", "val", "test"}
    assert level["metrics"]["test"]["n"] == len(part.split("test"))


def _tiny_net(size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=2).eval()
    with torch.no_grad():  # spread the outputs, so a wrong tile or a wrong maximum would show
        net.classifier.weight.mul_(50.0)
    return net


def test_the_tiling_travels_in_the_onnx_metadata(tmp_path: Path) -> None:
    tiles = {"grid": [3, 2], "size": None, "overlap": 0.25, "tiles_per_image": 6, "threshold": 0.37}
    path = export_onnx(_tiny_net(32), tmp_path / "m.onnx", 32, metadata={"img_size": 32, "tiles": tiles})
    assert read_tiles(path) == tiles
    assert json.loads(path.with_suffix(".json").read_text())["tiles"] == tiles
    update_metadata(path, {"threshold": 0.5})  # another value changed: the tiling stays
    assert read_tiles(path) == tiles
    tiling = tiling_of(read_metadata(path), path)
    assert tiling is not None and tiling.cfg == TilesConfig(grid=(3, 2), overlap=0.25) and tiling.threshold == 0.37
    whole = export_onnx(_tiny_net(32), tmp_path / "w.onnx", 32, metadata={"img_size": 32})
    assert read_tiles(whole) is None and tiling_of(read_metadata(whole), whole) is None


def test_predict_cuts_a_large_image_and_calls_it_by_its_worst_tile(tmp_path: Path) -> None:
    size, tiling = 64, TilesConfig(grid=(2, 3), overlap=0.25)
    net = _tiny_net(size)
    model = Classifier(net, ModelView(size, MEAN, STD), "mobilenetv3_small_050")
    meta = {"threshold": 0.5, "crop_pct": 1.0, "tiles": {"grid": [2, 3], "size": None, "overlap": 0.25},
            "image": {"threshold": 0.6}}
    save_artifact(tmp_path / "run" / "student", model, meta)
    onnx_path = export_onnx(net, tmp_path / "run" / "export" / "student.onnx", size, metadata={
        "model": "student", **model.describe(), "threshold": 0.5,
        "tiles": {"grid": [2, 3], "size": None, "overlap": 0.25, "threshold": 0.6}})
    rng = np.random.default_rng(0)
    pixels = (Image.fromarray(rng.integers(0, 256, (9, 15, 3), dtype=np.uint8))
              .resize((300, 180), Image.Resampling.BICUBIC))
    pixels.save(tmp_path / "big.png")
    arr = np.asarray(pixels)
    rects = tile_rects(300, 180, tiling)
    batch = np.stack([square(Image.fromarray(arr[y0:y1, x0:x1]), size) for x0, y0, x1, y1 in rects])
    x = ((batch.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)).transpose(0, 3, 1, 2)
    probs = defect_probability(onnx_session(onnx_path).run(None, {"input": np.ascontiguousarray(x)})[0])
    assert probs.max() - probs.min() > 1e-3  # the tiles differ, so taking the maximum matters
    for model_arg in (onnx_path, tmp_path / "run" / "student"):
        out = tmp_path / f"{Path(model_arg).stem}.csv"
        cams = tmp_path / f"cams_{Path(model_arg).stem}"
        assert predict_main([str(model_arg), str(tmp_path / "big.png"), "--out", str(out), "--gradcam", str(cams)]) == 0
        row = next(csv.DictReader(out.open()))
        assert int(row["tiles"]) == 6 and float(row["threshold"]) == 0.6
        assert float(row["prob_defect"]) == pytest.approx(probs.max(), abs=1e-5)
        assert row["worst_tile"] == ",".join(map(str, rects[int(np.argmax(probs))]))
        assert row["decision"] == ("defect" if float(row["prob_defect"]) >= 0.6 else "normal")
        with Image.open(row["gradcam"]) as drawn:
            assert drawn.size == (300, 180)  # the whole image, tile scores over it


def test_a_tiled_run_reports_tiles_and_images(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(name="tiles", out=tmp_path / "runs"))
    assert run_main([str(cfg)]) == 0
    run = RunDir(tmp_path / "runs" / "tiles")
    report = json.loads(run.report_json.read_text())
    for name in ("teacher", "student", "student_pruned"):
        row = report["models"][name]
        assert row["unit"] == "tile" and row["tiles_per_image"] == 4
        for level in (row, row["image"]):
            assert {"threshold", "threshold_rule", "threshold_check", "test", "splits"} <= set(level)
        assert row["image"]["test"]["n"] == 6 and row["image"]["val"]["n"] == 6  # images, not tiles
        assert row["test"]["n"] == sum(t.label >= 0 for t in RunDirTiles(run).test)
        images = read_predictions(run.image_predictions(name))
        tiles = read_predictions(run.predictions(name))
        assert len(images["test"].probs) == 6 and max(images["test"].probs) <= 1
        # An image's score is at least that of each of its labelled tiles.
        by_image = {p: s for p, s in zip(images["test"].paths, images["test"].probs)}
        for path, prob in zip(tiles["test"].paths, tiles["test"].probs):
            assert by_image[path.rsplit("#", 1)[0]] >= prob
        meta = json.loads(run.meta(name).read_text())
        assert meta["image"]["threshold"] == row["image"]["threshold"]
    assert report["constraints"]["checks"][0]["what"].startswith("image-level test")
    latency = report["models"]["student_pruned"]["image"]["latency_ms"]["onnx"]
    assert latency["tiles_per_image"] == 4 and latency["tile"] is not None and latency["image"] is not None
    text = run.report_md.read_text()
    assert "## Whole images (each image's score: its worst tile)" in text
    tiling = read_tiles(run.onnx("student_pruned"))
    assert tiling["grid"] == [2, 2] and tiling["threshold"] == report["models"]["student_pruned"]["image"]["threshold"]


class RunDirTiles:
    """The test tile rows of a run's manifest."""

    def __init__(self, run: RunDir) -> None:
        from data.manifest import read_manifest

        self.test = [r for r in read_manifest(run.manifest) if r.is_tile and r.split == "test"]
