"""Live events from Redis: one blocking ``XREAD`` loop per store over every stream that has a
live subscriber, fanned out in-process in seq order."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python import log

from omnirt.contract import JobEvent
from omnirt.store.base import EventCallback, Subscription
from omnirt.store.fanout import delivery_round
from omnirt.store.redis.codec import decode_entry
from omnirt.store.redis.connection import Connection, describe, retry_delay

if TYPE_CHECKING:
    from omnirt.store.redis.store import RedisJobStore

__all__ = ["RedisSubscription", "StreamReader"]


class RedisSubscription(Subscription):
    __slots__ = ("_reader", "job_id", "on_event", "last", "closed")

    def __init__(self, reader: StreamReader, job_id: str, after_seq: int, on_event: EventCallback):
        self._reader = reader
        self.job_id = job_id
        self.on_event = on_event
        #: the last seq delivered (or skipped as <= after_seq): later deliveries need seq > last
        self.last = after_seq
        self.closed = False

    def deliver(self, event: JobEvent) -> None:
        if self.closed or event.seq <= self.last:
            return
        self.last = event.seq
        try:
            self.on_event(event)
        except Exception:
            log.err(None, f"event subscriber of job {self.job_id} failed")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._reader.detach(self)


class _Stream:
    __slots__ = ("job_id", "key", "subs", "cursor")

    def __init__(self, job_id: str, key: str, cursor: int):
        self.job_id = job_id
        self.key = key
        #: live subscribers (each has ``last >= cursor`` at attach time)
        self.subs: list[RedisSubscription] = []
        #: the last seq the reader has read (and fanned out) from this stream
        self.cursor = cursor


class StreamReader:
    """The one blocking ``XREAD`` loop of a store: all streams with live subscribers, one
    connection, entries fanned out in seq order. A stream joining wakes a blocked XREAD by
    XADDing to this reader's own wake stream (which every XREAD includes), so it is re-issued at
    once with the new set; on errors it backs off and resumes from the per-stream cursors."""

    BLOCK_MS = 1000
    COUNT = 256
    WAKE_TTL_MS = 3_600_000

    def __init__(self, store: RedisJobStore, conn: Connection):
        self._store = store
        self._conn = conn
        self.streams: dict[str, _Stream] = {}  # job id -> stream
        self._by_key: dict[str, _Stream] = {}
        self._wake_key = f"{store._prefix}wake:{uuid.uuid4().hex}"
        self._wake_cursor = "0-0"
        self._idle: Deferred | None = None
        self._inflight: Deferred | None = None
        self._backoff: Deferred | None = None
        self._wake_sent = False
        self._stopped = False
        self.loop: Deferred | None = None
        self.xreads = 0

    def start(self) -> None:
        self.loop = Deferred.fromCoroutine(self._run())
        self.loop.addErrback(log.err, "redis event reader stopped")

    def stop(self) -> None:
        self._stopped = True
        if self._idle is not None and not self._idle.called:
            self._idle.callback(None)
        for d in (self._inflight, self._backoff):
            if d is not None and not d.called:
                d.cancel()

    # -- registry ----------------------------------------------------------------------------

    def attach(self, sub: RedisSubscription, stream_last: int) -> bool:
        """Make ``sub`` live if it has caught up with the reader; False means replay more first.
        ``stream_last`` is the stream's last seq as the replay saw it: a new reader cursor never
        starts past it (a subscriber may ask for ``after_seq`` beyond the end)."""
        stream = self.streams.get(sub.job_id)
        if stream is None:
            stream = _Stream(sub.job_id, self._store._events_key(sub.job_id), min(sub.last, stream_last))
            self.streams[sub.job_id] = stream
            self._by_key[stream.key] = stream
            self._wake()
        elif sub.last < stream.cursor:
            return False
        stream.subs.append(sub)
        return True

    def cursor(self, job_id: str) -> int | None:
        stream = self.streams.get(job_id)
        return None if stream is None else stream.cursor

    def detach(self, sub: RedisSubscription) -> None:
        stream = self.streams.get(sub.job_id)
        if stream is None or sub not in stream.subs:
            return
        stream.subs.remove(sub)
        if not stream.subs:  # the next XREAD leaves it out; no need to wake
            del self.streams[sub.job_id]
            del self._by_key[stream.key]

    def subscriber_count(self) -> int:
        return sum(len(s.subs) for s in self.streams.values())

    def _wake(self) -> None:
        if self._idle is not None and not self._idle.called:
            self._idle.callback(None)
            return
        if self._inflight is None or self._wake_sent:
            return  # not blocked, or a wake is already on its way
        self._wake_sent = True
        d = Deferred.fromCoroutine(self._store._eval("wake", [self._wake_key], [self.WAKE_TTL_MS]))
        d.addErrback(lambda f: log.msg(f"redis reader wake failed: {f.getErrorMessage()}"))

    # -- loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        store = self._store
        failures = 0
        while not self._stopped:
            if not self.streams:
                self._idle = Deferred()
                await self._idle
                self._idle = None
                continue
            streams = list(self.streams.values())
            keys = [self._wake_key] + [s.key for s in streams]
            ids = [self._wake_cursor] + [f"{s.cursor}-0" for s in streams]
            self._wake_sent = False
            self._inflight = self._conn.execute(
                "XREAD", "COUNT", self.COUNT, "BLOCK", self.BLOCK_MS, "STREAMS", *keys, *ids
            )
            self._inflight.addTimeout(self.BLOCK_MS / 1000 + store.call_timeout_s + 0.5, store._clock)
            self.xreads += 1
            try:
                reply = await self._inflight
            except Exception as exc:
                self._inflight = None
                if self._stopped:
                    return
                if not failures:
                    log.msg(f"redis event reader ({store.address}): {describe(exc)}; retrying")
                self._backoff = deferLater(store._clock, retry_delay(failures))
                failures += 1
                try:
                    await self._backoff
                except defer.CancelledError:
                    return
                finally:
                    self._backoff = None
                continue
            self._inflight = None
            if failures:
                log.msg(f"redis event reader ({store.address}): reading again")
            failures = 0
            if reply:
                # one delivery round per reply: a subscriber's writer sends the reply's events at once
                with delivery_round():
                    self._fan_out(reply)

    def _fan_out(self, reply: list) -> None:
        for key, entries in reply:
            if key == self._wake_key:
                if entries:
                    self._wake_cursor = entries[-1][0]
                continue
            stream = self._by_key.get(key)
            if stream is None:
                continue
            for entry in entries:
                try:
                    events = decode_entry(entry)
                except Exception:
                    log.err(None, f"unreadable event entry {entry[0]!r} in {key}; skipped")
                    continue
                for event in events:
                    if event.seq <= stream.cursor:
                        continue
                    stream.cursor = event.seq
                    for sub in list(stream.subs):
                        sub.deliver(event)
