"""Benchmark, soak and drill drivers (run by thin scripts under scripts/, some also by integration
tests): they start gateways, workers and Redis as child processes and measure them from the
outside; not part of the runtime package."""
