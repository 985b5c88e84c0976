"""Runs pipelines on this host: pipeline cache, job threads, cancel token, progress events."""
