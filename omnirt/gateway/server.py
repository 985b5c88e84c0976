"""The gateway process: one service tree on one reactor, started and stopped in order."""

from __future__ import annotations

import asyncio
import sys

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.python import log

from omnirt.gateway.app import GatewayAPI
from omnirt.gateway.auth import ApiKeys
from omnirt.gateway.http import GatewaySite
from omnirt.jobs.dispatcher import Dispatcher
from omnirt.jobs.leases import GatewayLease
from omnirt.jobs.limits import RateLimiter
from omnirt.jobs.service import JobService
from omnirt.store.artifacts import ArtifactStore, RedisArtifactStore
from omnirt.store.base import StoreUnavailable
from omnirt.store.instrumented import InstrumentedStore
from omnirt.store.memory import MemoryJobStore
from omnirt.telemetry.logging import install_logging
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.telemetry.tracing import SERVICE_GATEWAY, Tracing
from omnirt.workers.pool import WorkerPool


def default_gateway_id(port: int) -> str:
    import socket
    import uuid

    return f"{socket.gethostname()}-{port}-{uuid.uuid4().hex[:6]}"


class StartupError(Exception):
    """A one-line reason the gateway cannot start (exit status 2)."""


class Gateway:
    def __init__(self, *, host, port, backend, max_concurrency, pipeline_cache_size, allowed_tiers, api_keys: ApiKeys,
                 remote_specs, local_worker, max_queue, artifact_dir, model_paths, max_body_bytes, shutdown_grace_s,
                 job_retention_s, max_attempts, health_interval_s, health_failure_threshold, keepalive_s,
                 worker_idle_timeout_s=10.0, redis_url=None, redis_namespace="omnirt", gateway_id=None,
                 lease_ttl_s=10.0, request_deadline_s=30.0, worker_tls=None, access_log=False, rate_limit=None,
                 max_jobs_per_key=None, fleet=None, fleet_stop_on_exit=False, otlp_endpoint=None, otlp_headers=None,
                 log_format="text", public_url=None, reactor=None, job_store_max_bytes=None):
        self.reactor = reactor or global_reactor
        #: OTLP/HTTP traces URL (None: spans are made for the trace view but not exported)
        self.otlp_endpoint = otlp_endpoint
        self.otlp_headers = dict(otlp_headers or {})
        self.log_format = log_format
        self.tracing = None
        self.host = host
        self.port = port
        self.backend = backend
        self.max_concurrency = max_concurrency
        self.pipeline_cache_size = pipeline_cache_size
        self.allowed_tiers = allowed_tiers
        self.api_keys = api_keys
        self.remote_specs = remote_specs
        self.local_worker = local_worker
        self.max_queue = max_queue
        self.artifact_dir = artifact_dir
        self.model_paths = model_paths
        self.max_body_bytes = max_body_bytes
        self.shutdown_grace_s = shutdown_grace_s
        self.job_retention_s = job_retention_s
        self.job_store_max_bytes = job_store_max_bytes
        self.max_attempts = max_attempts
        self.health_interval_s = health_interval_s
        self.health_failure_threshold = health_failure_threshold
        self.keepalive_s = keepalive_s
        self.worker_idle_timeout_s = worker_idle_timeout_s
        self.redis_url = redis_url
        self.redis_namespace = redis_namespace
        self.gateway_id = gateway_id or default_gateway_id(port)
        self.lease_ttl_s = lease_ttl_s
        self.request_deadline_s = request_deadline_s
        #: omnirt.workers.tls.ClientTLS for remote workers, or None (plaintext)
        self.worker_tls = worker_tls
        self.rate_limit = rate_limit
        self.max_jobs_per_key = max_jobs_per_key
        self.access_log = access_log
        self.public_url = public_url
        self.lease = None
        self._cancel_watch = None
        self.exit_code = 0
        self.listening_port = None
        self.connections = []
        #: omnirt.fleet.Fleet of ``--fleet`` (workers under a local supervisord) and its gateway side
        self.fleet = fleet
        self.fleet_stop_on_exit = fleet_stop_on_exit
        self.gateway_fleet = None

    # -- building ----------------------------------------------------------------------------

    def _local_connection(self):
        from omnirt.engine.engine import Engine
        from omnirt.workers.local import LocalWorkerConnection

        engine = Engine(backend=self.backend, pipeline_cache_size=self.pipeline_cache_size,
                        model_paths=self.model_paths, worker_id="local", max_concurrency=self.max_concurrency)
        conn = LocalWorkerConnection(engine, self.reactor, worker_id="local", capacity=self.max_concurrency,
                                     tracing=self.tracing)
        conn.start()
        return conn

    async def _remote_connections(self):
        from omnirt.workers.grpc import GrpcWorkerConnection, probe

        conns = []
        for spec in self.remote_specs:
            address = spec.address
            try:
                await Deferred.fromFuture(asyncio.ensure_future(probe(address, 5.0, self.worker_tls)))
            except Exception as exc:  # noqa: BLE001 - any failure is "unreachable"
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise StartupError(f"remote worker {spec.worker_id} at {address} is unreachable: {reason}") from None
            conns.append(GrpcWorkerConnection(spec.worker_id, address, models=spec.models, tags=spec.tags,
                                              idle_timeout_s=self.worker_idle_timeout_s, tls=self.worker_tls))
        return conns

    async def _fleet_connections(self):
        """Start or adopt the fleet's supervisord; its workers are registered even if not up yet."""
        from omnirt.fleet import FleetError, GatewayFleet

        self.gateway_fleet = GatewayFleet(self.fleet, self.reactor, stop_on_exit=self.fleet_stop_on_exit,
                                          worker_idle_timeout_s=self.worker_idle_timeout_s)
        try:
            return await self.gateway_fleet.start()
        except FleetError as exc:
            raise StartupError("; ".join(exc.lines())) from None

    async def start(self) -> None:
        clock = self.reactor
        self.metrics = GatewayMetrics()
        self.tracing = Tracing(SERVICE_GATEWAY, endpoint=self.otlp_endpoint, headers=self.otlp_headers,
                               resource_attributes={"omnirt.gateway_id": self.gateway_id},
                               failure_counter=self.metrics.trace_export_failures)
        if self.redis_url:
            from omnirt.store.redis import RedisJobStore

            try:
                raw_store = RedisJobStore(clock, url=self.redis_url, namespace=self.redis_namespace,
                                          retention_s=self.job_retention_s, gateway_id=self.gateway_id)
            except ValueError as exc:
                raise StartupError(f"bad --redis-url: {exc}") from None
            try:
                await raw_store.connect()
            except StoreUnavailable as exc:
                raise StartupError(str(exc)) from None
            self.artifacts = RedisArtifactStore(raw_store)
        else:
            self.artifacts = ArtifactStore(self.artifact_dir, self.reactor, self.reactor.getThreadPool())
            raw_store = MemoryJobStore(clock, retention_s=self.job_retention_s, artifacts=self.artifacts,
                                       max_bytes=self.job_store_max_bytes, registry=self.metrics.registry)
        self.store = InstrumentedStore(raw_store, self.metrics)
        if self.remote_specs:
            self.connections.extend(await self._remote_connections())
        if self.fleet is not None:
            self.connections.extend(await self._fleet_connections())
        if self.local_worker:
            self.connections.append(self._local_connection())
        self.pool = WorkerPool(clock, self.connections, health_interval_s=self.health_interval_s,
                               failure_threshold=self.health_failure_threshold)
        self.dispatcher = Dispatcher(clock=clock, store=self.store, pool=self.pool, artifacts=self.artifacts,
                                     metrics=self.metrics, max_attempts=self.max_attempts, tracing=self.tracing)
        self.service = JobService(clock=clock, store=self.store, dispatcher=self.dispatcher,
                                  allowed_tiers=self.allowed_tiers, max_queue=self.max_queue,
                                  default_backend=self.backend, max_jobs_per_principal=self.max_jobs_per_key)
        await self.pool.start()
        if self.gateway_fleet is not None:
            self.gateway_fleet.watch(self.pool)
        self.service.start()
        if self.store.shared:
            self.lease = GatewayLease(clock=clock, store=self.store, dispatcher=self.dispatcher,
                                      gateway_id=self.gateway_id, ttl_s=self.lease_ttl_s)
            self.lease.start()
            self._cancel_watch = self.dispatcher.watch_remote_cancels()
        self.api = GatewayAPI(service=self.service, metrics=self.metrics, reactor=self.reactor,
                              api_keys=self.api_keys, keepalive_s=self.keepalive_s, public_url=self.public_url,
                              rate_limiter=RateLimiter(clock, self.rate_limit) if self.rate_limit else None,
                              readiness=self.gateway_fleet.readiness if self.gateway_fleet is not None else None)
        self.http_resource = self.api.resource()
        site = GatewaySite(self.http_resource, clock=self.reactor, max_body_bytes=self.max_body_bytes,
                           request_deadline_s=self.request_deadline_s, access_log=self.access_log)
        try:
            self.listening_port = self.reactor.listenTCP(self.port, site, interface=self.host)
        except Exception as exc:  # noqa: BLE001 - CannotListenError and friends
            raise StartupError(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        bound = self.listening_port.getHost()
        store = raw_store.target.redacted if self.redis_url else "memory"
        print(f"omnirt serve listening on http://{self.host}:{bound.port} "
              f"(gateway {self.gateway_id}, store {store}, workers: {', '.join(c.worker_id for c in self.connections)})",
              flush=True)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)

    async def _shutdown_async(self) -> None:
        if self.listening_port is not None:
            await self.listening_port.stopListening()
        print(f"omnirt serve: shutting down (grace {self.shutdown_grace_s:g}s)", flush=True)
        await self.service.shutdown(self.shutdown_grace_s)
        # let answers to requests whose jobs just ended go out (bounded)
        for _ in range(100):
            if not self.http_resource.inflight:
                break
            await deferLater(self.reactor, 0.05, lambda: None)
        self.pool.stop()
        if self._cancel_watch is not None and self._cancel_watch.running:
            self._cancel_watch.stop()
        if self.lease is not None:
            self.lease.stop()
            try:  # let the other gateways adopt what is left at once
                await self.store.refresh_lease(self.gateway_id, 0.001)
            except StoreUnavailable:
                pass
        await DeferredList([c.close() for c in self.connections], consumeErrors=True)
        if self.gateway_fleet is not None:
            await self.gateway_fleet.stop()  # leaves the fleet running unless --fleet-stop-on-exit
        await self.store.close()
        if self.tracing is not None:  # flush the last spans off the reactor thread, bounded
            await self.tracing.shutdown(self.reactor, max(0.5, min(5.0, self.shutdown_grace_s)))

    def _shutdown(self) -> Deferred:
        d = Deferred.fromCoroutine(self._shutdown_async())
        d.addErrback(log.err, "error during shutdown")
        return d

    # -- running -----------------------------------------------------------------------------

    def run_forever(self) -> int:
        def begin():
            d = Deferred.fromCoroutine(self.start())

            def failed(f):
                if f.check(StartupError):
                    print(f"error: {f.value}", file=sys.stderr, flush=True)
                else:
                    log.err(f, "gateway failed to start")
                    print(f"error: gateway failed to start: {f.value}", file=sys.stderr, flush=True)
                self.exit_code = 2
                self.reactor.stop()

            d.addErrback(failed)

        if self.max_concurrency < 1:
            raise StartupError("--max-concurrency must be at least 1")
        install_logging(self.log_format, stream=sys.stderr,
                        trace_lookup=lambda job_id: self.tracing.trace_id_for(job_id) if self.tracing else None)
        # callLater(0): callWhenRunning fires before the asyncio loop runs (grpc.aio needs it running)
        self.reactor.callLater(0, begin)
        self.reactor.run()
        return self.exit_code
