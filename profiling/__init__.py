"""Cost (params, MACs, latency, memory, size), quality metrics, thresholds, plots and the report."""
