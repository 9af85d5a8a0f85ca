"""torchrun: two CPU processes (gloo) run every training stage and agree with a single process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """
run: {{name: {name}, output_dir: {out}, seed: 0}}
data:
  source: synthetic
  synthetic: {{image_size: 32, num_train: 96, num_val: 48, num_test: 48, severity: [0.8, 1.0], defect_ratio: 0.3}}
teacher:
  arch: vit_tiny_patch16_224
  pretrained: false
  img_size: 32
  model_kwargs: {{patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}}
  drop_path: 0.0
  layer_decay: null
  epochs: 1
  batch_size: 16
# GroupNorm instead of BatchNorm: no per-process statistics, so the student can be held to the
# same bound as the teacher (CPU processes cannot share BatchNorm statistics: SyncBatchNorm needs a GPU).
student: {{arch: resnet10t, pretrained: false, img_size: 32, epochs: 1, batch_size: 16,
          model_kwargs: {{norm_layer: groupnorm1}}}}
prune: {{target: {{macs: 0.6}}, steps: 1, epochs: 1, batch_size: 16}}
export: {{int8: false}}
"""
STAGES = "data,teacher,student,prune,export"


def _probs(run: Path, model: str) -> list[float]:
    with (run / model / "predictions.csv").open() as fh:
        return [float(r["prob_defect"]) for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("single", [sys.executable, "-m", "distill.run"]),
                           ("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2", "-m", "distill.run"])):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(CONFIG.format(name=name, out=tmp_path / "runs"))
        res = subprocess.run([*launcher, str(cfg), "--stages", STAGES], capture_output=True, text=True, timeout=600,
                             env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs[name] = tmp_path / "runs" / name
    single, ddp = runs["single"], runs["ddp"]
    # No model here has BatchNorm: two half-batches with averaged gradients are the full batch, so
    # every model of the two runs agrees to float rounding. A shard that repeated or dropped images,
    # or gradients left unaveraged, would move the probabilities far more than this.
    for model in ("teacher", "student", "student_pruned"):
        p1, p2 = _probs(single, model), _probs(ddp, model)
        assert len(p1) == len(p2) == 192
        assert max(abs(a - b) for a, b in zip(p1, p2)) < 1e-4, model
    # Rank 0 alone wrote one complete run: every stage finished, the export verified.
    for model in ("teacher", "student", "student_pruned"):
        meta = json.loads((ddp / model / "meta.json").read_text())
        assert meta["metrics"]["test"]["n"] == 48
    pruned = json.loads((ddp / "student_pruned" / "meta.json").read_text())["cost"]
    assert pruned["macs"] <= 0.6 * pruned["macs_unpruned"]
    assert json.loads((ddp / "export" / "verify.json").read_text())["models"]["student_pruned"]["agreement"] == 1.0
