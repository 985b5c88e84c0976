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


#: the collector's first threshold while serving (CPython's default is 700): a job's objects mostly
#: die by reference count before a collection looks at them, instead of being walked and promoted
GC_THRESHOLD0 = 10_000
#: the interpreter's thread switch interval while an in-process diffusers engine runs (CPython's
#: default is 5 ms): the reactor thread, woken by a request or an engine event, waits at most about
#: this long for the engine thread to hand over the interpreter lock (``benchmarks/gil_lag.py``:
#: the reactor's wake-up lag p99 beside a running tiny SDXL 5.7 ms at 5 ms, 1.9 ms at 1 ms)
ENGINE_SWITCH_INTERVAL_S = 0.001


def _tune_gc() -> None:
    """Once started: move everything made while starting (modules, schemas, routes; ~90k objects
    that live as long as the process) out of the collector's sight, so a full collection walks
    only what serving made, and collect the young generation less often. Measured on the async
    bench (gateway + 1 worker): GC time per run from ~0.6 s to ~0.15 s."""
    import gc

    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, second, third)


def switch_interval_for(config: GatewayConfig) -> float | None:
    """The switch interval to serve with: shorter when this process runs an engine that computes
    (any backend but the cpu-stub), None (the interpreter's default) for a gateway in front of
    workers or the stub, whose threads have nothing long to hand the lock back from."""
    if config.local_worker and config.backend != "cpu-stub":
        return ENGINE_SWITCH_INTERVAL_S
    return None


def _tune_switch_interval(config: GatewayConfig) -> None:
    interval = switch_interval_for(config)
    if interval is not None:
        sys.setswitchinterval(interval)


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
        service.started.addCallback(lambda _: _tune_gc())
        service.started.addCallback(lambda _: _tune_switch_interval(config))
        service.started.addErrback(failed)
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

    # callLater(0): callWhenRunning fires before the asyncio loop runs (grpc.aio needs it running)
    reactor.callLater(0, begin)
    reactor.run()
    return exit_code[0]
