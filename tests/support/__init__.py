"""Shared test helpers: tiny weights, real processes on free ports."""
