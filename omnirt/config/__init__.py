"""Typed configuration for the omnirt processes, parsed once from the CLI."""
