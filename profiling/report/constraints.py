"""The user's constraint, checked: is the deployed model fast, light and accurate enough?

Each bound of ``constraints:`` becomes one check with its limit, the measured value and pass or
fail. A bound that could not be checked (latency withheld on a busy CPU, no profile.json, an
undefined AUROC) is neither passed nor failed: ``passed`` is None, and the constraint as a whole
does not pass, since nothing was shown.

The deployed model is the last student (the pruned one, else the distilled one) in fp32 or its
int8 copy: of those two, the fastest that meets every constraint on the constraint's runtime. The
choice reads the quality bounds on *validation*, like the threshold: choosing on test would make
the test figures of the chosen model optimistic. The report then shows the chosen model's checks
on test.

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

__all__ = ["batch_of", "check_model", "choose_deployed", "deploy_candidates", "latency_of", "runtime_for"]

_INT8_RUNTIME = "onnx_int8"


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


def _latency_check(row: dict[str, Any], c: ConstraintsConfig) -> dict[str, Any]:
    actual = runtime_for(row, c.runtime)
    figure = latency_of(row, c.runtime, c.batch)
    key = latency_key(actual or c.runtime, batch_of(row, c.batch))
    if actual is None:
        missing = f"an int8 model runs only in ONNX Runtime, not on '{c.runtime}'"
    else:
        missing = (row.get("latency_skipped") or {}).get(key) or "not measured (no profile.json, or runtime not profiled)"
    per_image = f" (one image: {row['tiles_per_image']} tiles per batch)" if row.get("tiles_per_image") else ""
    what = f"median ms, {key}{per_image}" + (f", {figure['threads']} threads, {figure['device']}" if figure else "")
    return _check("max_latency_ms", "<=", c.max_latency_ms, figure and figure.get("median"), what, missing)


def check_model(row: dict[str, Any], c: ConstraintsConfig, split: str = "test") -> list[dict[str, Any]]:
    """One check per bound set in ``c``, for one report row (cost fields, and the quality metrics of
    ``split``: ``test`` for what is reported, ``val`` for choosing)."""
    level = row.get("image") or row  # a tiled model is judged on whole images
    test = (level.get("splits") or {}).get(split) if split != "test" else level.get("test")
    test = test or {}
    split = f"image-level {split}" if row.get("image") else split
    checks = []
    if c.max_latency_ms is not None:
        checks.append(_latency_check(row, c))
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


def _speed(row: dict[str, Any], c: ConstraintsConfig) -> float:
    figure = latency_of(row, c.runtime, c.batch)
    return figure["median"] if figure and figure.get("median") is not None else math.inf


def choose_deployed(rows: dict[str, dict[str, Any]], c: ConstraintsConfig) -> dict[str, Any] | None:
    """Which candidate is deployed, its checks, and why it was chosen; None without a student.

    The fastest (median on ``c.runtime`` at ``c.batch``) of the candidates that pass every check on
    validation; if none passes, the one with the fewest failed or unverifiable checks, then the
    fastest. The returned checks are the chosen model's on test.
    """
    candidates = deploy_candidates(rows)
    if not candidates:
        return None
    checks = {n: check_model(rows[n], c, "val") for n in candidates}
    passing = [n for n in candidates if all(ch["passed"] is True for ch in checks[n])]
    where = latency_key(c.runtime, batch_of(rows[candidates[0]], c.batch))

    def speed_text(name: str) -> str:
        s = _speed(rows[name], c)
        return f"{name} {s:.3g} ms" if math.isfinite(s) else f"{name} not timed"

    timings = ", ".join(speed_text(n) for n in candidates)
    if len(candidates) == 1:
        chosen, why = candidates[0], "the only candidate (no int8 copy was exported)"
    elif passing:
        chosen = min(passing, key=lambda n: _speed(rows[n], c))
        if not checks[chosen]:
            why = f"the fastest candidate on {where}, no constraint being set ({timings})"
        elif len(passing) > 1:
            why = f"the fastest on {where} of the candidates that meet every constraint on validation ({timings})"
        else:
            why = f"the only candidate that meets every constraint on validation ({timings})"
    else:
        def shortfall(name: str) -> tuple[int, float]:
            return sum(ch["passed"] is not True for ch in checks[name]), _speed(rows[name], c)

        chosen = min(candidates, key=shortfall)
        why = (f"no candidate meets every constraint on validation; shown: the one with the fewest failed or "
               f"unverifiable checks, then the fastest on {where} ({timings})")
    test_checks = check_model(rows[chosen], c, "test")
    return {"model": chosen, "candidates": candidates, "why": why, "checks": test_checks,
            "passed": all(ch["passed"] is True for ch in test_checks)}
