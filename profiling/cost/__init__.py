"""The cost half of profiling: parameters, MACs (one counter), latency per runtime, peak memory,
the machine and its FLOP limit, for any ``nn.Module`` or exported file. It needs nothing of the
report half."""
