"""Benchmark and drill drivers run by thin scripts/ entry points (and some integration tests)."""
