"""`omnirt models` (being built)."""

from omnirt.cli import CliError


def register(sub):
    p = sub.add_parser("models", help="(not yet available)")
    p.set_defaults(func=run)


def run(args):
    raise CliError("'omnirt models' is not available yet in this version")
