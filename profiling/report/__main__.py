"""The run's report, re-rendered from the files the run saved.

    python -m profiling.report RUN [--check] [--measure] [--no-plots] [--debug]

Re-renders ``RUN/report.md``, ``RUN/report.json`` and ``RUN/plots/*.png`` from the run's saved
predictions, meta.json, export/verify.json, data/report.json and ``profile.json``: no model is
retrained or even loaded, unless ``--measure`` asks to re-measure the costs first. ``--check``
exits 1 when the deployed model fails a constraint (or one cannot be verified), 0 when all pass;
a user mistake (no such run, a damaged file) exits 2 with one message.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from core.errors import run_cli
from core.rundir import RunDir
from profiling.report.build import build_report
from profiling.report.measure import measure_run
from profiling.report.runfiles import read_run

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m profiling.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory, runs/<name>")
    p.add_argument("--check", action="store_true", help="exit 1 when the deployed model fails a constraint")
    p.add_argument("--measure", action="store_true",
                   help="re-measure params, MACs and latency of the run's models first (rewrites profile.json)")
    p.add_argument("--no-plots", action="store_true", help="skip the figures (faster, e.g. for a CI gate)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _one_line(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    def body() -> int:
        if args.measure:
            files = read_run(args.run)  # a damaged run fails here, before anything is measured
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = _one_line  # busy-CPU warnings as distill.run prints them
                measure_run(RunDir(Path(args.run)), files.profile_cfg, files.constraints, force=True)
        report = build_report(args.run, plots=not args.no_plots)
        print(report["verdict"])
        print(f"written: {RunDir(Path(args.run)).report_md}, report.json and {len(report['plots'])} plot(s)")
        return 1 if args.check and not report["constraints"]["passed"] else 0

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
