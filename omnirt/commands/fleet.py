"""`omnirt fleet` (not built yet)."""

from omnirt.cli import CliError


def register(sub):
    p = sub.add_parser("fleet", help="(not yet available)")
    p.set_defaults(func=run)


def run(args):
    raise CliError("'omnirt fleet' is not available yet in this version")
