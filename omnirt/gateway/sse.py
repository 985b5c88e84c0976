"""Server-sent events for /v1/jobs/{id}/events: replay from any seq, then live, keep-alives,
closed after the terminal event."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall

from omnirt.contract import JobEvent
from omnirt.gateway.edge import parse_int_arg
from omnirt.store.base import StoreUnavailable


def resume_point(request) -> int:
    """``Last-Event-ID`` header (preferred) or ``?after=``; 0 = from the start."""
    header = request.getHeader(b"last-event-id")
    if header is not None and header.strip():
        return parse_int_arg(header, "Last-Event-ID", minimum=0) or 0
    return parse_int_arg((request.args.get(b"after") or [None])[0], "after", minimum=0, default=0) or 0


def _frame(event: JobEvent) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.event.encode(), event.json_bytes())


def encode_event(event: JobEvent) -> bytes:
    """The event's SSE frame, encoded once: every subscriber is written the same bytes."""
    return event.encoded("sse", _frame)


async def stream_events(service, reactor, request, job_id: str, after: int, keepalive_s: float, *,
                        owner: str | None = None) -> None:
    done: Deferred = Deferred()
    headers_sent = [False]

    def send_headers() -> None:
        if not headers_sent[0]:
            headers_sent[0] = True
            request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
            request.setHeader(b"Cache-Control", b"no-cache")
            request.setHeader(b"X-Accel-Buffering", b"no")

    def on_event(event: JobEvent) -> None:
        if done.called:
            return
        send_headers()
        request.write(encode_event(event))
        if event.terminal:
            done.callback(None)

    # subscribe raises JobNotFoundError (404) before anything is written
    subscription = await service.subscribe(job_id, after, on_event, owner=owner)
    send_headers()
    try:
        ended = not done.called and await service.ended_before(job_id, after)
    except StoreUnavailable:
        ended = False  # the store went away after the replay: keep streaming, the events follow
    except BaseException:
        subscription.close()
        raise
    if ended:
        done.callback(None)  # resumed after the terminal event: nothing more will come
    keepalive = LoopingCall(lambda: request.write(b": keep-alive\n\n"))
    keepalive.clock = reactor
    try:
        if not done.called:
            send_headers()
            request.write(b": connected\n\n")
            request.notifyFinish().addBoth(lambda _: done.called or done.cancel())
            keepalive.start(keepalive_s, now=False)
            await done
    except CancelledError:
        pass  # the client went away
    finally:
        subscription.close()
        if keepalive.running:
            keepalive.stop()
