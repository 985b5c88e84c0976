"""The ``omnirt`` command: argparse entry point dispatching to ``omnirt.commands.*``.

Commands that run a Twisted reactor install the asyncio reactor first, before anything imports
``twisted.internet.reactor`` (txredisapi and prometheus_client.twisted do so at import time).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand name -> module under omnirt.commands exposing ``register(subparsers)``;
#: each registered parser sets ``func`` (args -> exit status) and optionally ``needs_reactor``.
COMMANDS = ("serve", "worker", "generate", "validate", "models", "fleet", "bench")


class CliError(Exception):
    """A one-line user-facing error: printed as ``error: <message>``, exit status 2."""


def install_reactor() -> None:
    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        if type(reactor).__name__ != "AsyncioSelectorReactor":
            raise RuntimeError("a non-asyncio Twisted reactor was installed before omnirt could install its own")
        return
    import asyncio

    from twisted.internet import asyncioreactor

    asyncioreactor.install(asyncio.new_event_loop())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnirt", description="OmniRT serving: image-generation models over HTTP")
    parser.add_argument("--version", action="version", version=f"omnirt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"omnirt.commands.{name}")
        module.register(sub)
    return parser


def _version() -> str:
    from omnirt import __version__

    return __version__


def _innermost_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)subcommand that ``args`` selected, so its usage is the one shown."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return parser
        chosen = getattr(args, actions[0].dest, None)
        if chosen not in actions[0].choices:
            return parser
        parser = actions[0].choices[chosen]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but an unknown flag is reported with the usage of the subcommand it
    was given to (argparse reports it with the top-level usage)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        _innermost_parser(parser, args).error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if getattr(args, "needs_reactor", False):
        install_reactor()
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
