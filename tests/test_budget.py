"""``python -m profiling.budget``: which student x size x pruning fits a latency budget (fake timer)."""

from __future__ import annotations

import json

import pytest
import torch

from profiling.budget import main
from student.prune import cost

STUDENT = "mobilenetv3_small_050"


def fake_ms(net: torch.nn.Module, img_size: int) -> float:
    """1 ms per 100 k MACs: deterministic, and monotone in the model's size."""
    return cost(net, torch.zeros(1, 3, img_size, img_size))[0] / 1e5


def test_lists_what_meets_the_budget_biggest_first_then_near_misses(tmp_path, capsys) -> None:
    out = tmp_path / "budget.json"
    # At 1 ms per 100 k MACs: 32 px unpruned ~8.9 ms, 48 px unpruned ~20 ms; pruned at 0.5 about a third.
    code = main(["--latency-ms", "9", "--students", STUDENT, "--img-size", "32", "48", "--ratios", "0", "0.5",
                 "--threads", "1", "--near", "1.5", "--json", str(out)], timer=fake_ms)
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert len(rows) == 4 and {(r["img_size"], r["ratio"]) for r in rows} == {(32, 0), (32, 0.5), (48, 0), (48, 0.5)}
    assert all(r["ms"] == r["macs"] / 1e5 for r in rows)
    meets = data["meets"]
    assert meets and all(r["ms"] <= 9 for r in meets) and len(meets) == sum(r["ms"] <= 9 for r in rows)
    assert [r["macs"] for r in meets] == sorted((r["macs"] for r in meets), reverse=True)  # biggest that fits first
    assert all(9 < r["ms"] <= 9 * 2.5 for r in data["near_misses"])
    assert data["settings"]["runtime"] == "onnx" and data["settings"]["threads"] == 1
    section = printed.split("meet the budget")[1].split("near misses")[0]
    assert len([line for line in section.splitlines() if line.strip().startswith(STUDENT)]) == len(meets)
    assert f"{meets[0]['ms']:.3f}" in section


@pytest.mark.parametrize("args,message", [
    (["--latency-ms", "2", "--students", "mobilenetv3_smal_100"], "did you mean mobilenetv3_small_100"),
    (["--latency-ms", "2", "--img-size", "8"], "--img-size: 8 px is too small"),
    (["--latency-ms", "2", "--ratios", "0", "1.0"], "--ratios: 1.0 is not a channel ratio in [0, 1)"),
    (["--latency-ms", "0"], "--latency-ms must be > 0"),
    (["--latency-ms", "-1.5"], "--latency-ms must be > 0"),
    (["--latency-ms", "2", "--runtime", "onxx"], "--runtime: unknown 'onxx'; choose one of"),
    (["--latency-ms", "2", "--patience", "-1"], "--patience must be >= 0"),
])
def test_bad_input_exits_2_with_one_message(args, message, capsys) -> None:
    def timer(net: torch.nn.Module, img_size: int) -> float:
        raise AssertionError("bad input must be refused before anything is built or timed")

    assert main(args, timer=timer) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
