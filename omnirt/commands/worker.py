"""`omnirt worker`: serve the engine on this host over gRPC (and /metrics, /healthz over HTTP).

The flags and their checks are ``omnirt.config.worker``; the process is the service tree of
``omnirt.workers.service``. SIGTERM (or SIGINT) drains: new jobs are refused, running ones get
``--drain-grace-s`` to finish, the rest are stopped, then the process exits 0. A second signal
cancels at once.
"""

from __future__ import annotations

import argparse
import sys

from omnirt.cli import CliError
from omnirt.config.worker import DEFAULT_PORT, ConfigError, WorkerConfig, add_arguments

__all__ = ["DEFAULT_PORT", "register", "run"]


def register(sub) -> None:
    p = sub.add_parser(
        "worker",
        help="serve the engine on this host to gateways over gRPC",
        description="Serve the engine on this host to gateways over gRPC (omnirt.worker.Worker).",
    )
    add_arguments(p)
    p.set_defaults(func=run, needs_reactor=True)


def run(args: argparse.Namespace) -> int:
    try:
        config = WorkerConfig.from_args(args)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    from omnirt.telemetry.logging import install_logging

    holder: list = []
    install_logging(config.log_format, stream=sys.stderr,
                    trace_lookup=lambda job_id: holder[0].tracing.trace_id_for(job_id) if holder else None)

    from twisted.internet import reactor

    from omnirt.workers.service import StartupError, make_worker_service, serve_until_stopped

    try:
        service = make_worker_service(config, reactor)
    except StartupError as exc:
        raise CliError(str(exc)) from None
    holder.append(service)
    error = serve_until_stopped(service, reactor)
    if error:
        raise CliError(error)
    return 0
