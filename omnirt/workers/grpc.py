"""The gateway side of the gRPC contract: ``GrpcWorkerConnection`` reaches one ``omnirt worker``.

Each job is one grpc.aio coroutine (the whole stream is read inside it) bridged to Twisted once
with ``Deferred.fromFuture(asyncio.ensure_future(...))``; it runs on the asyncio reactor's loop,
so ``on_update`` is called on the reactor thread. Errors map onto the WorkerConnection contract:

=====================================================  =====================
what happened                                          ``run`` fails with
=====================================================  =====================
the worker's final update says the job failed          ``JobFailed``
the worker rejected the job's input (bad image, no      ``JobRejected``
such backend on its host; INVALID_ARGUMENT)
the worker's final update says the job was cancelled   ``JobCancelled``
the worker stopped the job itself (drain deadline)     ``WorkerLost``
RESOURCE_EXHAUSTED, or UNAVAILABLE because draining    ``WorkerBusy``
(or starting), FAILED_PRECONDITION (model not served)
connection refused, stream dropped, no update (event   ``WorkerLost``
or heartbeat) for ``idle_timeout_s``
=====================================================  =====================

A worker that answers UNIMPLEMENTED for ``Run`` (an old worker) is driven with the unary
``RunSync`` from then on, for that connection (no progress events; ``job_started`` is emitted
here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from omnirt.engine.base import JobCancelled, JobFailed, JobRejected, RunOutcome
from omnirt.telemetry.tracing import spans_from_json
from omnirt.workers import upstream, wire
from omnirt.workers.base import WorkerBusy, WorkerHealth, WorkerJob, WorkerLost, WorkerUpdate
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2_grpc as pb_grpc
from omnirt.workers.tls import ClientTLS, secure_or_insecure_channel

__all__ = ["CHANNEL_OPTIONS", "GrpcWorkerConnection", "probe"]

T = TypeVar("T")
log = Logger()

#: trailing metadata key the worker sets on a refusal (see omnirt.workers.servicer.REFUSAL_KEY)
REFUSAL_KEY = "omnirt-refusal"

CHANNEL_OPTIONS = (
    *wire.MESSAGE_SIZE_OPTIONS,
    # a restarted worker is found again within about 2 s (the default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # each connection keeps its own subchannels: gRPC otherwise shares them, reconnect backoff
    # included, between channels with the same address and options, so a new connection to a
    # worker restarted at a dead one's address failed while an older channel was backing off
    ("grpc.use_local_subchannel_pool", 1),
)

_BUSY_CODES = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}
)


def _loop() -> asyncio.AbstractEventLoop:
    """The loop grpc.aio must run on: the running one, else the asyncio reactor's."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        from twisted.internet import reactor

        loop = getattr(reactor, "_asyncioEventloop", None)
        if loop is None:
            raise RuntimeError("GrpcWorkerConnection needs the asyncio Twisted reactor") from None
        return loop


def _bridge(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    """One asyncio task as a Deferred; cancelling the Deferred cancels the task (Twisted's CancelledError)."""
    d = Deferred.fromFuture(asyncio.ensure_future(coro, loop=_loop()))
    return d.addErrback(_twisted_cancel)


def _twisted_cancel(failure: Failure) -> Failure:
    if failure.check(asyncio.CancelledError):
        return Failure(CancelledError(*failure.value.args))
    return failure


def _metadata(job: WorkerJob) -> tuple[tuple[str, str], ...]:
    """W3C trace context (traceparent/tracestate) as call metadata (keys must be lowercase)."""
    return tuple((key.lower(), value) for key, value in job.trace_context.items() if value)


def _cancelled_from_outside() -> bool:
    """True when the running task itself was asked to stop (its Deferred was cancelled), as opposed
    to a grpc call cancelled under it (channel closed, call.cancel() from ``cancel``)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _refusal(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == REFUSAL_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


def _describe(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or 'no details'}"


class GrpcWorkerConnection:
    """A ``WorkerConnection`` to a remote ``omnirt worker`` at ``address`` (``host:port``).

    ``idle_timeout_s``: a running job's stream must bring an update (event or heartbeat; workers
    send a heartbeat after 1 s of silence) at least this often, else ``WorkerLost``.
    ``connect_timeout_s``: the first update of a job (connecting included) must come this soon;
    by default ``idle_timeout_s`` (the worker heartbeats from the moment it takes the call, so a
    stopped worker is given up on as soon as a silent running job would be).
    ``health_timeout_s`` / ``cancel_timeout_s``: deadlines of the unary calls.
    ``sync_timeout_s``: deadline of a whole ``RunSync`` job on an old worker (None = none).
    """

    def __init__(
        self,
        worker_id: str,
        address: str,
        models: tuple[str, ...] | list[str] = (),
        tags: tuple[str, ...] | list[str] = (),
        capacity: int = 1,
        *,
        idle_timeout_s: float = 10.0,
        connect_timeout_s: float | None = None,
        health_timeout_s: float = 2.0,
        cancel_timeout_s: float = 5.0,
        sync_timeout_s: float | None = None,
        tls: ClientTLS | None = None,
        upstream_options: upstream.UpstreamOptions | None = None,
    ):
        self.worker_id = worker_id
        #: None = plaintext
        self.tls = tls
        #: how to drive an upstream OmniRT 0.1 worker (omnirt.workers.upstream)
        self.upstream = upstream_options or upstream.UpstreamOptions()
        self.address = address
        self.models = tuple(models)
        self.tags = tuple(tags)
        self.capacity = capacity
        self.idle_timeout_s = idle_timeout_s
        self.connect_timeout_s = idle_timeout_s if connect_timeout_s is None else connect_timeout_s
        self.health_timeout_s = health_timeout_s
        self.cancel_timeout_s = cancel_timeout_s
        self.sync_timeout_s = sync_timeout_s
        #: the worker answered UNIMPLEMENTED for Run: use RunSync from now on
        self.legacy = False
        self.last_health: WorkerHealth | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.WorkerStub | None = None
        self._closed = False
        self._sync_calls: dict[str, Any] = {}
        self._sync_cancelled: set[str] = set()

    def __repr__(self) -> str:
        return f"<GrpcWorkerConnection {self.worker_id} {self.address}>"

    def _worker(self) -> pb_grpc.WorkerStub:
        # created lazily inside a coroutine, so the channel binds to the running loop
        if self._closed:
            raise WorkerLost(f"the connection to worker {self.worker_id} is closed")
        if self._stub is None:
            self._channel = secure_or_insecure_channel(self.address, self.tls, list(CHANNEL_OPTIONS))
            self._stub = pb_grpc.WorkerStub(self._channel)
        return self._stub

    # -- WorkerConnection -------------------------------------------------------------------

    def run(self, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> Deferred[RunOutcome]:
        return _bridge(self._run(job, on_update))

    def cancel(self, job_id: str) -> Deferred[bool]:
        return _bridge(self._cancel(job_id))

    def health(self) -> Deferred[WorkerHealth]:
        return _bridge(self._health())

    def close(self) -> Deferred[None]:
        """Close the channel (calls still in flight fail with ``WorkerLost``); later calls fail too."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is None:
            return succeed(None)
        return _bridge(channel.close())

    # -- the coroutines ---------------------------------------------------------------------

    def _deliver(self, on_update: Callable[[WorkerUpdate], None], update: WorkerUpdate) -> None:
        try:
            on_update(update)
        except Exception:
            log.failure("on_update raised for worker {worker_id}", worker_id=self.worker_id)

    async def _run(self, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> RunOutcome:
        if self.legacy or upstream.is_upstream(self.last_health):
            return await self._run_sync(job, on_update)
        metadata = _metadata(job)
        call = self._worker().Run(wire.job_to_pb(job), metadata=metadata)
        received = 0
        finished = False
        try:
            while True:
                wait = self.connect_timeout_s if received == 0 else self.idle_timeout_s
                try:
                    async with asyncio.timeout(wait):
                        message = await call.read()
                except TimeoutError:
                    raise WorkerLost(
                        f"worker {self.worker_id} at {self.address} sent nothing for {wait:g}s "
                        f"during job {job.job_id} (hung, stopped or unreachable)"
                    ) from None
                if message is grpc.aio.EOF:
                    code = await call.code()
                    if code != grpc.StatusCode.OK:  # pragma: no cover - read() raises instead
                        raise WorkerLost(f"worker {self.worker_id}: stream ended with {code.name}")
                    raise WorkerLost(f"worker {self.worker_id} ended job {job.job_id}'s stream without a result")
                received += 1
                kind = message.WhichOneof("update")
                if kind == "event":
                    try:
                        update = wire.event_from_pb(message.event)
                    except wire.WireError as exc:
                        raise WorkerLost(f"worker {self.worker_id} sent a malformed event: {exc}") from None
                    self._deliver(on_update, update)
                elif kind == "events":
                    try:
                        updates = [wire.event_from_pb(e) for e in message.events.events]
                    except wire.WireError as exc:
                        raise WorkerLost(f"worker {self.worker_id} sent a malformed event: {exc}") from None
                    for update in updates:
                        self._deliver(on_update, update)
                elif kind == "result":
                    finished = True
                    return self._outcome(message.result)
                elif kind == "end":
                    finished = True
                    raise _with_spans(self._end_error(message.end), message.end.trace.json, message.end.recorded_in)
                # heartbeat, or an update kind from a newer worker: the stream is alive
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise  # the run's Deferred was cancelled: finally cancels the call, the worker the job
            # the call itself was cancelled under us (the channel was closed)
            raise WorkerLost(f"worker {self.worker_id}: the call for job {job.job_id} was cancelled "
                             f"({'connection closed' if self._closed else 'channel cancelled'})") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and received == 0:
                log.info("worker {worker_id} has no Run: using RunSync", worker_id=self.worker_id)
                self.legacy = True
                return await self._run_sync(job, on_update)
            raise self._run_error(exc, job) from None
        finally:
            if not finished:
                call.cancel()  # a no-op when the call already ended; else the worker cancels the job

    def _outcome(self, message: pb.GenerateResult) -> RunOutcome:
        """The result as a RunOutcome, with the worker's span summaries (RunReport.trace)."""
        try:
            outcome = wire.outcome_from_pb(message)
        except wire.WireError as exc:
            raise JobFailed(f"worker {self.worker_id} sent an unusable result: {exc}") from None
        outcome.result.metadata.spans = spans_from_json(message.metadata.trace.json)
        return outcome

    def _end_error(self, end: pb.RunEnd) -> Exception:
        if end.status == pb.RUN_END_STATUS_CANCELLED:
            return JobCancelled(end.message or "cancelled")
        if end.status == pb.RUN_END_STATUS_ABORTED:
            return WorkerLost(end.message or f"worker {self.worker_id} stopped the job")
        if end.status == pb.RUN_END_STATUS_REJECTED:
            return JobRejected(end.message or "the worker rejected the job's input")
        return JobFailed(end.message or "job failed on the worker")

    def _run_error(self, exc: grpc.aio.AioRpcError, job: WorkerJob) -> Exception:
        code = exc.code()
        where = f"worker {self.worker_id} at {self.address}"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not _refusal(exc):
            # not the worker's admission refusal (that one carries its reason in trailing
            # metadata) but gRPC's message size limit: retrying elsewhere cannot help
            return JobFailed(f"job {job.job_id}: a message exceeded the gRPC size limit "
                             f"({wire.MAX_MESSAGE_BYTES} bytes; OMNIRT_GRPC_MAX_MESSAGE_BYTES): {exc.details()}")
        if code in _BUSY_CODES:
            return WorkerBusy(f"{where} refused job {job.job_id}: {exc.details()}")
        if code == grpc.StatusCode.UNAVAILABLE and _refusal(exc):
            return WorkerBusy(f"{where} refused job {job.job_id}: {exc.details()}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return JobRejected(f"{where} rejected job {job.job_id}: {exc.details()}")
        return WorkerLost(f"{where} lost job {job.job_id}: {_describe(exc)}")

    async def _run_sync(self, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> RunOutcome:
        backend = job.request.backend
        if backend == "auto" and self.last_health is not None and self.last_health.backend:
            backend = self.last_health.backend
        self._deliver(on_update, WorkerUpdate("job_started", "job", {"backend": backend}, wire.now_ms()))
        request = await upstream.request_for(self, job.request)
        call = self._worker().RunSync(
            wire.request_to_pb(request), metadata=_metadata(job), timeout=self.sync_timeout_s
        )
        self._sync_calls[job.job_id] = call
        try:
            message = await call
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise
            if job.job_id in self._sync_cancelled:
                raise JobCancelled("cancelled by request") from None
            raise WorkerLost(f"worker {self.worker_id}: the RunSync call for job {job.job_id} was cancelled") from None
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise JobRejected(exc.details() or f"worker {self.worker_id} rejected the job's input") from None
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                raise JobFailed(exc.details() or f"job failed on worker {self.worker_id}") from None
            if code == grpc.StatusCode.CANCELLED and job.job_id in self._sync_cancelled:
                raise JobCancelled("cancelled by request") from None
            if code == grpc.StatusCode.CANCELLED and not (exc.details() or "").startswith("Locally"):
                raise JobCancelled(exc.details() or "cancelled on the worker") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise WorkerLost(f"worker {self.worker_id}: RunSync took longer than {self.sync_timeout_s}s") from None
            raise self._run_error(exc, job) from None
        finally:
            self._sync_calls.pop(job.job_id, None)
            self._sync_cancelled.discard(job.job_id)
            call.cancel()
        return await upstream.outcome_for(self, message, lambda u: self._deliver(on_update, u)) or self._outcome(message)

    async def _cancel(self, job_id: str) -> bool:
        if not self.legacy:
            try:
                reply = await self._worker().Cancel(pb.CancelRequest(job_id=job_id), timeout=self.cancel_timeout_s)
                return reply.found
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise WorkerLost(f"cancel on worker {self.worker_id} failed: {_describe(exc)}") from None
        # an old worker: cancelling the call is all we can do
        call = self._sync_calls.get(job_id)
        if call is None:
            return False
        self._sync_cancelled.add(job_id)
        call.cancel()
        return True

    async def _health(self) -> WorkerHealth:
        try:
            reply = await self._worker().Health(pb.HealthRequest(), timeout=self.health_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise WorkerLost(f"health of worker {self.worker_id} at {self.address} failed: {_describe(exc)}") from None
        health = wire.health_from_pb(reply)
        self.last_health = health
        return health


def _with_spans(exc: Exception, trace_json: str, recorded_in: str = "") -> Exception:
    """A run that ended without a result still brings its span summaries (RunEnd.trace) and the
    store the worker recorded that end in (RunEnd.recorded_in): they ride on the exception
    (``trace_spans``, ``recorded_in``) to the dispatcher."""
    exc.trace_spans = spans_from_json(trace_json)  # type: ignore[attr-defined]
    exc.recorded_in = recorded_in  # type: ignore[attr-defined]
    return exc


async def probe(address: str, timeout: float = 5.0, tls: ClientTLS | None = None) -> WorkerHealth:
    """One Health call on a channel of its own (e.g. before the gateway listens); ``WorkerLost`` on failure."""
    channel = secure_or_insecure_channel(address, tls, list(CHANNEL_OPTIONS))
    try:
        reply = await pb_grpc.WorkerStub(channel).Health(pb.HealthRequest(), timeout=timeout, wait_for_ready=True)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise WorkerLost(f"no worker answered at {address} within {timeout:g}s") from None
        raise WorkerLost(f"worker at {address}: {_describe(exc)}") from None
    finally:
        await channel.close()
    return wire.health_from_pb(reply)
