"""The figure of a latency-target search: what pruning bought in milliseconds, and in MACs.

Input is the search's record as the prune stage saves it (``student_pruned/latency_curve.json``,
or ``meta.json``'s ``pruning.latency``): ``target_ms``, ``points`` (ratio, ms, macs, params,
meets), ``chosen``, optionally ``final`` (the finished model timed again) and ``measured`` (the
runtime, batch, threads and device). Reads no run directory itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_latency_curve"]

_DPI = 110
_BUSY = 0.25  # cores of other processes above which profiling.latency withholds a figure


def _subtitle(measured: Mapping[str, Any] | None) -> str:
    if not measured:
        return ""
    device = measured.get("device") or ""
    return (f"\n{measured.get('runtime')}, batch {measured.get('batch')}, {measured.get('threads')} thread(s)"
            + (f", {device}" if device else ""))


def plot_latency_curve(curve: Mapping[str, Any], path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Median ms against channel ratio (filled: met the target), the target line, the chosen point,
    the finished model's check if there is one, and MACs on the right-hand axis; writes a PNG."""
    points = sorted(curve["points"], key=lambda p: p["ratio"])
    if not points:
        raise ValueError("a latency curve needs at least one measured point")
    ratios = [p["ratio"] for p in points]
    target, chosen = float(curve["target_ms"]), curve["chosen"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(ratios, [p["ms"] for p in points], "-", color="tab:blue", lw=1, zorder=2)
    for p in points:
        ax.plot(p["ratio"], p["ms"], "o", color="tab:blue", mfc="tab:blue" if p["meets"] else "white", zorder=3)
    ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target {target:g} ms")
    ax.plot(chosen["ratio"], chosen["ms"], "*", color="tab:green", ms=15, zorder=4,
            label=f"chosen: ratio {chosen['ratio']:.3f}, {chosen['ms']:.3f} ms, {chosen['macs'] / 1e6:.1f} M MACs")
    final = curve.get("final")
    if final:
        ax.plot(chosen["ratio"], final["ms"], "X", color="black", ms=9, zorder=4,
                label=f"finished model: {final['ms']:.3f} ms, {final['macs'] / 1e6:.1f} M MACs")
    ax.set(xlabel="channel ratio removed (0 = unpruned)", ylabel="median ms per call (filled: meets target)",
           title=(title or "Pruning to a latency target: measured candidates") + _subtitle(curve.get("measured")))
    ax.set_ylim(bottom=0)
    macs_axis = ax.twinx()
    macs_axis.plot(ratios, [p["macs"] / 1e6 for p in points], "s:", color="grey", ms=4, lw=1)
    macs_axis.set_ylabel("MACs per image (M, BatchNorm folded)", color="grey")
    macs_axis.set_ylim(bottom=0)
    macs_axis.tick_params(axis="y", colors="grey")
    loads = [p["other_cpu_load"] for p in points if p.get("other_cpu_load") is not None]
    if loads and max(loads) > _BUSY:
        ax.text(0.02, 0.02, f"timed while other processes used up to {max(loads):.2f} cores: skewed",
                transform=ax.transAxes, fontsize=8, color="tab:red")
    ax.legend(loc="upper right", fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return out
