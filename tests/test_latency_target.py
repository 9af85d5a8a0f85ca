"""Pruning to a latency target: the measured search (with fake timers), its record, rounds and resume.

The fake timers are deterministic functions of the pruned copy's MACs, so every assertion is about
the search's logic; the one real timing only checks that a figure comes back.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from core.errors import UserError
from core.schema import FieldError
from student.config import PruneConfig
from student.latency_target import (
    CURVE_FILE,
    GRID,
    TOLERANCE,
    LatencySearch,
    LatencySettings,
    SubprocessTimer,
    final_check,
    search_latency_ratio,
    stage_latency_search,
)
from student.prune import StudentPruner, cost, prune_options, pruned_copy

ARCH, SIZE = "mobilenetv3_small_050", 32
MAX_MEASUREMENTS = len(GRID) + math.ceil(math.log2(0.2 / TOLERANCE))  # the grid, then bisecting a 0.2 bracket


def _net() -> torch.nn.Module:
    return timm.create_model(ARCH, pretrained=False, num_classes=2)


def _example() -> torch.Tensor:
    return torch.zeros(1, 3, SIZE, SIZE)


def fake_ms(net: torch.nn.Module, img_size: int) -> float:
    """A monotone fake timer: 1 ms per 100 k MACs."""
    return cost(net, torch.zeros(1, 3, img_size, img_size))[0] / 1e5


class Counting:
    """Wraps a timer, counting its calls and keeping (ms, MACs) of each."""

    def __init__(self, timer) -> None:
        self.timer, self.calls, self.seen = timer, 0, []

    def __call__(self, net: torch.nn.Module, img_size: int) -> float:
        self.calls += 1
        ms = self.timer(net, img_size)
        self.seen.append((ms, cost(net, torch.zeros(1, 3, img_size, img_size))[0]))
        return ms


def _macs_at(ratio: float) -> int:
    twin, _ = pruned_copy(_net(), _example(), ratio, **prune_options(PruneConfig()))
    return cost(twin, _example())[0]


def test_search_finds_the_least_pruning_that_meets_the_target_in_few_measurements() -> None:
    net, timer = _net(), Counting(fake_ms)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    target = 0.5 * fake_ms(net, SIZE)  # between the grid's ratios, so the search must bisect
    search = search_latency_ratio(net, _example(), target, timer)
    chosen = search.chosen
    assert chosen.meets and chosen.ms <= target and chosen in search.points
    assert chosen.ms == fake_ms(pruned_copy(net, _example(), chosen.ratio, **prune_options(PruneConfig()))[0], SIZE)
    missed = [p for p in search.points if p.ratio < chosen.ratio]
    assert missed and not any(p.meets for p in missed)  # monotone: nothing less pruned met it
    assert 0 < chosen.ratio - max(p.ratio for p in missed) <= TOLERANCE  # bisected to the tolerance
    assert timer.calls == len(search.points) <= MAX_MEASUREMENTS
    assert {p.ratio for p in search.points} >= {0.0, 0.2}
    assert search.macs_unpruned == search.points[0].macs == cost(net, _example())[0]
    assert all(p.macs > 0 and p.params > 0 for p in search.points)
    assert [p.ratio for p in search.curve()] == sorted(p.ratio for p in search.points)
    assert LatencySearch.from_json(json.loads(json.dumps(search.to_json()))) == search
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the student is untouched


def test_a_target_the_unpruned_student_meets_prunes_nothing() -> None:
    net, timer = _net(), Counting(fake_ms)
    search = search_latency_ratio(net, _example(), 1e3, timer)
    assert timer.calls == 1 and search.chosen.ratio == 0.0 and search.chosen.macs == search.macs_unpruned
    cfg = PruneConfig(target={"latency_ms": 1e3})
    pruner = StudentPruner(net, _example(), cfg, macs_goal=search.chosen.macs, latency=search.to_json())
    record = pruner.step()
    assert record["ratio"] == 0.0 and record["macs_after"] == record["macs_before"]
    assert pruner.structure()["history"] == []
    assert pruner.structure()["target"] == {"latency_ms": 1e3} and pruner.structure()["latency"]["chosen"]["ratio"] == 0


def test_unreachable_target_names_the_fastest_point_measured() -> None:
    grid, timer = (0.0, 0.4, 0.8), Counting(fake_ms)
    with pytest.raises(UserError) as err:
        search_latency_ratio(_net(), _example(), 0.1, timer, grid=grid)
    assert timer.calls == len(grid)
    ms, macs = min(timer.seen)
    fastest = grid[timer.seen.index((ms, macs))]
    message = str(err.value)
    assert "out of reach" in message and f"channel ratio {fastest:.2f} at {ms:.3f} ms" in message
    assert f"{macs / 1e6:.2f} M MACs" in message and "smaller student" in message and "looser target" in message


def test_a_non_monotone_timer_gives_a_measured_boundary_in_the_first_bracket() -> None:
    """Ratio 0.4 is made slow (a spike), 0.35 would meet the target: the grid never sees 0.35, so
    the search bisects [0.4, 0.6], the first bracket, and returns a ratio it measured to meet it."""
    spike, at_035 = _macs_at(0.4), _macs_at(0.35)
    assert at_035 > 1.05 * spike  # the spike must not cover 0.35 for this test to mean anything

    def spiky(net: torch.nn.Module, img_size: int) -> float:
        macs = cost(net, torch.zeros(1, 3, img_size, img_size))[0]
        return macs / 1e5 + (10.0 if 0.97 * spike <= macs <= 1.03 * spike else 0.0)

    target = 1.01 * at_035 / 1e5
    search = search_latency_ratio(_net(), _example(), target, spiky)
    by_ratio = {p.ratio: p for p in search.points}
    assert not by_ratio[0.4].meets and by_ratio[0.6].meets
    assert 0.4 < search.chosen.ratio <= 0.6 and search.chosen.meets
    # Documented: ratio 0.35 (at_035 MACs, outside the spike) would have met the target, but it lies
    # below the first bracket and is never measured.
    assert 0.35 not in by_ratio and at_035 / 1e5 <= target
    lower = max(p.ratio for p in search.points if p.ratio < search.chosen.ratio)
    assert not by_ratio[lower].meets and search.chosen.ratio - lower <= TOLERANCE


def test_rounds_interpolate_by_macs_toward_the_measured_copy() -> None:
    """Two rounds toward the MACs of a copy that (by the fake timer) meets the target: the goal a
    search hands over (the search itself is tested above)."""
    net, x = _net(), _example()
    goal = _macs_at(0.3)
    target = goal / 1e5
    pruner = StudentPruner(net, x, PruneConfig(target={"latency_ms": target}, steps=2), macs_goal=goal)
    first = pruner.step()
    assert goal < first["macs_after"] <= (pruner.macs0 + goal) / 2  # halfway by MACs, not by latency
    second = pruner.step()
    assert second["macs_after"] <= goal
    check = final_check(net, x, fake_ms, target)
    assert check["macs"] == second["macs_after"] and check["meets"]


def test_a_latency_target_needs_the_measured_goal_and_a_positive_value() -> None:
    assert PruneConfig(target={"latency_ms": 2.5}).target == {"latency_ms": 2.5}
    with pytest.raises(FieldError, match="latency_ms"):
        PruneConfig(target={"latency_ms": 0.0})
    with pytest.raises(FieldError, match="latency_ms"):
        PruneConfig(target={"ms": 2.0})
    with pytest.raises(ValueError, match="macs_goal"):
        StudentPruner(_net(), _example(), PruneConfig(target={"latency_ms": 2.0}))
    with pytest.raises(ValueError, match="for a latency_ms target"):
        StudentPruner(_net(), _example(), PruneConfig(target={"macs": 0.5}), macs_goal=1000)


def test_the_stage_search_is_saved_before_training_and_reused_on_resume(tmp_path) -> None:
    cfg = PruneConfig(target={"latency_ms": 1e3})
    config = {"prune": {"target": {"latency_ms": 1e3}}, "latency": {"runtime": "onnx", "threads": 2}}
    timer = Counting(fake_ms)
    first = stage_latency_search(tmp_path, _net(), _example(), cfg, timer, config=config)
    assert timer.calls == 1 and (tmp_path / CURVE_FILE).is_file()
    saved = json.loads((tmp_path / CURVE_FILE).read_text())
    assert saved["config"] == config and saved["points"][0]["ms"] == first.chosen.ms

    def never(net: torch.nn.Module, img_size: int) -> float:
        raise AssertionError("a resumed stage must not measure again")

    assert stage_latency_search(tmp_path, _net(), _example(), cfg, never, config=config) == first
    changed = {**config, "latency": {"runtime": "onnx", "threads": 1}}
    with pytest.raises(UserError, match=r"changed: latency\.threads.*--force prune"):
        stage_latency_search(tmp_path, _net(), _example(), cfg, never, config=changed)
    # A process that does not measure (torchrun rank > 0) reads the main process's file after the barrier.
    assert stage_latency_search(tmp_path, _net(), _example(), cfg, never, config=changed, main=False) == first


def test_the_structure_keeps_the_search_across_a_restore() -> None:
    net = _net()
    search = search_latency_ratio(net, _example(), 1e3, fake_ms)
    cfg = PruneConfig(target={"latency_ms": 1e3})
    pruner = StudentPruner(net, _example(), cfg, macs_goal=search.chosen.macs, latency=search.to_json())
    pruner.step()
    pruner.latency = {**pruner.latency, "final": final_check(net, _example(), fake_ms, 1e3)}
    structure = json.loads(json.dumps(pruner.structure()))
    again = StudentPruner(_net(), _example(), cfg, macs_goal=search.chosen.macs)
    again.restore(structure)
    assert again.structure()["latency"] == structure["latency"] and "final" in structure["latency"]


def test_the_real_timer_times_a_pruned_copy_in_a_fresh_process() -> None:
    twin, _ = pruned_copy(_net(), _example(), 0.3, **prune_options(PruneConfig()))
    timer = SubprocessTimer(LatencySettings(threads=1, warmup=1, runs=5, allow_busy=True))
    ms = timer(twin, SIZE)
    assert ms > 0 and timer.describe()["device"].startswith("cpu")


def test_the_curve_plot_is_written_from_the_saved_record(tmp_path) -> None:
    from profiling.report.latency_curve import plot_latency_curve

    points = [{"ratio": r, "ms": 4.0 - 5 * r, "macs": int(2e8 * (1 - r) ** 2), "params": 1000,
               "meets": 4.0 - 5 * r <= 2.0} for r in (0.0, 0.2, 0.4, 0.3, 0.35, 0.375)]
    chosen = next(p for p in points if p["ratio"] == 0.4)
    record = {"target_ms": 2.0, "points": points, "chosen": chosen, "final": {"ms": 1.9, "macs": chosen["macs"]},
              "measured": {"runtime": "onnx", "batch": 1, "threads": 2, "device": "cpu (test)"}}
    path = plot_latency_curve(json.loads(json.dumps(record)), tmp_path / "plots" / "latency_curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one"):
        plot_latency_curve({**record, "points": []}, tmp_path / "empty.png")


@pytest.mark.slow
def test_the_prune_stage_measures_once_and_a_resumed_run_does_not_measure_again(tmp_path, monkeypatch) -> None:
    """The pipeline's prune stage with a latency target (fake timer), killed right after pruning
    (Ctrl-C), then rerun: the search and the finished model's check are read back, not measured."""
    from test_faults import write_config

    import distill.compress
    import distill.run

    calls: list[int] = []

    class FakeTimer:
        def __init__(self, settings: LatencySettings, **_: object) -> None:
            self.settings = settings

        def describe(self) -> dict:
            return {"runtime": self.settings.runtime, "batch": self.settings.batch, "threads": self.settings.threads}

        def __call__(self, net: torch.nn.Module, img_size: int) -> float:
            calls.append(img_size)
            return fake_ms(net, img_size)

    monkeypatch.setattr(distill.compress, "SubprocessTimer", FakeTimer)
    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "runs", threads=None, num_train=16)
    # An override would merge into the file's {macs: 0.6}; the target is replaced in the file instead.
    cfg.write_text(cfg.read_text().replace("target: {macs: 0.6}", "target: {latency_ms: 10.0}"))
    args = [str(cfg), "--stages", "data,teacher,student,prune", "profile.threads=1"]
    real_say = distill.run._say

    def say(text: str) -> None:
        real_say(text)
        if text.startswith("[prune] round 1/1"):
            raise KeyboardInterrupt

    monkeypatch.setattr(distill.run, "_say", say)
    assert distill.run.main(args) == 130
    stage = tmp_path / "runs" / "tiny" / "student_pruned"
    measured = len(calls)
    curve = json.loads((stage / CURVE_FILE).read_text())
    assert measured == len(curve["points"]) + 1  # the search, then the finished model's check
    assert curve["config"]["latency"]["threads"] == 1 and curve["chosen"]["ms"] <= 10.0
    monkeypatch.setattr(distill.run, "_say", real_say)
    assert distill.run.main(args) == 0
    assert len(calls) == measured
    pruning = json.loads((stage / "meta.json").read_text())["pruning"]
    assert pruning["target"] == {"latency_ms": 10.0} and pruning["latency"]["chosen"] == curve["chosen"]
    assert pruning["latency"]["final"]["meets"] and pruning["rounds"][-1]["macs_after"] <= curve["chosen"]["macs"]
