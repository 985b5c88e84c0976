"""`omnirt worker`: serve the engine on this host over gRPC (and /metrics, /healthz over HTTP).

One asyncio-based Twisted reactor runs the grpc.aio server and the twisted.web metrics site.
SIGTERM (or SIGINT) drains: new jobs are refused, running ones get ``--drain-grace-s`` to finish,
the rest are cancelled, then the process exits 0. A second signal cancels at once.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from pathlib import Path

from omnirt.cli import CliError
from omnirt.commands.common import add_model_path_arg, parse_model_paths
from omnirt.telemetry.options import add_cli_args as add_tracing_args
from omnirt.telemetry.options import cli_options as tracing_options

DEFAULT_PORT = 50061


def _comma_list(text: str) -> tuple[str, ...]:
    items: dict[str, None] = {}
    for item in text.split(","):
        item = item.strip()
        if item:
            items.setdefault(item, None)
    return tuple(items)


def register(sub) -> None:
    p = sub.add_parser(
        "worker",
        help="serve the engine on this host to gateways over gRPC",
        description="Serve the engine on this host to gateways over gRPC (omnirt.worker.Worker).",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port; 0 picks a free one (default 50061)")
    p.add_argument("--worker-id", default="worker", help="this worker's id as gateways and job records show it")
    p.add_argument("--backend", default="auto", help="auto | cuda | ascend | cpu | cpu-stub (auto resolves here)")
    p.add_argument("--max-concurrency", type=int, default=1, help="jobs run at once; more are refused (default 1)")
    p.add_argument("--pipeline-cache-size", type=int, default=4, help="pipelines kept loaded (LRU, default 4)")
    p.add_argument("--models", default="", help="comma list of model ids served here (default: every model)")
    p.add_argument("--tags", default="", help="comma list of routing tags (e.g. gpu,a100)")
    add_model_path_arg(p)
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics and /healthz over HTTP (0 = any)")
    p.add_argument("--grpc-tls-cert", default=None, metavar="PEM", help="serve gRPC over TLS with this certificate")
    p.add_argument("--grpc-tls-key", default=None, metavar="PEM", help="the certificate's private key")
    p.add_argument("--grpc-tls-ca", default=None, metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--drain-grace-s", type=float, default=30.0, help="on SIGTERM, seconds running jobs get to finish")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="heartbeat period of a silent Run stream (default 1)")
    p.add_argument("--redis-url", default=None,
                   help="also record jobs' events and outcomes in the gateways' Redis store (same URL as serve)")
    p.add_argument("--redis-namespace", default="omnirt", help="prefix of every Redis key (as on serve)")
    add_tracing_args(p)
    p.set_defaults(func=run, needs_reactor=True)


def _check_args(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]:
    from omnirt.backends import BACKEND_NAMES
    from omnirt.contract import UnknownModel
    from omnirt.registry import get_model

    try:
        args.otlp_endpoint, args.otlp_headers = tracing_options(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is out of range 0..65535")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise CliError(f"--metrics-port {args.metrics_port} is out of range 0..65535")
    if args.max_concurrency < 1:
        raise CliError("--max-concurrency must be at least 1")
    if args.pipeline_cache_size < 1:
        raise CliError("--pipeline-cache-size must be at least 1")
    if args.drain_grace_s < 0:
        raise CliError("--drain-grace-s must not be negative")
    if args.heartbeat_s <= 0:
        raise CliError("--heartbeat-s must be positive")
    if not args.worker_id.strip():
        raise CliError("--worker-id must not be empty")
    if args.backend not in BACKEND_NAMES:
        raise CliError(f"--backend {args.backend!r} is unknown (one of: {', '.join(BACKEND_NAMES)})")
    models = _comma_list(args.models)
    tags = _comma_list(args.tags)
    try:
        for model in models:
            get_model(model)
    except UnknownModel as exc:
        raise CliError(f"--models: {exc.message}") from None
    model_paths = parse_model_paths(args.model_path)
    for model, folder in model_paths.items():
        if not Path(folder).is_dir():
            raise CliError(f"--model-path {model}={folder}: {folder} is not a directory")
        model_paths[model] = str(Path(folder).resolve())
    return models, tags, model_paths


def _grpc_address(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def run(args: argparse.Namespace) -> int:
    models, tags, model_paths = _check_args(args)
    from omnirt.telemetry.logging import install_logging

    tracing_holder: list = []
    install_logging(args.log_format, stream=sys.stderr,
                    trace_lookup=lambda job_id: tracing_holder[0].trace_id_for(job_id) if tracing_holder else None)

    from twisted.internet import reactor

    from omnirt.engine.engine import Engine

    try:
        engine = Engine(
            backend=args.backend,
            pipeline_cache_size=args.pipeline_cache_size,
            model_paths=model_paths or None,
            worker_id=args.worker_id,
            max_concurrency=args.max_concurrency,
        )
    except (ValueError, OSError) as exc:
        raise CliError(f"cannot start the engine: {exc}") from None

    app = _WorkerApp(args, engine, models, tags, reactor)
    tracing_holder.append(app.tracing)
    reactor.callLater(0, app.begin)  # runs inside the asyncio loop (callWhenRunning runs before it)
    reactor.run(installSignalHandlers=False)
    if app.error:
        raise CliError(app.error)
    return 0


class _WorkerApp:
    """Startup and the planned shutdown of one worker process, on the reactor's loop."""

    def __init__(self, args, engine, models, tags, reactor):
        from omnirt.telemetry.tracing import SERVICE_WORKER, Tracing
        from omnirt.workers.server import WorkerCore, WorkerMetrics

        self.args = args
        self.engine = engine
        self.reactor = reactor
        self.loop: asyncio.AbstractEventLoop | None = None
        self.metrics = WorkerMetrics()
        self.tracing = Tracing(SERVICE_WORKER, endpoint=args.otlp_endpoint, headers=args.otlp_headers,
                               resource_attributes={"omnirt.worker_id": args.worker_id},
                               failure_counter=self.metrics.trace_export_failures)
        self.core = WorkerCore(
            engine,
            worker_id=args.worker_id,
            capacity=args.max_concurrency,
            models=models,
            tags=tags,
            backend=args.backend,
            heartbeat_s=args.heartbeat_s,
            metrics=self.metrics,
            tracing=self.tracing,
        )
        self.server = None
        self.metrics_port = None
        self.error: str | None = None
        self._stopping: asyncio.Task | None = None
        self._signals = 0

    def begin(self) -> None:
        # called by the running reactor: its asyncio loop is the running loop (grpc.aio runs on it)
        self.loop = asyncio.get_running_loop()
        self._task = self.loop.create_task(self._start())

    async def _start(self) -> None:
        from omnirt.backends import BackendUnavailable
        from omnirt.workers.server import build_server

        args = self.args
        try:
            self.server = build_server(self.core)
            address = _grpc_address(args.host, args.port)
            from omnirt.workers.tls import TLSConfigError, server_credentials

            try:
                credentials = server_credentials(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_ca)
            except TLSConfigError as exc:
                raise CliError(str(exc)) from None
            try:
                if credentials is None:
                    port = self.server.add_insecure_port(address)
                else:
                    port = self.server.add_secure_port(address, credentials)
            except RuntimeError as exc:
                raise CliError(f"cannot listen on {address}: {exc} (port in use?)") from None
            if not port:
                raise CliError(f"cannot listen on {address} (port in use?)")
            await self.server.start()
            if args.metrics_port is not None:
                self.metrics_port = self._listen_metrics(args.host, args.metrics_port)
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self._on_signal, sig)
            if args.redis_url:
                await self._connect_store()
            try:
                await self.core.startup()
            except BackendUnavailable as exc:
                raise CliError(str(exc)) from None
        except CliError as exc:
            self.error = str(exc)
            await self._stop(drain=False)
            return
        except Exception as exc:  # startup bug: say it in one line, exit 2
            logging.getLogger(__name__).exception("worker startup failed")
            self.error = f"worker startup failed: {type(exc).__name__}: {exc}"
            await self._stop(drain=False)
            return
        if self.metrics_port is not None:
            mhost = self.metrics_port.getHost()
            print(f"omnirt worker {args.worker_id} metrics on http://{_grpc_address(args.host, mhost.port)}/metrics",
                  flush=True)
        print(f"omnirt worker {args.worker_id}: backend {self.core.backend}, capacity {self.core.capacity}, "
              f"models {','.join(self.core.models) or 'all'}, tags {','.join(self.core.tags) or '-'}", flush=True)
        # the readiness line (tests and supervisors wait for it): keep its format exactly
        print(f"omnirt worker {args.worker_id} listening on {_grpc_address(args.host, port)}", flush=True)

    async def _connect_store(self) -> None:
        from twisted.internet.defer import Deferred

        from omnirt.store.base import StoreUnavailable
        from omnirt.store.redis import RedisJobStore
        from omnirt.workers.recorder import StoreRecorder

        try:
            store = RedisJobStore(self.reactor, url=self.args.redis_url, namespace=self.args.redis_namespace,
                                  gateway_id=f"worker-{self.args.worker_id}")
        except ValueError as exc:
            raise CliError(f"bad --redis-url: {exc}") from None
        try:
            await Deferred.fromCoroutine(store.connect()).asFuture(self.loop)
        except StoreUnavailable as exc:
            raise CliError(str(exc)) from None
        self.core.recorder = StoreRecorder(store, self.args.worker_id, self.reactor, registry=self.metrics.registry)
        self.core.recorder.start()

    def _listen_metrics(self, host: str, port: int):
        from twisted.internet.error import CannotListenError
        from twisted.web.server import Site

        from omnirt.workers.server import health_json

        core = self.core
        metrics = self.metrics
        resource = _metrics_resource(metrics, core, health_json)
        try:
            return self.reactor.listenTCP(port, Site(resource), interface=host)
        except CannotListenError as exc:
            raise CliError(f"cannot listen on {host}:{port} for metrics: {exc.socketError}") from None

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            print(f"omnirt worker {self.args.worker_id}: {signal.Signals(sig).name}, draining "
                  f"(up to {self.args.drain_grace_s:g}s)", file=sys.stderr, flush=True)
            self._stopping = asyncio.ensure_future(self._stop(drain=True), loop=self.loop)
        else:
            print(f"omnirt worker {self.args.worker_id}: cancelling running jobs now", file=sys.stderr, flush=True)
            for job_id in list(self.core._running):
                self.core.cancel(job_id, "worker shutting down")

    async def _stop(self, *, drain: bool) -> None:
        try:
            if drain:
                await self.core.drain(self.args.drain_grace_s)
            else:
                self.core.state = "draining"
            if self.server is not None:
                await self.server.stop(5.0)
            if self.metrics_port is not None:
                stopped = self.metrics_port.stopListening()
                if stopped is not None:
                    await stopped.asFuture(self.loop)
            await self.core.close()
            if self.core.recorder is not None:
                from twisted.internet.defer import Deferred

                await Deferred.fromCoroutine(self.core.recorder.stop()).asFuture(self.loop)
            # the last spans go out off the loop, bounded: a dead collector does not hold the exit
            await self.tracing.shutdown(self.reactor, 5.0).asFuture(self.loop)
        except Exception:
            logging.getLogger(__name__).exception("error while stopping the worker")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.remove_signal_handler(sig)
            self.reactor.stop()


def _metrics_resource(metrics, core, health_json):
    from twisted.web.resource import Resource

    class _Leaf(Resource):
        isLeaf = True

        def __init__(self, render_body, content_type):
            super().__init__()
            self._render_body = render_body
            self._content_type = content_type

        def render_GET(self, request):
            request.setHeader(b"content-type", self._content_type)
            return self._render_body(request)

    def render_health(request):
        # always 200 while the process serves (liveness); "ok"/"state" say whether it takes jobs
        return health_json(core.health())

    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    root = Resource()
    root.putChild(b"metrics", _Leaf(lambda _r: metrics.render(), CONTENT_TYPE_LATEST.encode()))
    root.putChild(b"healthz", _Leaf(render_health, b"application/json"))
    return root
