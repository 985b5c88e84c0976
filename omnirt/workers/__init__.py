"""Reaching workers: one WorkerConnection interface, in-process and gRPC implementations, the pool."""
