"""Server-sent events for /v1/jobs/{id}/events: replay from any seq, then live, keep-alives,
closed after the terminal event."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.tcp import Connection

from omnirt.contract import JobEvent
from omnirt.gateway.edge import parse_int_arg
from omnirt.store.base import StoreUnavailable
from omnirt.store.fanout import after_round, at_round_end


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


def _chunk(event: JobEvent) -> bytes:
    return SseWriter.frame(encode_event(event))


def encode_chunk(event: JobEvent) -> bytes:
    """The event's SSE frame inside its HTTP/1.1 chunk framing, encoded once per event."""
    return event.encoded("sse-chunk", _chunk)


class SseWriter:
    """Writes one SSE response's frames, once its headers are out, straight to its connection:
    the chunk is framed once per event (``frame``) and the same bytes go to every subscriber;
    when nothing is waiting in the transport's buffer they are handed to the socket at once
    (``writeSomeData``), so a fan-out to N streams costs N ``send`` calls and no reactor
    write-registration per stream. Anything else (headers not sent yet, HTTP/1.0, a TLS or other
    non-TCP transport, bytes still buffered, a partial send) goes through Twisted's buffered
    write, in order. ``request.sentLength`` is kept as ``request.write`` keeps it.

    Inside a store's delivery round (``omnirt.store.fanout``: several events in one reactor
    turn) the chunks are held and sent together when the round ends: one ``send`` per round."""

    __slots__ = ("request", "_tcp", "_checked", "_held")

    def __init__(self, request):
        self.request = request
        #: the connection's TCP transport when it is one (checked once), else None
        self._tcp: Connection | None = None
        self._checked = False
        #: chunks held until the open delivery round ends (None: nothing held)
        self._held: list[bytes] | None = None

    @staticmethod
    def frame(payload: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(payload), payload)

    def write_event(self, event: JobEvent) -> None:
        request = self.request
        if not request.startedWriting or not request.chunked:
            self.flush()
            request.write(encode_event(event))
            return
        chunk = encode_chunk(event)
        if request.finished or request._disconnected:
            self.flush()
            request.write(chunk)  # raises after finish, as request.write does; nothing when gone
            return
        request.sentLength += len(encode_event(event))
        self.write_chunk(chunk)

    def write_chunk(self, chunk: bytes) -> None:
        """``chunk`` (already framed) to the connection: held while a delivery round is open,
        else now if the socket takes it."""
        held = self._held
        if held is not None:
            held.append(chunk)
        elif at_round_end(self.flush):
            self._held = [chunk]
        else:
            self._send(chunk)

    def flush(self) -> None:
        """Send the chunks held in this round (if any), in order; before any other write."""
        held, self._held = self._held, None
        if held:
            self._send(held[0] if len(held) == 1 else b"".join(held))

    def _send(self, chunk: bytes) -> None:
        if not self._checked:
            transport = self.request.channel.transport
            self._tcp = transport if isinstance(transport, Connection) else None
            self._checked = True
        tcp = self._tcp
        if tcp is None:
            self.request.channel.transport.write(chunk)
            return
        # nothing buffered (FileDescriptor's two buffers empty) and still open: send now
        if not tcp._tempDataLen and tcp.offset == len(tcp.dataBuffer) and tcp.connected and not tcp.disconnecting:
            sent = tcp.writeSomeData(chunk)
            if isinstance(sent, int) and sent > 0:
                if sent == len(chunk):
                    return
                chunk = chunk[sent:]
        tcp.write(chunk)


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

    writer = SseWriter(request)
    terminal_seen = [False]

    def end() -> None:  # after the round's writes (or at once outside a round): nothing is held
        if not done.called:
            done.callback(None)

    def on_event(event: JobEvent) -> None:
        if done.called or terminal_seen[0]:
            return
        send_headers()
        writer.write_event(event)
        if event.terminal:
            # in a delivery round the response ends after the round: the terminal event goes to
            # every subscriber before any of them finishes its response (the finish, the access
            # log and the connection's bookkeeping do not sit between two writes)
            terminal_seen[0] = True
            if not after_round(end):
                end()

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
    keepalive = LoopingCall(lambda: request.write(b": keep-alive\n\n"))  # its own turn: nothing held
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
