"""The sentences and tables benchmarks compute from their figures (no benchmark is run here; the
wide-test check scores the tiny run test_faults.py shares)."""

from __future__ import annotations

import pytest

from profiling.cost.ort_breakdown import Breakdown, OpTime


def _breakdown(ops: list[OpTime]) -> Breakdown:
    return Breakdown("m.onnx", (1, 3, 64, 64), threads=2, warmup=1, runs=3, run_ms=1.0, kernel_ms=0.8,
                     overhead_ms=0.2, plain_ms=0.9, total_macs=1_000_000, ops=ops, top=[], nodes_per_run=10)


def test_breakdown_sentences_are_computed_from_the_breakdown():
    from benchmarks.bench_models import breakdown_sentences

    ops = [OpTime("Conv 1×1", 5, 0.4, 0.5, 600_000, 0.6, ["Conv"]),
           OpTime("Conv depthwise", 3, 0.24, 0.3, 250_000, 0.25, ["Conv"]),
           OpTime("ReorderInput", 4, 0.16, 0.2, 0, 0.0, ["ReorderInput (nchwc)"])]
    text = " ".join(breakdown_sentences(_breakdown(ops), peak=50.0))
    # 2 x 250k MACs in 0.24 ms = 2.08 GFLOP/s, 4% of 50
    assert "Depthwise convolutions hold 25% of the MACs and 30% of the kernel time, reaching 2.1 GFLOP/s (4%" in text
    assert "The slowest kind is Conv 1×1 (5 nodes): 50% of the kernel time for 60% of the MACs." in text
    # FLOP limit of 1 M MACs at 50 GFLOP/s: 0.04 ms; kernels 0.8 ms = 20x; MAC-free nodes 20%; outside 20% of 1 ms
    assert "The kernels alone take 20.0× the FLOP-limit time" in text
    assert "take 20% of the kernel time, and 20% of a profiled run" in text


def test_breakdown_sentences_without_depthwise_convolutions():
    from benchmarks.bench_models import breakdown_sentences

    text = breakdown_sentences(_breakdown([OpTime("Conv k×k", 2, 0.8, 1.0, 1_000_000, 1.0, ["Conv"])]), peak=50.0)
    assert text[0] == "The graph has no depthwise convolutions."


def test_resolution_overrides_make_one_data_config_for_every_size(tmp_path):
    from benchmarks.bench_resolution import CONFIG, COUNTS, overrides
    from distill.config import load_config

    cfgs = [load_config(CONFIG, overrides(tmp_path, 3, "mobilenetv3_large_100", size, epochs=8, render=224,
                                          counts=COUNTS)) for size in (224, 160, 128)]
    assert [c.student.img_size for c in cfgs] == [224, 160, 128]
    assert all(c.data == cfgs[0].data for c in cfgs)  # one split, one set of renders
    syn = cfgs[0].data.synthetic
    assert (syn.image_size, syn.num_train, syn.num_val, syn.num_test) == (224, 600, 200, 300)
    assert tuple(syn.severity) == (0.3, 0.7)
    assert {(c.student.arch, c.student.pretrained, c.student.epochs, c.run.seed) for c in cfgs} == {
        ("mobilenetv3_large_100", False, 8, 3)}


def test_resolution_prune_recovery_keeps_the_recipes_ratio_to_the_student_lr():
    from benchmarks.bench_resolution import CONFIG, RECIPE, recipe_prune
    from distill.config import load_config

    recipe, bench = load_config(RECIPE), load_config(CONFIG)
    pr = recipe_prune([])
    assert pr.lr == pytest.approx(recipe.prune.lr / recipe.student.lr * bench.student.lr)
    assert pr.epochs == recipe.prune.epochs and pr.target == recipe.prune.target
    assert recipe_prune(["lr=2.0e-4", "epochs=3"]).lr == pytest.approx(2e-4)  # an explicit rate wins
    assert recipe_prune(["epochs=3"]).epochs == 3


def test_resolution_table_and_verdicts_come_from_the_cells():
    from benchmarks.bench_resolution import Cell, Cost, tables

    def cell(auroc):
        return Cell(auroc=auroc, f1=0.5, ci=(auroc - 0.05, auroc + 0.05), epochs=8, seconds=10.0)

    results = {0: {("s", 224): cell(0.95), ("s", 160): cell(0.945), ("s", 128): cell(0.90)},
               1: {("s", 224): cell(0.97), ("s", 160): cell(0.96), ("s", 128): cell(0.91)}}
    costs = {("s", 224): Cost(200_000_000, 4_000_000, 2.0), ("s", 160): Cost(100_000_000, 4_000_000, None,
                                                                            "withheld (busy CPU)"),
             ("s", 128): Cost(50_000_000, 4_000_000, 0.8)}
    table, verdicts = tables(results, costs, ["s"], [128, 224, 160])
    lines = table.splitlines()
    assert [line.split(" | ")[1] for line in lines[2:]] == ["224 px", "160 px", "128 px"]  # largest first
    assert "| 0.960 ± 0.014 |" in lines[2]  # mean ± std over the two seeds
    assert "-0.008 ± 0.004" in lines[3] and "0.50×" in lines[3] and "withheld (busy CPU)" in lines[3]
    assert "-0.055 ± 0.007" in lines[4] and "0.25×" in lines[4]
    assert "[0.900, 1.000]; [0.920, 1.020]" in lines[2]  # one interval per seed
    assert "160 px -0.008 (0.50× the MACs), 128 px -0.055 (0.25× the MACs)" in verdicts[0]
    assert "The smallest size within 0.01 AUROC of 224 px is **160 px**." in verdicts[0]


def test_resolution_verdict_when_every_smaller_size_loses():
    from benchmarks.bench_resolution import Cell, Cost, tables

    results = {0: {("s", 224): Cell(0.95, 0.5, (0.9, 1.0), 8, 1.0), ("s", 128): Cell(0.90, 0.5, (0.85, 0.95), 8, 1.0)}}
    costs = {("s", 224): Cost(4, 1), ("s", 128): Cost(1, 1)}
    _, verdicts = tables(results, costs, ["s"], [224, 128])
    assert "No smaller size stays within 0.01 AUROC of 224 px." in verdicts[0]
    assert "One seed" in verdicts[0]


def test_resolution_pruned_verdict_says_within_beyond_or_undertrained():
    from benchmarks.bench_resolution import Cell, Cost, tables

    def cell(auroc, pruned):
        c = Cell(auroc, 0.5, (auroc - 0.05, auroc + 0.05), 8, 1.0)
        c.pruned, c.macs_pruned = Cell(pruned, 0.5, (pruned - 0.05, pruned + 0.05), 8, 1.0), 1
        return c

    results = {0: {("s", 224): cell(0.95, 0.945), ("s", 160): cell(0.95, 0.90), ("s", 128): cell(0.60, 0.97)}}
    costs = {("s", size): Cost(size, 1) for size in (224, 160, 128)}
    _, verdicts = tables(results, costs, ["s"], [224, 160, 128])
    assert "- s @224 px pruned: Δ AUROC -0.005 against the unpruned student (within 0.01)" in verdicts
    assert "- s @160 px pruned: Δ AUROC -0.050 against the unpruned student (beyond 0.01)" in verdicts
    assert any(v.startswith("- s @128 px pruned: Δ AUROC +0.370") and "undertrained" in v for v in verdicts)


def test_breakdown_section_renders_each_profiled_student_and_says_why_one_is_missing():
    from types import SimpleNamespace

    from benchmarks.bench_models import breakdown_section

    models = [SimpleNamespace(key="a", label="pruned student (macs 0.3)", profiles={1: {"macs": 1_000_000}}),
              SimpleNamespace(key="b", label="pruned student (macs 0.5)", profiles={1: {"macs": 2_000_000}})]
    ops = [OpTime("Conv depthwise", 3, 0.8, 1.0, 1_000_000, 1.0, ["Conv (nchwc) + Relu"])]
    text = "\n".join(breakdown_section(models, {"a": _breakdown(ops), "b": "it failed: Fail: boom"}, peak=50.0))
    assert "### Where the batch-1 time goes (ONNX Runtime profiler)" in text
    assert "#### pruned student (macs 0.3)" in text and "| Conv depthwise | 3 |" in text
    assert "1.0 M on the ONNX graph, 1.0 M by fvcore" in text
    assert "#### pruned student (macs 0.5)\n\nNot profiled: it failed: Fail: boom." in text
    assert breakdown_section(models, {}, peak=50.0) == []  # every student within its target: no section


def _report(teacher: float, student: float, pruned: float, passed: bool = True) -> dict:
    models = {"teacher": teacher, "student": student, "student_pruned": pruned}
    return {"models": {k: {"test": {"auroc": v}} for k, v in models.items()}, "constraints": {"passed": passed}}


def test_pipeline_seed_row_checks_the_margin_targets():
    from benchmarks.bench_pipeline import seed_row

    shares = {"teacher": 100.0, "student": 50.0, "prune": 20.0}
    row, ok = seed_row(0, 240.0, shares, _report(0.985, 0.99, 0.978))
    assert ok and row[0] == "0" and row[1] == "240" and row[2:5] == ["100", "50", "20"]
    assert row[7] == "+0.0050" and row[9] == "-0.0070" and row[-2] == "PASS"
    assert not seed_row(0, 1.0, shares, _report(0.975, 0.99, 0.99))[1]  # teacher below 0.98
    assert not seed_row(0, 1.0, shares, _report(0.99, 0.99, 0.975))[1]  # pruned 0.015 below the teacher
    assert not seed_row(0, 1.0, shares, _report(0.99, 0.99, 0.99, passed=False))[1]  # constraints failed
    missing = {"models": {"teacher": {"test": {"auroc": 0.99}}}, "constraints": {"passed": True}}
    row, ok = seed_row(1, 1.0, {}, missing)
    assert not ok and row[6] == "-" and row[2] == "-"
    report = _report(0.99, 0.98, 0.99)
    report["models"]["student"]["vs_teacher"] = {"auroc_delta": {"delta": -0.01, "low": -0.031, "high": 0.012}}
    assert seed_row(2, 1.0, shares, report)[0][7] == "-0.0100 [-0.031, +0.012]"


def test_wide_test_scores_the_finished_models_on_a_larger_fresh_split(tmp_path_factory):
    from benchmarks.bench_pipeline import seed_row, wide_test
    from test_faults import reference_run

    run_dir = reference_run(tmp_path_factory)
    before = (run_dir / "student" / "predictions.csv").read_bytes()
    wide = wide_test(run_dir, 0, 40)
    assert wide["images"] == 40 and wide["defects"] == 8 and set(wide["models"]) == {"teacher", "student", "student_pruned"}
    teacher = wide["models"]["teacher"]["test"]["auroc"]
    for name in ("student", "student_pruned"):
        m = wide["models"][name]
        d = m["vs_teacher"]["auroc_delta"]
        assert d["delta"] == pytest.approx(m["test"]["auroc"] - teacher) and d["low"] <= d["delta"] <= d["high"]
    assert (run_dir / "student" / "predictions.csv").read_bytes() == before  # the run itself is untouched
    report = _report(0.99, 0.99, 0.99)
    row, ok = seed_row(0, 1.0, {}, report, wide)
    assert len(row) == 12 + 6 and row[13] == f"{wide['models']['student']['test']['auroc']:.4f}"
    assert ok == (teacher >= 0.98 and all(teacher - wide["models"][n]["test"]["auroc"] <= 0.01
                                          for n in ("student", "student_pruned")))
