"""``omnirt worker`` as one service tree: ``make_worker_service(config, reactor) -> MultiService``.

Children start in order, each once the one before it is up: tracing, the shared store (only
with ``--redis-url``; its lease refresh is a ``TimerService``), the engine host (``WorkerCore``),
the gRPC server, the metrics endpoint. Stopping is the planned shutdown sequence: stop admitting,
let running jobs finish up to ``--drain-grace-s``, stop the rest (reported to gateways as the
worker's own abort: retried elsewhere), then the children in reverse: metrics endpoint, gRPC
server, engine host (its job threads joined), store (after the recorder's tracked writes have
landed), tracing (the last spans flushed, bounded).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred

from omnirt.config.worker import WorkerConfig, format_address
from omnirt.telemetry.tracing import SERVICE_WORKER, Tracing
from omnirt.workers.compat import Compat
from omnirt.workers.core import WorkerCore, WorkerMetrics

__all__ = ["StartupError", "WorkerService", "make_worker_service", "serve_until_stopped"]

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A one-line reason the worker cannot start (exit status 2)."""


def _aio(reactor: Any, coro: Coroutine) -> Deferred:
    """An asyncio coroutine (grpc.aio) on the reactor's loop, as a Deferred."""
    loop = getattr(reactor, "_asyncioEventloop", None)
    return Deferred.fromFuture(asyncio.ensure_future(coro, loop=loop))


class Step(Service):
    """A child whose start and stop are asynchronous; the parent awaits each in turn."""

    async def start(self) -> None:
        """Bring this part up; raise ``StartupError`` with the reason when it cannot."""

    async def stop(self) -> None:
        """Take this part down (called only after ``start`` succeeded)."""

    def startService(self) -> None:
        super().startService()
        self.started = Deferred.fromCoroutine(self.start())

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self.stop())


class TracingStep(Step):
    """The process's spans: flushed last, bounded, so a dead collector does not hold the exit."""

    def __init__(self, tracing: Tracing, reactor: Any):
        self.setName("tracing")
        self.tracing = tracing
        self.reactor = reactor

    async def stop(self) -> None:
        await self.tracing.shutdown(self.reactor, 5.0)


class StoreStep(Step):
    """The gateways' shared store: the worker records its jobs there itself (``--redis-url``)."""

    def __init__(self, config: WorkerConfig, reactor: Any, core: WorkerCore):
        self.setName("store")
        self.config = config
        self.reactor = reactor
        self.core = core
        self.recorder: Any = None
        self.lease: Service | None = None

    async def start(self) -> None:
        from omnirt.store.base import StoreUnavailable
        from omnirt.store.redis import RedisJobStore
        from omnirt.workers.recorder import StoreRecorder

        if not self.config.redis_url:  # this child is only made for a worker given --redis-url
            raise StartupError("the worker's store recorder needs --redis-url")
        try:
            store = RedisJobStore(self.reactor, url=self.config.redis_url, namespace=self.config.redis_namespace,
                                  retention_s=self.config.job_retention_s,
                                  gateway_id=f"worker-{self.config.worker_id}",
                                  min_replicas=self.config.redis_min_replicas,
                                  wait_timeout_s=self.config.redis_wait_timeout_s)
        except ValueError as exc:
            raise StartupError(f"bad --redis-url: {exc}") from None
        try:
            await store.connect()
        except StoreUnavailable as exc:
            raise StartupError(str(exc)) from None
        try:
            # a namespace written by upstream OmniRT 0.1 (a JSON string per job) cannot be shared
            problem = await store.find_upstream_records()
        except StoreUnavailable as exc:
            problem = str(exc)
        if problem is not None:
            await store.close()
            raise StartupError(problem)
        self.recorder = StoreRecorder(store, self.config.worker_id, self.reactor,
                                      registry=self.core.metrics.registry)
        self.core.recorder = self.recorder
        self.lease = self.recorder.lease_service()
        self.lease.startService()

    async def stop(self) -> None:
        if self.lease is not None:
            await maybeDeferred(self.lease.stopService)
        if self.recorder is not None:
            await Deferred.fromCoroutine(self.recorder.close())


class CoreStep(Step):
    """The engine host: resolves the backend on this host, then takes jobs."""

    def __init__(self, core: WorkerCore):
        self.setName("core")
        self.core = core

    async def start(self) -> None:
        from omnirt.backends import BackendUnavailable

        try:
            await Deferred.fromCoroutine(self.core.startup())
        except BackendUnavailable as exc:
            raise StartupError(str(exc)) from None

    async def stop(self) -> None:
        await Deferred.fromCoroutine(self.core.close())


class GrpcStep(Step):
    """The grpc.aio ``Worker`` server in front of the core."""

    def __init__(self, config: WorkerConfig, reactor: Any, core: WorkerCore):
        self.setName("grpc")
        self.config = config
        self.reactor = reactor
        self.core = core
        self.server: Any = None
        self.port = 0

    async def start(self) -> None:
        from omnirt.workers.servicer import build_server
        from omnirt.workers.tls import TLSConfigError, server_credentials

        config = self.config
        try:
            credentials = server_credentials(config.grpc_tls_cert, config.grpc_tls_key, config.grpc_tls_ca)
        except TLSConfigError as exc:
            raise StartupError(str(exc)) from None
        self.server = build_server(self.core, config.heartbeat_s)
        address = config.grpc_address
        try:
            if credentials is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            port, reason = 0, f"cannot listen on {address}: {exc} (port in use?)"
        else:
            reason = f"cannot listen on {address} (port in use?)"
        if not port:
            await _aio(self.reactor, self.server.stop(None))  # never leave a grpc.aio server behind
            self.server = None
            raise StartupError(reason)
        await _aio(self.reactor, self.server.start())
        self.port = port

    async def stop(self) -> None:
        if self.server is not None:
            await _aio(self.reactor, self.server.stop(self.config.server_stop_grace_s))


class MetricsStep(Step):
    """``/metrics`` (Prometheus) and ``/healthz`` (the core's health as JSON) over HTTP."""

    def __init__(self, config: WorkerConfig, reactor: Any, core: WorkerCore, metrics: WorkerMetrics):
        self.setName("metrics")
        self.config = config
        self.reactor = reactor
        self.core = core
        self.metrics = metrics
        self.listening: Any = None

    async def start(self) -> None:
        from twisted.internet.endpoints import quoteStringArgument, serverFromString
        from twisted.internet.error import CannotListenError
        from twisted.web.server import Site

        host, port = self.config.host, self.config.metrics_port
        endpoint = serverFromString(self.reactor, f"tcp:{port}:interface={quoteStringArgument(host)}")
        try:
            self.listening = await endpoint.listen(Site(_metrics_resource(self.metrics, self.core)))
        except CannotListenError as exc:
            raise StartupError(f"cannot listen on {host}:{port} for metrics: {exc.socketError}") from None

    @property
    def port(self) -> int:
        return self.listening.getHost().port

    async def stop(self) -> None:
        if self.listening is not None:
            await maybeDeferred(self.listening.stopListening)


class WorkerService(MultiService):
    """The worker's tree. ``ready`` fires once every child is up (or fails with ``StartupError``,
    after the children already up were stopped again); ``stopService`` is the planned shutdown."""

    def __init__(self, config: WorkerConfig, reactor: Any, core: WorkerCore, tracing: Tracing,
                 metrics: WorkerMetrics):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.core = core
        self.tracing = tracing
        self.metrics = metrics
        self.ready: Deferred | None = None
        self._up: list[Service] = []
        self._stopping: Deferred | None = None
        self._stopped = False
        self._stop_waiters: list[Deferred] = []

    def startService(self) -> None:
        Service.startService(self)
        self.ready = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        for child in self:
            child.startService()
            self._up.append(child)
            started = getattr(child, "started", None)  # a Step's; a plain Service has none
            try:
                if started is not None:
                    await started
            except StartupError:
                self._up.remove(child)
                await self._stop_children()
                raise

    def stopService(self) -> Deferred:
        """Drain, then stop the children in reverse (idempotent: a second call gets the same stop)."""
        return self.shutdown(drain=True)

    @property
    def stopping(self) -> bool:
        return self._stopping is not None

    def shutdown(self, *, drain: bool) -> Deferred:
        """Start the stop sequence (once); the Deferred fires when it has ended."""
        if self._stopping is None:
            Service.stopService(self)
            self._stopping = Deferred.fromCoroutine(self._stop(drain))
            self._stopping.addBoth(self._ended)
        return self.when_stopped()

    def when_stopped(self) -> Deferred:
        """Fires once the stop sequence has ended (each caller gets its own Deferred)."""
        d: Deferred = Deferred()
        if self._stopped:
            d.callback(None)
        else:
            self._stop_waiters.append(d)
        return d

    def _ended(self, result: object) -> None:
        if hasattr(result, "getErrorMessage"):
            log.error("error while stopping the worker: %s", result.getErrorMessage())
        self._stopped = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _stop(self, drain: bool) -> None:
        if self.ready is not None and not self.ready.called:
            self.ready.cancel()  # stopped while starting: the start ends, then the parts up stop
        if drain and "core" in [c.name for c in self._up]:
            await Deferred.fromCoroutine(self.core.drain(self.config.drain_grace_s))
        else:
            self.core.stop_admitting()
        await self._stop_children()

    async def _stop_children(self) -> None:
        while self._up:
            child = self._up.pop()
            try:
                await maybeDeferred(child.stopService)
            except Exception:  # noqa: BLE001 - the rest must still stop
                log.exception("error while stopping the worker's %s", child.name)

    def cancel_running(self, reason: str = "worker shutting down") -> None:
        self.core.cancel_all(reason)

    @property
    def grpc_port(self) -> int:
        return self.getServiceNamed("grpc").port

    @property
    def metrics_port(self) -> int | None:
        try:
            return self.getServiceNamed("metrics").port
        except KeyError:
            return None


def make_worker_service(config: WorkerConfig, reactor: Any, *, engine: Any = None) -> WorkerService:
    """The worker's service tree (not started). ``engine``: an engine to host instead of a new one.

    Raises ``StartupError`` when the engine cannot be built."""
    if engine is None:
        from omnirt.engine.engine import Engine

        try:
            engine = Engine(backend=config.backend, pipeline_cache_size=config.pipeline_cache_size,
                            model_paths=config.model_paths or None, worker_id=config.worker_id,
                            max_concurrency=config.max_concurrency, adapter_dirs=config.adapter_dirs,
                            options=config.engine_options)
        except (ValueError, OSError) as exc:
            raise StartupError(f"cannot start the engine: {exc}") from None
    metrics = WorkerMetrics()
    tracing = Tracing(SERVICE_WORKER, endpoint=config.otlp_endpoint, headers=config.otlp_headers,
                      resource_attributes={"omnirt.worker_id": config.worker_id},
                      failure_counter=metrics.trace_export_failures)
    core = WorkerCore(engine, reactor, worker_id=config.worker_id, capacity=config.job_capacity,
                      models=config.models, tags=config.tags, backend=config.backend, metrics=metrics,
                      tracing=tracing, upstream_compat=Compat(config.allow_paths, config.output_dir),
                      max_queue=config.max_queue)
    service = WorkerService(config, reactor, core, tracing, metrics)
    TracingStep(tracing, reactor).setServiceParent(service)
    if config.redis_url:
        StoreStep(config, reactor, core).setServiceParent(service)
    CoreStep(core).setServiceParent(service)
    GrpcStep(config, reactor, core).setServiceParent(service)
    if config.metrics_port is not None:
        MetricsStep(config, reactor, core, metrics).setServiceParent(service)
    return service


def serve_until_stopped(service: WorkerService, reactor: Any) -> str | None:
    """Run the reactor with ``service`` until SIGTERM/SIGINT ends the planned shutdown.

    The first signal drains; a second cancels the running jobs at once. Prints the readiness
    lines once every part is up. Returns None, or the one-line reason the worker could not start.
    """
    error: list[str] = []
    config = service.config

    def on_signal(sig: int) -> None:
        if not service.stopping:
            print(f"omnirt worker {config.worker_id}: {signal.Signals(sig).name}, draining "
                  f"(up to {config.drain_grace_s:g}s)", file=sys.stderr, flush=True)
            service.stopService()  # the reactor stops when the sequence has ended
        else:
            print(f"omnirt worker {config.worker_id}: cancelling running jobs now", file=sys.stderr, flush=True)
            service.cancel_running()

    def started(_: None) -> None:
        core = service.core
        mport = service.metrics_port
        if mport is not None:
            print(f"omnirt worker {config.worker_id} metrics on http://{format_address(config.host, mport)}/metrics",
                  flush=True)
        print(f"omnirt worker {config.worker_id}: backend {core.backend}, capacity {core.capacity}, "
              f"models {','.join(core.models) or 'all'}, tags {','.join(core.tags) or '-'}", flush=True)
        # the readiness line (tests and supervisors wait for it): keep its format exactly
        print(f"omnirt worker {config.worker_id} listening on {format_address(config.host, service.grpc_port)}",
              flush=True)

    def failed(failure) -> None:
        if failure.check(StartupError):
            error.append(str(failure.value))
        elif failure.check(CancelledError):
            return  # stopped by a signal while starting
        else:
            log.error("worker startup failed", exc_info=failure.value)
            error.append(f"worker startup failed: {type(failure.value).__name__}: {failure.value}")
        service.shutdown(drain=False)

    def begin() -> None:
        # runs inside the asyncio loop (callWhenRunning runs before it): grpc.aio runs on it
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        service.startService()
        assert service.ready is not None
        service.ready.addCallbacks(started, failed)

        def stopped(_: object) -> None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            reactor.stop()

        service.when_stopped().addBoth(stopped)

    reactor.callLater(0, begin)
    reactor.run(installSignalHandlers=False)
    return error[0] if error else None


def _metrics_resource(metrics: WorkerMetrics, core: WorkerCore):
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from twisted.web.resource import Resource

    from omnirt.workers.servicer import health_json

    class _Leaf(Resource):
        isLeaf = True

        def __init__(self, render_body, content_type: bytes):
            super().__init__()
            self._render_body = render_body
            self._content_type = content_type

        def render_GET(self, request):
            request.setHeader(b"content-type", self._content_type)
            return self._render_body()

    root = Resource()
    root.putChild(b"metrics", _Leaf(metrics.render, CONTENT_TYPE_LATEST.encode()))
    # always 200 while the process serves (liveness); "ok"/"state" say whether it takes jobs
    root.putChild(b"healthz", _Leaf(lambda: health_json(core.health()), b"application/json"))
    return root
