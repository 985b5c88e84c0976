"""Benchmark and soak drivers (run by thin scripts under scripts/): they start gateways, workers
and Redis as child processes and measure them from the outside; not part of the runtime package."""
