"""The Redis store's event reads and subscriptions: a job's stored events (``events.lua``), a
stream opened with its record in one call (``attach.lua``), and subscriptions that replay
(``replay.lua``) until they join the store's one shared reader (``reader.StreamReader``)."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python import log

from omnirt.contract import JobEvent, JobRecord
from omnirt.store.base import EventCallback, JobNotFound, StoreUnavailable, Subscription
from omnirt.store.fanout import delivery_round
from omnirt.store.redis.codec import arr, decode_entry, decode_record, unpack
from omnirt.store.redis.connection import retry_delay
from omnirt.store.redis.reader import RedisSubscription, StreamReader

__all__ = ["RedisStreams"]


class RedisStreams:
    """Mixed into RedisJobStore (uses its ``_eval``, ``_job_keys``, ``_events_key``, ``_clock``,
    ``_closed``, ``address``; the reader and the replays under way are declared here)."""

    _reader: StreamReader | None
    #: subscriptions replaying in the background until they can join the reader
    _attaching: set[Deferred]
    _closed: bool

    async def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        reply = unpack(await self._eval("events", self._job_keys(job_id), [f"{max(after_seq, 0) + 1}-0"]))
        if reply is None:
            raise JobNotFound(job_id)
        return [ev for e in arr(reply[0]) for ev in decode_entry(e) if ev.seq > after_seq]

    def subscribe(self, job_id: str, after_seq: int, on_event: EventCallback) -> Subscription:
        """Replay (XRANGE) from ``after_seq``, then join the shared reader; delivery is
        asynchronous (callbacks run on the reactor, in seq order, each seq once)."""
        sub = RedisSubscription(self._live_reader(), job_id, max(after_seq, 0), on_event)
        self._catch_up(sub)
        return sub

    async def open_stream(self, job_id: str, after_seq: int, on_event: EventCallback,
                          accept: Callable[[JobRecord], bool] | None = None) -> Subscription | None:
        """The record and the replay in ONE script call (``attach``); the replayed events are
        delivered before this returns, then the subscription joins the shared reader (when the
        reader has read past the replay meanwhile, the rest is replayed as ``subscribe`` does)."""
        self._live_reader()
        reply = unpack(await self._eval("attach", self._job_keys(job_id), [f"{max(after_seq, 0) + 1}-0"]))
        if reply is None or (accept is not None and not accept(decode_record(reply[0]))):
            return None
        reader = self._live_reader()  # not closed meanwhile
        sub = RedisSubscription(reader, job_id, max(after_seq, 0), on_event)
        with delivery_round():  # the replay goes out in one write
            for entry in arr(reply[1]):
                for event in decode_entry(entry):
                    sub.deliver(event)  # one at or before after_seq is skipped
        if not sub.closed and not reader.attach(sub, int(reply[2])):
            self._catch_up(sub)
        return sub

    def _live_reader(self) -> StreamReader:
        if self._reader is None or self._closed:
            raise StoreUnavailable(f"redis at {self.address}: not connected")
        return self._reader

    def _catch_up(self, sub: RedisSubscription) -> None:
        """Replay ``sub``'s events in the background until it can join the reader."""
        job_id = sub.job_id
        d = Deferred.fromCoroutine(self._attach(sub))
        self._attaching.add(d)

        def done(result):
            self._attaching.discard(d)
            if isinstance(result, defer.Failure) and not result.check(defer.CancelledError):
                log.err(result, f"event subscription of job {job_id} failed")

        d.addBoth(done)

    async def _attach(self, sub: RedisSubscription) -> None:
        """Replay until the subscriber has seen everything the reader has, then go live (the
        check and the registration happen in one reactor turn: no gap, no duplicate)."""
        key = self._events_key(sub.job_id)
        failures = 0
        while not sub.closed and not self._closed:
            cursor = self._reader.cursor(sub.job_id)
            if cursor is not None and sub.last >= cursor:
                self._reader.attach(sub, cursor)  # the reader has read nothing this one needs
                return
            try:
                entries, last_id = unpack(await self._eval("replay", [key], [f"{sub.last + 1}-0"]))
            except StoreUnavailable as exc:
                log.msg(f"replay of job {sub.job_id} events: {exc}; retrying")
                await deferLater(self._clock, retry_delay(failures))
                failures += 1
                continue
            with delivery_round():
                for entry in arr(entries):
                    for event in decode_entry(entry):
                        sub.deliver(event)  # one already seen (seq <= last) is skipped
            stream_last = int(str(last_id).split("-", 1)[0]) if last_id else 0
            if sub.closed or self._reader.attach(sub, stream_last):
                return

    def subscriber_count(self) -> int:
        return 0 if self._reader is None else self._reader.subscriber_count()
