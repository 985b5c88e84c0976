"""Model implementations: ``sdxl`` (diffusers), ``stub`` (the cpu-stub renderer), ``tiny`` (offline tiny weights)."""
