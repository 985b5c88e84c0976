"""``omnirt bench``: an HTTP-only load generator for OmniRT-compatible gateways (treq, Twisted)."""
