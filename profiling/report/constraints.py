"""The user's constraint, checked: is the deployed model fast, light and accurate enough?

Each bound of ``constraints:`` becomes one check with its limit, the measured value and pass or
fail. A bound that could not be checked (latency withheld on a busy CPU, no profile.json, an
undefined AUROC) is neither passed nor failed: ``passed`` is None, and the constraint as a whole
does not pass, since nothing was shown.

What is deployed is a (model, runtime) pair: the last student (the pruned one, else the distilled
one) in fp32 on ONNX Runtime or OpenVINO, or its int8 copy on ONNX Runtime; of the
pairs that were timed, the fastest at ``constraints.batch`` that meets every constraint, the
latency bound read on the pair's own runtime. The choice reads the quality bounds on *validation*,
like the threshold: choosing on test would make the test figures of the chosen model optimistic.
The report then shows the chosen pair's checks on test.

With ``data.tiles`` a line judges whole images, so both the choice and the checks read the image
level (``row["image"]``: each image scored by its worst tile, at the image-level threshold), and a
latency is that of one image: ``constraints.batch`` images, all their tiles in one batch
(``tiles_per_image`` x batch).
"""

from __future__ import annotations

import math
from typing import Any

from profiling.report.config import ConstraintsConfig
from profiling.cost.profile_model import latency_key

__all__ = ["DEPLOY_RUNTIMES", "batch_of", "check_model", "choose_deployed", "deploy_candidates", "deploy_pairs",
           "fastest_runtimes", "latency_of", "precision_of", "runtime_for"]

_INT8_RUNTIME = "onnx_int8"
#: The runtimes a model is deployed on (what ``python -m deploy.predict`` runs a run's exported model
#: on), by precision, in the order that breaks a tie.
DEPLOY_RUNTIMES: dict[str, tuple[str, ...]] = {"fp32": ("onnx", "openvino"), "int8": (_INT8_RUNTIME,)}


def precision_of(row: dict[str, Any]) -> str:
    """``int8`` for a quantised model, else ``fp32``."""
    return "int8" if row.get("quantised_from") is not None else "fp32"


def fastest_runtimes(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per batch (``b1``, ...), the runtime with the lowest median of this model's figures, and the median."""
    best: dict[str, dict[str, Any]] = {}
    for key, figure in (row.get("latency_ms") or {}).items():
        runtime, batch = key.rsplit("_b", 1)
        if figure.get("median") is None:
            continue
        current = best.get(f"b{batch}")
        if current is None or figure["median"] < current["median"]:
            best[f"b{batch}"] = {"runtime": runtime, "median": figure["median"],
                                 **({"under_load": figure["under_load"]} if figure.get("under_load") else {})}
    return best


def runtime_for(row: dict[str, Any], runtime: str) -> str | None:
    """The runtime whose figure stands for ``runtime`` for this model, or None if it cannot run there.

    An int8 model exists only as an ONNX file: for ``onnx`` its ``onnx_int8`` session is the
    figure; eager and CUDA runtimes do not apply to it.
    """
    if row.get("quantised_from") is None:
        return runtime
    return _INT8_RUNTIME if runtime in ("onnx", _INT8_RUNTIME) else None


def batch_of(row: dict[str, Any], batch: int) -> int:
    """The model's inputs per forward pass for ``batch`` images: ``batch`` x its tiles per image."""
    return batch * int(row.get("tiles_per_image") or 1)


def latency_of(row: dict[str, Any], runtime: str, batch: int) -> dict[str, Any] | None:
    """The model's latency record (median, p90, threads, device) on ``runtime`` for ``batch`` images
    (of a tiled model: all their tiles in one batch), if measured."""
    actual = runtime_for(row, runtime)
    return None if actual is None else (row.get("latency_ms") or {}).get(latency_key(actual, batch_of(row, batch)))


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _check(name: str, op: str, limit: float, value: Any, what: str, missing: str) -> dict[str, Any]:
    value = _number(value)
    if value is None:
        passed = None
    else:
        passed = value <= limit if op == "<=" else value >= limit
    out = {"name": name, "op": op, "limit": limit, "value": value, "passed": passed, "what": what}
    if value is None:
        out["why"] = missing
    return out


def _latency_check(row: dict[str, Any], c: ConstraintsConfig, runtime: str | None = None) -> dict[str, Any]:
    wanted = runtime or c.runtime
    actual = runtime_for(row, wanted)
    figure = latency_of(row, wanted, c.batch)
    key = latency_key(actual or wanted, batch_of(row, c.batch))
    if actual is None:
        missing = f"an int8 model runs only in ONNX Runtime, not on '{wanted}'"
    else:
        missing = (row.get("latency_skipped") or {}).get(key) or "not measured (no profile.json, or runtime not profiled)"
    per_image = f" (one image: {row['tiles_per_image']} tiles per batch)" if row.get("tiles_per_image") else ""
    what = f"median ms, {key}{per_image}" + (f", {figure['threads']} threads, {figure['device']}" if figure else "")
    if figure and figure.get("under_load"):
        what += f", {figure['under_load']}"
    return _check("max_latency_ms", "<=", c.max_latency_ms, figure and figure.get("median"), what, missing)


def check_model(row: dict[str, Any], c: ConstraintsConfig, split: str = "test",
                runtime: str | None = None) -> list[dict[str, Any]]:
    """One check per bound set in ``c``, for one report row (cost fields, and the quality metrics of
    ``split``: ``test`` for what is reported, ``val`` for choosing); the latency bound is read on
    ``runtime`` (default: the constraint's)."""
    level = row.get("image") or row  # a tiled model is judged on whole images
    test = (level.get("splits") or {}).get(split) if split != "test" else level.get("test")
    test = test or {}
    split = f"image-level {split}" if row.get("image") else split
    checks = []
    if c.max_latency_ms is not None:
        checks.append(_latency_check(row, c, runtime))
    not_counted = "not counted (no profile.json, or only an ONNX file)"
    if c.max_params is not None:
        checks.append(_check("max_params", "<=", c.max_params, row.get("params"), "parameters", not_counted))
    if c.max_macs is not None:
        checks.append(_check("max_macs", "<=", c.max_macs, row.get("macs"), "MACs per image, BatchNorm folded",
                             not_counted))
    undefined = f"undefined on this {split} split (it lacks a class)"
    for name, metric, what in (("min_auroc", "auroc", f"{split} AUROC"), ("min_f1", "f1", f"{split} F1 at the threshold"),
                               ("min_recall", "recall", f"{split} defect recall at the threshold")):
        limit = getattr(c, name)
        if limit is not None:
            checks.append(_check(name, ">=", limit, test.get(metric), what, undefined))
    return checks


def deploy_candidates(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The last student in fp32, then its int8 copy where there is one: what could be deployed."""
    base = next((n for n in ("student_pruned", "student") if n in rows), None)
    if base is None:
        return []
    return [base] + [n for n, r in rows.items() if r.get("quantised_from") == base]


def deploy_pairs(rows: dict[str, dict[str, Any]], c: ConstraintsConfig) -> list[tuple[str, str]]:
    """Every (model, runtime) pair that could be deployed: each candidate model on each runtime of its
    precision that was timed at ``c.batch`` (a figure or a reason for none); a model timed on none of
    them (no profile.json) stands with the constraint's runtime, or its precision's first."""
    pairs = []
    for name in deploy_candidates(rows):
        row = rows[name]
        timed = {**(row.get("latency_ms") or {}), **(row.get("latency_skipped") or {})}
        runtimes = [r for r in DEPLOY_RUNTIMES[precision_of(row)] if latency_key(r, batch_of(row, c.batch)) in timed]
        pairs += [(name, r) for r in runtimes or [runtime_for(row, c.runtime) or DEPLOY_RUNTIMES[precision_of(row)][0]]]
    return pairs


def _speed(row: dict[str, Any], runtime: str, c: ConstraintsConfig) -> float:
    figure = latency_of(row, runtime, c.batch)
    return figure["median"] if figure and figure.get("median") is not None else math.inf


def choose_deployed(rows: dict[str, dict[str, Any]], c: ConstraintsConfig) -> dict[str, Any] | None:
    """Which (model, runtime) pair is deployed, its checks, and why it was chosen; None without a student.

    The fastest (median at ``c.batch`` on the pair's runtime) of the pairs that pass every check on
    validation; if none passes, the one with the fewest failed or unverifiable checks, then the
    fastest. The returned checks are the chosen pair's on test.
    """
    pairs = deploy_pairs(rows, c)
    if not pairs:
        return None
    checks = {p: check_model(rows[p[0]], c, "val", runtime=p[1]) for p in pairs}
    passing = [p for p in pairs if all(ch["passed"] is True for ch in checks[p])]

    def speed(pair: tuple[str, str]) -> float:
        return _speed(rows[pair[0]], pair[1], c)

    def speed_text(pair: tuple[str, str]) -> str:
        s = speed(pair)
        return f"{pair[0]} on {pair[1]} {s:.3g} ms" if math.isfinite(s) else f"{pair[0]} on {pair[1]} not timed"

    timings = ", ".join(speed_text(p) for p in pairs)
    where = f"batch {c.batch}"
    if len(pairs) == 1:
        chosen, why = pairs[0], "the only candidate (one model, timed on one runtime)"
    elif passing:
        chosen = min(passing, key=speed)
        if not checks[chosen]:
            why = f"the fastest (model, runtime) pair at {where}, no constraint being set ({timings})"
        elif len(passing) > 1:
            why = f"the fastest (model, runtime) pair at {where} that meets every constraint on validation ({timings})"
        else:
            why = f"the only (model, runtime) pair that meets every constraint on validation ({timings})"
    else:
        def shortfall(pair: tuple[str, str]) -> tuple[int, float]:
            return sum(ch["passed"] is not True for ch in checks[pair]), speed(pair)

        chosen = min(pairs, key=shortfall)
        why = (f"no (model, runtime) pair meets every constraint on validation; shown: the one with the fewest "
               f"failed or unverifiable checks, then the fastest at {where} ({timings})")
    name, runtime = chosen
    test_checks = check_model(rows[name], c, "test", runtime=runtime)
    return {"model": name, "runtime": runtime, "precision": precision_of(rows[name]),
            "candidates": [{"model": m, "runtime": r, "median_ms": None if not math.isfinite(speed((m, r)))
                            else speed((m, r))} for m, r in pairs],
            "why": why, "checks": test_checks, "passed": all(ch["passed"] is True for ch in test_checks)}
