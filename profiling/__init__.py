"""Profiling in two halves: ``profiling.cost`` measures what a model costs (params, MACs, latency,
memory), ``profiling.report`` evaluates and reports a run (quality, thresholds, constraints,
plots). The cost half needs nothing of the report half."""
