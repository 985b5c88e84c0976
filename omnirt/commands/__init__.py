"""One module per ``omnirt`` subcommand; each exposes ``register(subparsers)``."""
