"""The composition root: ``make_gateway_service`` builds the gateway's whole service tree from a
``GatewayConfig`` in one place.

Children start in order, each once the one before it is up — telemetry, store, webhook deliverer,
retention sweep, worker pool (first probe of every worker awaited), dispatcher, remote-cancel
watch, lease, fleet watcher, HTTP endpoint — and stop in reverse. Stopping is the planned drain: stop listening and
admitting, let running jobs finish within the grace, cancel (or, with a shared store, requeue)
the rest, let the answers go out, then stop the children in reverse: lease, dispatcher (waits for
its tracked work), worker links, webhook deliverer (in-flight attempts handed back to the outbox),
store last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.python import log

from omnirt.config.serve import GatewayConfig
from omnirt.gateway.app import GatewayAPI
from omnirt.gateway.http import GatewaySite
from omnirt.jobs.dispatcher import Dispatcher
from omnirt.jobs.leases import GatewayLease
from omnirt.jobs.limits import RateLimiter
from omnirt.jobs.service import JobService
from omnirt.jobs.transitions import JobTransitions
from omnirt.store.artifacts import ArtifactStore, RedisArtifactStore
from omnirt.store.base import JobStore, StoreUnavailable
from omnirt.store.instrumented import InstrumentedStore
from omnirt.store.memory import MemoryJobStore
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.telemetry.tracing import SERVICE_GATEWAY, Tracing
from omnirt.webhooks.deliverer import WebhookDeliverer
from omnirt.webhooks.metrics import WebhookMetrics
from omnirt.webhooks.service import WebhookService
from omnirt.workers.pool import WorkerPool

if TYPE_CHECKING:
    from omnirt.fleet import GatewayFleet
    from omnirt.store.redis import RedisJobStore

#: how long shutdown waits for the answers of requests whose jobs just ended
ANSWER_GRACE_S = 5.0


class StartupError(Exception):
    """A one-line reason the gateway cannot start (exit status 2)."""


class Step(Service):
    """A child whose start and stop are coroutines (the parent awaits each before the next)."""

    def __init__(self, name: str, start: Callable[[], Awaitable[Any]] | None = None,
                 stop: Callable[[], Awaitable[Any]] | None = None):
        self.setName(name)
        self._start = start
        self._stop = stop

    def startService(self):
        super().startService()
        if self._start is not None:
            return Deferred.fromCoroutine(_awaited(self._start()))
        return None

    def stopService(self):
        super().stopService()
        if self._stop is not None:
            return Deferred.fromCoroutine(_awaited(self._stop()))
        return None


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value


class OrderedService(MultiService):
    """A MultiService whose children start one after another (a child's startService may return a
    Deferred) and stop in reverse, each awaited. ``started`` fires once all are up, or fails with
    the first child's failure (the children already up are stopped again)."""

    def __init__(self) -> None:
        super().__init__()
        self.started: Deferred = Deferred()
        self._up: list[Service] = []

    def startService(self):
        Service.startService(self)
        d = Deferred.fromCoroutine(self._start_children())
        d.chainDeferred(self.started)

    async def _start_children(self) -> None:
        for child in list(self):
            try:
                await maybeDeferred(child.startService)
            except BaseException:
                self._up.append(child)  # half-started: stopped with the others
                await self._stop_children()
                raise
            self._up.append(child)

    async def _stop_children(self) -> None:
        while self._up:
            child = self._up.pop()
            try:
                await maybeDeferred(child.stopService)
            except Exception:  # noqa: BLE001 - stop the others anyway
                log.err(None, f"stopping {child.name} failed")

    def stopService(self):
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())


class GatewayService(OrderedService):
    """The gateway's service tree; its parts are attributes for tests and for the routes."""

    def __init__(self, config: GatewayConfig, reactor, *, connections: Iterable[Any] | None = None,
                 threadpool=None, metrics: GatewayMetrics | None = None, clock=None,
                 announce: Callable[[str], None] | None = None, webhook_http=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        clock = clock or reactor
        self.clock = clock
        self.gateway_id = config.id
        #: where the "listening on" and "shutting down" lines go (stdout)
        self.announce = announce or (lambda line: print(line, flush=True))
        self.metrics = metrics or GatewayMetrics()
        self.tracing = Tracing(SERVICE_GATEWAY, endpoint=config.otlp_endpoint, headers=config.otlp_headers,
                               resource_attributes={"omnirt.gateway_id": self.gateway_id},
                               failure_counter=self.metrics.trace_export_failures)
        self.listening_port: IListeningPort | None = None
        self.gateway_fleet: GatewayFleet | None = None
        #: every child started (set once ``started`` fired with success)
        self.up = False
        self.started.addCallback(self._mark_up)
        self._injected = connections is not None
        self._build_store(threadpool)
        self.connections: list[Any] = list(connections) if connections is not None else self._worker_connections()
        self.pool = WorkerPool(clock, self.connections, health_interval_s=config.health_interval_s,
                               failure_threshold=config.health_failure_threshold)
        self.transitions = JobTransitions(clock=clock, store=self.store, metrics=self.metrics, tracing=self.tracing,
                                          gateway_id=self.gateway_id)
        self.dispatcher = Dispatcher(clock=clock, store=self.store, pool=self.pool, artifacts=self.artifacts,
                                     metrics=self.metrics, max_attempts=config.max_attempts,
                                     transitions=self.transitions)
        self.service = JobService(clock=clock, store=self.store, dispatcher=self.dispatcher,
                                  allowed_tiers=config.allowed_tiers, max_queue=config.max_queue,
                                  default_backend=config.backend, max_jobs_per_principal=config.max_jobs_per_key,
                                  retention_sweep_s=config.retention_sweep_s, adapter_check=self._adapter_check())
        self.lease: GatewayLease | None = None
        if self.store.shared:
            self.lease = GatewayLease(clock=clock, store=self.store, dispatcher=self.dispatcher,
                                      gateway_id=self.gateway_id, ttl_s=config.lease_ttl_s)
            self.lease.on_store_lost = self.service.store_lost
        #: drains the store's webhook outbox (claims under a lease, so gateways sharing a store
        #: never send one entry twice at once)
        self.webhooks = WebhookDeliverer(reactor=clock, store=self.store, settings=config.webhooks,
                                         owner=self.gateway_id, metrics=WebhookMetrics(self.metrics.registry),
                                         http=webhook_http)
        self.api = GatewayAPI(service=self.service, metrics=self.metrics, reactor=clock,
                              api_keys=config.api_keys, keepalive_s=config.keepalive_s,
                              public_url=config.public_url, webhooks=WebhookService(self.store, self.webhooks),
                              webhook_allow_private=config.webhooks.allow_private,
                              rate_limiter=RateLimiter(clock, config.rate_limit) if config.rate_limit else None)
        self.http_resource = self.api.resource()
        self.site = GatewaySite(self.http_resource, clock=clock, max_body_bytes=config.max_body_bytes,
                                request_deadline_s=config.request_deadline_s, access_log=config.access_log)

        # the tree, in start order
        Step("telemetry", stop=self._stop_telemetry).setServiceParent(self)
        Step("store", self._start_store, self.store.close).setServiceParent(self)
        # after the store (leftover entries of an earlier run go out at once); stopped just before
        # it, after the drain, handing in-flight attempts back to the outbox
        self.webhooks.setServiceParent(self)
        self.service.sweep.setName("retention-sweep")
        self.service.sweep.setServiceParent(self)
        Step("workers", self._start_workers, self._stop_workers).setServiceParent(self)
        Step("dispatcher", self._start_dispatcher, self._stop_dispatcher).setServiceParent(self)
        if self.lease is not None:
            watch = self.dispatcher.remote_cancel_watch()
            watch.setName("remote-cancels")
            watch.setServiceParent(self)
            Step("lease", self._start_lease, self.lease.stop).setServiceParent(self)
        if config.fleet is not None:
            Step("fleet", self._watch_fleet, self._stop_fleet).setServiceParent(self)
        Step("http", self._listen, self._stop_answering).setServiceParent(self)

    def _mark_up(self, result):
        self.up = True
        return result

    # -- building ----------------------------------------------------------------------------

    def _build_store(self, threadpool) -> None:
        config = self.config
        raw: MemoryJobStore | RedisJobStore
        self.artifacts: ArtifactStore | RedisArtifactStore
        if config.redis_url:
            from omnirt.store.redis import RedisJobStore

            try:
                raw = RedisJobStore(self.clock, url=config.redis_url, namespace=config.redis_namespace,
                                    retention_s=config.job_retention_s, gateway_id=self.gateway_id,
                                    min_replicas=config.redis_min_replicas,
                                    wait_timeout_s=config.redis_wait_timeout_s, metrics=self.metrics)
            except ValueError as exc:
                raise StartupError(f"bad --redis-url: {exc}") from None
            self.store_label = raw.target.redacted
            self.artifacts = RedisArtifactStore(raw)
        else:
            pool = threadpool if threadpool is not None else self.reactor.getThreadPool()
            self.artifacts = ArtifactStore(config.artifact_dir, self.reactor, pool)
            raw = MemoryJobStore(self.clock, retention_s=config.job_retention_s, artifacts=self.artifacts,
                                 max_bytes=config.job_store_max_bytes, registry=self.metrics.registry)
            self.store_label = "memory"
        #: the outbox throttles progress webhooks per job (latest progress wins)
        raw.webhook_progress_interval_ms = config.webhooks.progress_interval_ms
        self.raw_store = raw
        # InstrumentedStore forwards every JobStore method to ``raw`` (timing each): it is one
        self.store = cast(JobStore, InstrumentedStore(raw, self.metrics))

    def _worker_connections(self) -> list[Any]:
        config = self.config
        conns: list[Any] = []
        if config.remote_specs:
            from omnirt.workers.grpc import GrpcWorkerConnection

            conns.extend(GrpcWorkerConnection(spec.worker_id, spec.address, models=spec.models, tags=spec.tags,
                                              idle_timeout_s=config.worker_idle_timeout_s, tls=config.worker_tls,
                                              upstream_options=config.upstream_options)
                         for spec in config.remote_specs)
        if config.local_worker:
            from omnirt.engine.engine import Engine
            from omnirt.workers.local import LocalWorkerConnection

            engine = Engine(backend=config.backend, pipeline_cache_size=config.pipeline_cache_size,
                            model_paths=config.model_paths, worker_id="local", max_concurrency=config.max_concurrency,
                            adapter_dirs=config.adapter_dirs, options=config.engine_options)
            conns.append(LocalWorkerConnection(engine, self.reactor, worker_id="local",
                                               capacity=config.job_capacity, tracing=self.tracing))
        return conns

    def _adapter_check(self):
        """The in-process engine's adapter folders when it is the only worker: a request's adapters
        are then checked at submit (400); None when workers check their own ``--adapter-dir``."""
        config = self.config
        if self._injected or not config.local_worker or config.remote_specs or config.fleet is not None:
            return None
        from omnirt.engine.adapters import AdapterDirs

        return AdapterDirs(config.adapter_dirs)

    # -- starting ----------------------------------------------------------------------------

    async def _start_store(self) -> None:
        from omnirt.store.redis import RedisJobStore

        raw = self.raw_store
        if not isinstance(raw, RedisJobStore):
            return
        try:
            await raw.connect()
            # a namespace written by upstream OmniRT 0.1 (a JSON string per job) cannot be shared
            problem = await raw.find_upstream_records()
        except StoreUnavailable as exc:
            raise StartupError(str(exc)) from None
        if problem is not None:
            raise StartupError(problem)  # the store is closed with the children already up

    async def _start_workers(self) -> None:
        """Check each remote worker answers, adopt the fleet, start the local engine, then wait for
        the first probe of every worker (so nothing reads a worker as ``unknown`` after start)."""
        config = self.config
        if config.remote_specs and not self._injected:
            await self._probe_remotes()
        if config.fleet is not None:
            for conn in await self._fleet_connections():
                self.connections.append(conn)
                self.pool.add(conn)
        for conn in self.connections:
            start = getattr(conn, "start", None)
            if start is not None:
                start()
        await self.pool.start()

    async def _probe_remotes(self) -> None:
        """Each remote worker must answer before the gateway starts (StartupError otherwise)."""
        from omnirt.workers.grpc import probe

        for spec in self.config.remote_specs:
            try:
                health = await Deferred.fromFuture(
                    asyncio.ensure_future(probe(spec.address, 5.0, self.config.worker_tls)))
            except Exception as exc:  # noqa: BLE001 - any failure is "unreachable"
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise StartupError(f"remote worker {spec.worker_id} at {spec.address} is unreachable: {reason}") from None
            # what it answered counts as its first health (one lost probe after it is then tolerated)
            self.pool.record_health(spec.worker_id, health)

    async def _fleet_connections(self) -> list[Any]:
        """Start or adopt the fleet's supervisord; its workers are registered even if not up yet."""
        from omnirt.fleet import FleetError, GatewayFleet

        fleet = GatewayFleet(self.config.fleet, self.reactor, stop_on_exit=self.config.fleet_stop_on_exit,
                             worker_idle_timeout_s=self.config.worker_idle_timeout_s)
        self.gateway_fleet = fleet
        self.api.readiness = fleet.readiness
        try:
            return await fleet.start()
        except FleetError as exc:
            raise StartupError("; ".join(exc.lines())) from None

    async def _start_dispatcher(self) -> None:
        self.dispatcher.pump()

    async def _start_lease(self) -> None:
        if self.lease is not None:
            self.lease.start()

    async def _watch_fleet(self) -> None:
        if self.gateway_fleet is not None:
            self.gateway_fleet.watch(self.pool)

    async def _listen(self) -> None:
        config = self.config
        host = config.host.replace(":", "\\:")
        endpoint = serverFromString(self.reactor, f"tcp:{config.port}:interface={host}")
        try:
            port = await endpoint.listen(self.site)
        except Exception as exc:  # noqa: BLE001 - CannotListenError and friends
            raise StartupError(f"cannot listen on {config.host}:{config.port}: {exc}") from None
        self.listening_port = port
        bound = port.getHost()
        self.announce(f"omnirt serve listening on http://{config.host}:{bound.port} "
                      f"(gateway {self.gateway_id}, store {self.store_label}, "
                      f"workers: {', '.join(c.worker_id for c in self.connections)})")

    # -- stopping ----------------------------------------------------------------------------

    def stopService(self):
        Service.stopService(self)
        return Deferred.fromCoroutine(self._drain_and_stop())

    async def _drain_and_stop(self) -> None:
        """The planned shutdown: stop listening and admitting, drain the jobs (grace), then the
        children in reverse (answers out, lease, dispatcher's tracked work, worker links, store)."""
        grace = self.config.shutdown_grace_s
        if self.listening_port is not None:
            port, self.listening_port = self.listening_port, None
            await maybeDeferred(port.stopListening)
        if self.up:
            self.announce(f"omnirt serve: shutting down (grace {grace:g}s)")
            await self.service.shutdown(grace)
        await self._stop_children()

    async def _stop_answering(self) -> None:
        """Let the answers of requests whose jobs just ended go out (bounded)."""
        await self.site.when_idle(ANSWER_GRACE_S)

    async def _stop_dispatcher(self) -> None:
        # worker events still waiting for the store get the grace, then are counted as lost
        await Deferred.fromCoroutine(self.dispatcher.writes.flush(ANSWER_GRACE_S))
        await self.dispatcher.tasks.wait(self.clock, ANSWER_GRACE_S)

    async def _stop_workers(self) -> None:
        await self.pool.stop()
        await DeferredList([maybeDeferred(c.close) for c in self.connections], consumeErrors=True)

    async def _stop_fleet(self) -> None:
        if self.gateway_fleet is not None:
            await self.gateway_fleet.stop()  # leaves the fleet running unless --fleet-stop-on-exit

    async def _stop_telemetry(self) -> None:
        if self.config.otlp_endpoint is None:
            return  # nothing is exported: nothing to flush
        # flush the last spans off the reactor thread, bounded
        await self.tracing.shutdown(self.reactor, max(0.5, min(5.0, self.config.shutdown_grace_s)))


def make_gateway_service(config: GatewayConfig, reactor, **parts: Any) -> GatewayService:
    """The gateway's service tree. ``parts`` replace what the config would build (tests pass
    ``connections=`` fake workers, ``threadpool=`` a synchronous pool, ``clock=``,
    ``webhook_http=`` a scripted webhook client)."""
    return GatewayService(config, reactor, **parts)
