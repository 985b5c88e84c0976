"""``scripts/bench-topologies``: every serving topology on this machine in one run, and the report."""
