"""OmniRT serving: serve image-generation models (SDXL) over HTTP, gRPC workers and Redis."""

__version__ = "0.1.0"
