"""Scripts that measure the project's headline claims; each appends its table to ``benchmarks/RESULTS.md``.

Run them from the repository root, one at a time, on an otherwise idle machine:
``python -m benchmarks.bench_models`` (add ``--quick`` for a check that the script runs).
"""
