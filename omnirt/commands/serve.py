"""``omnirt serve``: the gateway. Parses its flags into a ``GatewayConfig`` once, builds the service
tree (``omnirt.service.make_gateway_service``) and runs it on the reactor until SIGTERM/SIGINT,
which stop the tree: the planned drain (see ``omnirt.service``)."""

from __future__ import annotations

import sys

from omnirt.cli import CliError
from omnirt.config.serve import ConfigError, GatewayConfig, add_arguments, plaintext_warnings, print_warnings

__all__ = ["plaintext_warnings", "register", "run"]


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP gateway (single process, or in front of remote workers)")
    add_arguments(p)
    p.set_defaults(func=run, needs_reactor=True)


def run(args) -> int:
    try:
        config = GatewayConfig.from_args(args)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    print_warnings(config)
    code = run_gateway(config)
    sys.stdout.flush()
    return code


def run_gateway(config: GatewayConfig) -> int:
    """Start the tree on the global reactor (the one place it is used), run until stopped."""
    from twisted.internet import reactor
    from twisted.python import log

    from omnirt.service import StartupError, make_gateway_service
    from omnirt.telemetry.logging import install_logging

    try:
        service = make_gateway_service(config, reactor)
    except StartupError as exc:
        raise CliError(str(exc)) from None
    install_logging(config.log_format, stream=sys.stderr, trace_lookup=service.tracing.trace_id_for)
    exit_code = [0]

    def failed(f) -> None:
        if f.check(StartupError):
            print(f"error: {f.value}", file=sys.stderr, flush=True)
        else:
            log.err(f, "gateway failed to start")
            print(f"error: gateway failed to start: {f.value}", file=sys.stderr, flush=True)
        exit_code[0] = 2
        reactor.stop()

    def begin() -> None:
        service.startService()
        service.started.addErrback(failed)
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

    # callLater(0): callWhenRunning fires before the asyncio loop runs (grpc.aio needs it running)
    reactor.callLater(0, begin)
    reactor.run()
    return exit_code[0]
