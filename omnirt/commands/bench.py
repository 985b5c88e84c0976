"""`omnirt bench` (not built yet)."""

from omnirt.cli import CliError


def register(sub):
    p = sub.add_parser("bench", help="(not yet available)")
    p.set_defaults(func=run)


def run(args):
    raise CliError("'omnirt bench' is not available yet in this version")
