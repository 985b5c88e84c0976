"""The gRPC face of ``WorkerCore``: the ``omnirt.worker.Worker`` service, converting at its edge.

Everything protobuf lives here: requests become ``WorkerJob``s, the core's ``WorkerUpdate``s
and ``RunEnd`` become ``RunUpdate`` messages, refusals become status codes. The core runs the
job; this module adds only what the wire needs (heartbeats on a silent stream, batching of
events that queued up while a message was being sent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from twisted.internet.defer import Deferred

from omnirt.contract import ContractError
from omnirt.telemetry.tracing import spans_json, trace_carrier
from omnirt.workers import wire
from omnirt.workers.base import WorkerHealth, WorkerJob, WorkerUpdate
from omnirt.workers.core import JobRun, Refused, RunEnd, WorkerCore, prepare
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: trailing metadata key that says why an UNAVAILABLE refusal happened (draining | starting)
REFUSAL_KEY = "omnirt-refusal"

SERVER_OPTIONS = (
    *wire.MESSAGE_SIZE_OPTIONS,
    # grpc enables SO_REUSEPORT by default: two workers would share a port silently
    ("grpc.so_reuseport", 0),
    # let clients keep idle connections alive with pings
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
)

#: refusal reason -> gRPC status (the gateway maps these back to WorkerBusy)
_REFUSAL_CODES = {
    "model_not_served": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
}

_END_STATUS = {
    "failed": pb.RUN_END_STATUS_FAILED,
    "rejected": pb.RUN_END_STATUS_REJECTED,
    "cancelled": pb.RUN_END_STATUS_CANCELLED,
    "aborted": pb.RUN_END_STATUS_ABORTED,
}

_EVENT, _FINAL = "event", "final"


def refusal_code(exc: Refused) -> grpc.StatusCode:
    return _REFUSAL_CODES.get(exc.reason, grpc.StatusCode.UNAVAILABLE)


def _event_dicts(events: list[WorkerUpdate]) -> list[dict[str, Any]]:
    """The run's events as ``RunReport.stream_events`` carries them (as upstream OmniRT 0.1 does)."""
    return [{"event": u.event, "stage": u.stage, "timestamp_ms": u.timestamp_ms, "data": u.data} for u in events]


def final_update(end: RunEnd) -> pb.RunUpdate:
    """The last message of a Run stream: the result (with the run's events), or how the run
    ended, with its spans."""
    if end.state == "succeeded" and end.outcome is not None:
        final = pb.RunUpdate(result=wire.outcome_to_pb(end.outcome, _event_dicts(end.events)))
        if end.spans:
            final.result.metadata.trace.json = spans_json(end.spans)
        final.result.metadata.recorded_in = end.recorded_in
        return final
    final = wire.end_update(_END_STATUS.get(end.state, pb.RUN_END_STATUS_FAILED), end.message)
    if end.spans:
        final.end.trace.json = spans_json(end.spans)
    final.end.recorded_in = end.recorded_in
    return final


#: events this close together (seconds) travel as one message: one gRPC message per window instead
#: of per event when a job is fast; a progress event waits at most this long, the final none
COALESCE_S = 0.005


class WorkerServicer(pb_grpc.WorkerServicer):
    """The gRPC face of ``WorkerCore``. ``heartbeat_s``: a silent Run stream gets a heartbeat this
    often. ``coalesce_s``: events within this long of the previous message share one message."""

    def __init__(self, core: WorkerCore, heartbeat_s: float = 1.0, coalesce_s: float = COALESCE_S):
        self.core = core
        self.heartbeat_s = heartbeat_s
        self.coalesce_s = coalesce_s

    async def _refuse(self, context: grpc.aio.ServicerContext, exc: Refused) -> None:
        await context.abort(refusal_code(exc), exc.message, trailing_metadata=((REFUSAL_KEY, exc.reason),))

    def _start(self, job: WorkerJob) -> tuple[JobRun, asyncio.Queue]:
        """Admit and start the job (raises ``Refused``); its updates, then its end, go to the queue.

        The core calls back on the reactor thread, which is this loop's thread (asyncio reactor)."""
        queue: asyncio.Queue = asyncio.Queue()
        running = self.core.run(job, lambda update: queue.put_nowait((_EVENT, update)))
        def final(end: RunEnd) -> RunEnd:
            queue.put_nowait((_FINAL, end))
            return end

        running.done.addCallback(final)
        return running, queue

    async def Run(self, request: pb.RunRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RunUpdate]:
        try:
            job = prepare(wire.job_from_pb(request))
            job.trace_context = trace_carrier(context.invocation_metadata())
        except (wire.WireError, ContractError) as exc:
            # a job that can never run anywhere: the client's error, a final update (not a transport error)
            yield wire.end_update(pb.RUN_END_STATUS_REJECTED, str(exc))
            return
        try:
            _, queue = self._start(job)
        except Refused as exc:
            await self._refuse(context, exc)
            return
        delivered = False
        try:
            async for update in self.updates(queue):
                yield update
            delivered = True
        finally:
            if not delivered and self.core.recorder is None:
                # the client cancelled the call or went away (asyncio.CancelledError here;
                # context.cancelled() stays False): the job must stop too
                self.core.cancel(job.job_id, "client cancelled the call")
            elif not delivered:
                # this worker records the job in the shared store itself: a lost gateway stream
                # does not stop it (a cancel comes as a Cancel call); it finishes and records
                log.info("job %s continues without its gateway stream; its outcome goes to the store", job.job_id)

    async def RunSync(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResult:
        """The whole job in one call (what upstream OmniRT 0.1 gateways send): upstream's config
        keys and file paths are taken in (``core.compat``, off the loop), beyond capacity the call
        waits in the core's bounded ``SyncQueue``, and the result carries the run's events and,
        under ``--output-dir``, the files' paths."""
        loop = asyncio.get_running_loop()
        try:
            adapted = await loop.run_in_executor(None, self.core.compat.adapt, wire.request_from_pb(request))
            job = prepare(WorkerJob(job_id=f"sync-{uuid.uuid4().hex}", request=adapted.request, execution_mode="sync",
                                    trace_context=trace_carrier(context.invocation_metadata()),
                                    model_path=adapted.model_path))
        except (wire.WireError, ContractError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from None
        try:
            running = await Deferred.fromCoroutine(
                self.core.sync_queue.run(self.core, job, lambda _update: None)).asFuture(loop)
        except Refused as exc:
            await self._refuse(context, exc)
            raise AssertionError("unreachable") from None
        end: RunEnd | None = None
        try:
            end = await running.done.asFuture(loop)
        finally:
            if end is None:
                self.core.cancel(job.job_id, "client cancelled the call")
        if end.state == "succeeded" and end.outcome is not None:
            result = wire.outcome_to_pb(end.outcome, _event_dicts(end.events))
            try:
                await loop.run_in_executor(None, self.core.compat.finish, result, adapted, job.job_id)
            except OSError as exc:
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"cannot write the outputs under the output folder: {exc.strerror or exc}")
            return result
        code = {
            "cancelled": grpc.StatusCode.CANCELLED,
            "aborted": grpc.StatusCode.UNAVAILABLE,
            "rejected": grpc.StatusCode.INVALID_ARGUMENT,
        }.get(end.state, grpc.StatusCode.INTERNAL)
        await context.abort(code, end.message)
        raise AssertionError("unreachable")

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return wire.health_to_pb(self.core.health())

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        found, cancelled = self.core.cancel(request.job_id)
        return pb.CancelResponse(found=found, cancelled=cancelled)

    async def updates(self, queue: asyncio.Queue) -> AsyncIterator[pb.RunUpdate]:
        """The job's updates in order, a heartbeat after each ``heartbeat_s`` of silence, then the final one.

        The first event goes out at once; events that come within ``coalesce_s`` of the previous
        message go out together as one ``RunEvents`` message when that window ends (one event alone
        still goes as ``RunEvent``): a job that produces events faster than that costs both sides
        one message per window instead of one per event. The final update is never held back: it
        flushes what is pending and follows at once.
        """
        loop = asyncio.get_running_loop()
        getter: asyncio.Future | None = None
        pending: list[pb.RunEvent] = []
        sent_at = -float("inf")  # loop time of the last message
        try:
            while True:
                end: RunEnd | None = None
                if getter is None:  # fast path: no task, no timer (a getter in flight takes the next item)
                    while end is None and not queue.empty():
                        kind, item = queue.get_nowait()
                        if kind == _FINAL:
                            end = item
                        else:
                            pending.append(_event_pb(item))
                if end is None:
                    window_left = sent_at + self.coalesce_s - loop.time()
                    if not pending or window_left > 0:
                        if getter is None:
                            getter = asyncio.ensure_future(queue.get())
                        done, _ = await asyncio.wait((getter,), timeout=window_left if pending else self.heartbeat_s)
                        if done:
                            kind, item = getter.result()
                            getter = None
                            if kind != _FINAL:
                                pending.append(_event_pb(item))
                                continue  # more may come within the window
                            end = item
                        elif not pending:
                            yield wire.heartbeat_update()
                            sent_at = loop.time()
                            continue
                        # else the window is over: send what is pending (the getter waits for the next)
                if len(pending) == 1:
                    yield pb.RunUpdate(event=pending[0])
                elif pending:
                    yield pb.RunUpdate(events=pb.RunEvents(events=pending))
                pending = []
                sent_at = loop.time()
                if end is not None:
                    yield final_update(end)
                    return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()


def _event_pb(update: Any) -> pb.RunEvent:
    return wire.event_update(update.event, update.stage, update.data, update.timestamp_ms).event


def build_server(core: WorkerCore, heartbeat_s: float = 1.0) -> grpc.aio.Server:
    """A grpc.aio server with the Worker service (call inside the running loop; add a port, start)."""
    server = grpc.aio.server(options=list(SERVER_OPTIONS))
    pb_grpc.add_WorkerServicer_to_server(WorkerServicer(core, heartbeat_s), server)
    return server


def health_json(health: WorkerHealth) -> bytes:
    body = dataclasses.asdict(health)
    for key in ("models", "loaded_models", "loaded_adapters", "tags"):
        body[key] = list(body[key])
    return json.dumps(body, separators=(",", ":")).encode()
