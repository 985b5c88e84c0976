"""Job state: the JobStore interface, the memory store, the Redis store, and the artifact store."""
