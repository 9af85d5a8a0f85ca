"""The report half of profiling: quality with intervals, thresholds chosen on validation, the
user's constraints, plots and the report files of a run (``python -m profiling.report RUN``)."""
