#!/usr/bin/env bash
# GPU check: the vit_to_mbv3 recipe end to end on a CUDA GPU, then latency per runtime with the GPU's,
# appended to benchmarks/RESULTS.md under the GPU's name.
#
#   bash benchmarks/gpu_check.sh [extra a.b=c overrides]
#
# 1. prints nvidia-smi and the device torch sees (stops if torch sees no CUDA GPU);
# 2. runs configs/vit_to_mbv3.yaml on synthetic images at 224 px (rendered once, fresh=false: rendering new ones
#    every epoch would make the CPU the bottleneck), 2 epochs per model, weights from scratch
#    (pretrained=false: the GPU machine may have no internet), stages data..export, mixed precision on
#    (training/engine.py: precision_for picks bf16 where the GPU has it natively, else fp16 with a grad
#    scaler, as on a T4; step 4 says which it was);
#    meant to take under 8 minutes on a T4 or an H100;
# 3. runs the report stage, which measures params, MACs and latency of every model on
#    profile.runtimes = eager, onnx, onnx_int8 (CPU) and cuda_fp16, cuda_bf16 (GPU, autocast) at batch 1 and 32;
# 4. appends a table of those figures, the step times and the GPU's name to benchmarks/RESULTS.md.
#
# The quality figures of this run mean nothing (random init, 2 epochs, synthetic data): it checks that the
# recipe runs on a GPU and what the GPU's latency is, nothing else.
#
# Environment: PYTHON (default: python), GPU_CHECK_NAME (run name, default gpu_check; the run lives in
# benchmarks/out/<name>/ and is redone from scratch), GPU_CHECK_ALLOW_CPU=1 (a dry run of this script on a
# machine without a GPU: add run.device=cpu and small sizes as overrides; its table goes to
# benchmarks/out/RESULTS-quick.md, not RESULTS.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
NAME=${GPU_CHECK_NAME:-gpu_check}
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
OUT_DIR=benchmarks/out
RUN_DIR=$OUT_DIR/$NAME
LOG=$OUT_DIR/$NAME.log
mkdir -p "$OUT_DIR"
: >"$LOG"
t0=$(date +%s)

echo "== 1/4 the GPU" | tee -a "$LOG"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee -a "$LOG"
else
    echo "nvidia-smi: not found" | tee -a "$LOG"
fi
ALLOW_CPU=$ALLOW_CPU "$PYTHON" - <<'PY' 2>&1 | tee -a "$LOG"
import os
import sys

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device 0: {torch.cuda.get_device_name(0)}, compute capability {torch.cuda.get_device_capability(0)}, "
          f"native bf16: {torch.cuda.is_bf16_supported(including_emulation=False)}")
elif os.environ.get("ALLOW_CPU") != "1":
    sys.exit("torch sees no CUDA GPU; this check needs one (GPU_CHECK_ALLOW_CPU=1 for a dry run without)")
PY
t1=$(date +%s)

# Every key here is checked by `python -m distill.run configs/vit_to_mbv3.yaml <these> --stages data`.
overrides=(
    data.source=synthetic
    data.synthetic.image_size=224
    data.synthetic.num_train=1200
    data.synthetic.num_val=300
    data.synthetic.num_test=400
    data.synthetic.fresh=false
    teacher.pretrained=false
    student.pretrained=false
    teacher.epochs=2
    student.epochs=2
    prune.finetune_epochs=1
    prune.epochs=1
    teacher.amp=true
    student.amp=true
    prune.amp=true
    "profile.runtimes=[eager,onnx,onnx_int8,cuda_fp16,cuda_bf16]"
    "profile.batch_sizes=[1,32]"
    profile.peak_memory=false
    run.device=cuda
    run.name="$NAME"
    run.output_dir="$OUT_DIR"
)

echo "== 2/4 train: data, teacher, student (+ baseline), prune, export" | tee -a "$LOG"
# --force data: the run is redone from scratch (a finished stage would otherwise be skipped).
"$PYTHON" -m distill.run configs/vit_to_mbv3.yaml "${overrides[@]}" "$@" \
    --stages data,teacher,student,prune,export --force data 2>&1 | tee -a "$LOG"
t2=$(date +%s)

echo "== 3/4 report: params, MACs, latency per runtime (CPU and GPU)" | tee -a "$LOG"
"$PYTHON" -m distill.run configs/vit_to_mbv3.yaml "${overrides[@]}" "$@" --stages report 2>&1 | tee -a "$LOG"
t3=$(date +%s)

echo "== 4/4 append the results" | tee -a "$LOG"
"$PYTHON" - "$RUN_DIR" "$((t1 - t0))" "$((t2 - t1))" "$((t3 - t2))" "$*" <<'PY' 2>&1 | tee -a "$LOG"
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from benchmarks.common import QUICK_RESULTS, RESULTS, machine_line, md_table

run_dir = Path(sys.argv[1])
gpu_s, train_s, report_s = (int(a) for a in sys.argv[2:5])
extra = sys.argv[5]
profile = json.loads((run_dir / "profile.json").read_text())
cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
report = json.loads((run_dir / "report.json").read_text())
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
if gpu is None:
    amp = "off (no GPU)"
elif torch.cuda.is_bf16_supported(including_emulation=False):  # the test training/engine.py: precision_for makes
    amp = "bf16 autocast"
else:
    amp = "fp16 autocast + grad scaler"


def num(x):
    return "—" if x is None else f"{x:.3g}" if x < 100 else f"{x:.0f}"


rows = []
for name, model in profile["models"].items():
    for key, s in model["latency"].items():
        if (s.get("skipped") or "").startswith(("no fp32 ONNX file", "no int8 ONNX file")):
            continue  # this model has no such file (only the deployed student is quantised): nothing to say
        if s.get("median_ms") is None:
            figures = [f"not measured: {s.get('skipped')}", "—", "—"]
        else:
            figures = [num(s["median_ms"]), num(s["p90_ms"]), f"{s['images_per_s']:.1f}"]
        rows.append([name, f"{model['params'] / 1e6:.2f}", f"{model['macs'] / 1e6:.1f}", s["runtime"], s["batch"],
                     s["device"], s["threads"], *figures])
table = md_table(["model", "params (M)", "MACs (M)", "runtime", "batch", "device", "threads", "median ms", "p90 ms",
                  "images/s"], rows)
quality = md_table(
    ["model", "test AUROC", "test recall", "test F1"],
    [[name, *(f"{(m.get('test') or {}).get(k, float('nan')):.3f}" for k in ("auroc", "recall", "f1"))]
     for name, m in report["models"].items()])
settings = profile["settings"]
synth = cfg["data"]["synthetic"]
title = f"GPU check: the vit_to_mbv3 recipe on {gpu or 'no GPU (dry run of the script)'}"
section = "\n".join([
    f"## {title}",
    "",
    f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
    f"- command: `{' '.join(['bash benchmarks/gpu_check.sh', extra]).strip()}`",
    f"- machine: {machine_line()}",
    f"- step times: GPU check {gpu_s} s, training (data, teacher, student, baseline, prune, export) {train_s} s, "
    f"report (profiling) {report_s} s; total {gpu_s + train_s + report_s} s",
    f"- training: {cfg['data']['source']} images ({synth['num_train']}/{synth['num_val']}/{synth['num_test']} "
    f"train/val/test at {synth['image_size']} px), teacher `{cfg['teacher']['arch']}` at {cfg['teacher']['img_size']} "
    f"px, student `{cfg['student']['arch']}` at {cfg['student']['img_size']} px, pruned to {cfg['prune']['target']}; "
    f"epochs: teacher {cfg['teacher']['epochs']}, student {cfg['student']['epochs']}, prune "
    f"{cfg['prune']['finetune_epochs']} per early round + {cfg['prune']['epochs']} after the last; weights from "
    f"scratch (pretrained=false); mixed precision: {amp}. The quality figures below only show that the recipe ran "
    "(random init, a few epochs): not a result",
    f"- latency: {settings['runs']} timed runs after {settings['warmup']} warm-up calls, batch "
    f"{settings['batch_sizes']}, {settings['threads']} CPU thread(s); cuda_* = the PyTorch model on the GPU under "
    "autocast (CUDA events); MACs per image, BatchNorm folded away",
    f"- run directory: `{run_dir}` (report.md, report.json, profile.json); verdict: {report.get('verdict')}",
    "",
    table,
    "",
    quality,
    "",
])
path = RESULTS if gpu else QUICK_RESULTS
path.parent.mkdir(parents=True, exist_ok=True)
with path.open("a", encoding="utf-8") as fh:
    fh.write("\n" + section)
print(section)
print(f"appended to {path}")
PY
echo "gpu_check: done in $(($(date +%s) - t0)) s; log in $LOG"
