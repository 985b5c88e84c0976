"""`omnirt generate` (being built)."""

from omnirt.cli import CliError


def register(sub):
    p = sub.add_parser("generate", help="(not yet available)")
    p.set_defaults(func=run)


def run(args):
    raise CliError("'omnirt generate' is not available yet in this version")
