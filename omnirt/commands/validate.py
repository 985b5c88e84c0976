"""`omnirt validate` (being built)."""

from omnirt.cli import CliError


def register(sub):
    p = sub.add_parser("validate", help="(not yet available)")
    p.set_defaults(func=run)


def run(args):
    raise CliError("'omnirt validate' is not available yet in this version")
