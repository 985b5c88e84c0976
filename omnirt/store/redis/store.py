"""The Redis JobStore: every write one Lua script, reads packed by Lua, live events through the
shared stream reader (the key layout is in the package docstring)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Collection
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python import log

from omnirt.contract import ALLOWED_TRANSITIONS, IllegalTransition, JobEvent, JobRecord, JobState
from omnirt.store.base import EventCallback, JobNotFound, JobStore, NewEvent, StoreUnavailable, Subscription
from omnirt.store.redis.codec import (
    STATE_NAMES,
    arr,
    csv,
    decode_entry,
    decode_record,
    encode_event,
    encode_fields,
    unpack,
)
from omnirt.store.redis.connection import UNAVAILABLE_REPLIES, Connection, describe, endpoint_for, retry_delay
from omnirt.store.redis.reader import RedisSubscription, StreamReader
from omnirt.store.redis.scripts import load_scripts
from omnirt.store.redis.url import parse_redis_url

__all__ = ["RedisJobStore"]


class RedisJobStore(JobStore):
    """JobStore on Redis; see the module docstring for the keys. ``clock`` is the reactor (time,
    call deadlines, TCP). Call ``connect()`` before use and ``close()`` at the end."""

    backend_name = "redis"
    #: a claimed idempotency key whose job does not exist yet is honoured this long
    idem_pending_grace_s = 30.0
    #: expire() drops at most this many jobs per Redis call (it loops)
    expire_batch = 500

    def __init__(
        self,
        clock: IReactorTime,
        *,
        url: str,
        namespace: str = "omnirt",
        retention_s: float = 86400.0,
        call_timeout_s: float = 2.0,
        gateway_id: str | None = None,
    ):
        self._clock = clock
        self.target = parse_redis_url(url)
        self.namespace = namespace
        self._prefix = f"{namespace}:"
        self.retention_s = retention_s
        self.call_timeout_s = call_timeout_s
        self.gateway_id = gateway_id
        self._cmd: Connection | None = None
        self._reader: StreamReader | None = None
        self._attaching: set[Deferred] = set()
        self._closed = False
        self._tag = uuid.uuid4().hex[:8]
        self._scripts = load_scripts()

    def __repr__(self) -> str:
        return f"<RedisJobStore {self.target.redacted} namespace={self.namespace!r}>"

    # -- keys --------------------------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _events_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}:events"

    def _job_keys(self, job_id: str) -> list[str]:
        return [self._job_key(job_id), self._events_key(job_id)]

    @property
    def _retention_ms(self) -> int:
        return max(1, int(self.retention_s * 1000))

    # -- connections -------------------------------------------------------------------------

    def _connection(self, role: str, reply_timeout_s: float) -> Connection:
        tag = self.gateway_id or self._tag
        endpoint = endpoint_for(self._clock, self.target, self.call_timeout_s)
        return Connection(self.target, endpoint, f"omnirt-{tag}-{role}", reply_timeout_s)

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"redis at {self.target.address}: {what}: {describe(exc)}")

    async def connect(self) -> None:
        """Open the command connection and the event reader; StoreUnavailable if Redis cannot be
        reached (within about ``call_timeout_s``) or refuses the credentials."""
        if self._cmd is not None:
            return
        # A plain TCP probe fails fast and clearly (refused, no route) where the reconnecting
        # client would just keep retrying.
        probe = HostnameEndpoint(self._clock, self.target.host, self.target.port, timeout=self.call_timeout_s)
        try:
            proto = await connectProtocol(probe, Protocol())
            proto.transport.loseConnection()
        except Exception as exc:
            raise StoreUnavailable(f"cannot connect to redis at {self.target.address}: {exc}") from None
        # txredisapi's own reply timer (which drops a stuck connection so that it is made again)
        # runs a little shorter than our deadline on each call, so it usually fires first.
        cmd = self._cmd = self._connection("cmd", self.call_timeout_s * 0.8)
        reader_conn = self._connection("reader", StreamReader.BLOCK_MS / 1000 + self.call_timeout_s)
        both = defer.gatherResults([cmd.ready, reader_conn.ready], consumeErrors=True)
        both.addTimeout(self.call_timeout_s * 2, self._clock)
        try:
            await both
            await self._call("PING")
        except Exception as exc:
            reason = self._cmd_failure(exc, cmd, reader_conn)
            self._cmd = None
            await self._disconnect(cmd, reader_conn)
            raise StoreUnavailable(f"cannot connect to redis at {self.target.address}: {reason}") from None
        self._reader = StreamReader(self, reader_conn)
        self._reader.start()

    def _cmd_failure(self, exc: BaseException, *conns) -> str:
        if isinstance(exc, defer.FirstError):
            exc = exc.subFailure.value
        if isinstance(exc, StoreUnavailable):
            return str(exc)
        for conn in conns:
            if conn is not None and conn.failure:
                return conn.failure
        return describe(exc)

    async def _disconnect(self, *conns: Connection | None) -> None:
        for conn in conns:
            if conn is None:
                continue
            d = conn.disconnect()
            d.addTimeout(self.call_timeout_s, self._clock)
            try:
                await d
            except Exception:
                pass

    async def close(self) -> None:
        """Stop the reader, close every subscription's feed and both connections."""
        if self._closed:
            return
        self._closed = True
        for d in list(self._attaching):
            d.cancel()
        reader_conn = None
        if self._reader is not None:
            self._reader.stop()
            reader_conn = self._reader._conn
        await self._disconnect(self._cmd, reader_conn)
        if self._reader is not None and self._reader.loop is not None:
            await self._reader.loop

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, *args) -> Any:
        if self._cmd is None:
            raise StoreUnavailable(f"redis at {self.target.address}: not connected")
        d = self._cmd.execute(*args)
        d.addTimeout(self.call_timeout_s, self._clock)
        try:
            return await d
        except defer.CancelledError:
            raise  # our caller was cancelled (e.g. its HTTP client went away): not a store failure
        except Exception as exc:
            # txredisapi fails its waiting replies in a loop when a reply times out: a caller
            # that retried synchronously from here would be failed inside that same loop
            # forever. Surface every error on a later reactor turn instead.
            await deferLater(self._clock, 0)
            if isinstance(exc, txredisapi.ResponseError):
                if str(exc).startswith(UNAVAILABLE_REPLIES):
                    raise self._unavailable(str(args[0]), exc) from None
                raise
            if isinstance(exc, defer.TimeoutError | txredisapi.ConnectionError | ConnectionError):
                raise self._unavailable(str(args[0]), exc) from None
            raise

    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        try:
            return await self._call("EVALSHA", script.sha, len(keys), *keys, *args)
        except txredisapi.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._call("EVAL", script.src, len(keys), *keys, *args)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # -- JobStore ----------------------------------------------------------------------------

    async def ping(self) -> None:
        reply = await self._call("PING")
        if reply != "PONG":
            raise StoreUnavailable(f"redis at {self.target.address}: unexpected PING reply")

    async def create(self, record: JobRecord, event: NewEvent) -> JobRecord:
        data = record.model_dump(mode="json", exclude={"events"})
        state = data.pop("state")
        fv: list[str] = []
        for name, value in data.items():
            fv += [name, json.dumps(value, separators=(",", ":"))]
        created = await self._eval("create", self._job_keys(record.id), [
            self._prefix, record.id, state, record.request.model, record.idempotency_key or "",
            self.gateway_id or "", "1" if record.state.terminal else "0", self._retention_ms,
            encode_event(event, self._now_ms()), *fv,
        ])
        if int(created) == 0:
            raise ValueError(f"job {record.id} exists")
        return record.model_copy(update={"events": []})

    async def get(self, job_id: str, *, with_events: bool = False) -> JobRecord | None:
        reply = unpack(await self._eval("get", self._job_keys(job_id), ["1" if with_events else "0"]))
        if reply is None:
            return None
        record = decode_record(reply[0])
        if with_events:
            record = record.model_copy(update={"events": [decode_entry(e) for e in arr(reply[1])]})
        return record

    async def list(self, *, state: JobState | None = None, model: str | None = None, limit: int = 50,
                   tenant: str | None = None) -> list[JobRecord]:
        if limit <= 0:
            return []
        reply = await self._eval("list", [], [
            self._prefix, state.value if state is not None else "", model or "", int(limit),
            json.dumps(tenant) if tenant is not None else "",
        ])
        return [decode_record(flat) for flat in arr(unpack(reply))]

    async def transition(
        self,
        job_id: str,
        expected: Collection[JobState],
        target: JobState,
        event: NewEvent | None = None,
        fields: dict[str, Any] | None = None,
    ) -> JobRecord | None:
        target = JobState(target)
        fv = encode_fields({k: v for k, v in (fields or {}).items() if k != "state"})
        sources = [s.value for s, targets in ALLOWED_TRANSITIONS.items() if target in targets]
        owner = (self.gateway_id or "") if target == JobState.running else ""
        reply = unpack(await self._eval("transition", self._job_keys(job_id), [
            self._prefix, job_id, csv(JobState(s).value for s in expected), target.value, csv(sources),
            "1" if target.terminal else "0", self._retention_ms,
            encode_event(event, self._now_ms()) if event is not None else "", owner, *fv,
        ]))
        code = int(reply[0])
        if code == 1:
            return decode_record(reply[1])
        if code == 0:
            return None
        if code == -1:
            raise IllegalTransition(JobState(reply[1]), target)
        raise JobNotFound(job_id)

    async def update(self, job_id: str, fields: dict[str, Any], event: NewEvent | None = None) -> JobRecord | None:
        if "state" in fields:
            raise ValueError("state changes go through transition()")
        fv = encode_fields(fields)
        reply = unpack(await self._eval("update", self._job_keys(job_id), [
            encode_event(event, self._now_ms()) if event is not None else "", *fv,
        ]))
        return None if reply is None else decode_record(reply)

    async def append_event(self, job_id: str, event: NewEvent) -> JobEvent:
        now = self._now_ms()
        seq = int(await self._eval("append", self._job_keys(job_id), [encode_event(event, now)]))
        if seq < 0:
            raise JobNotFound(job_id)
        return JobEvent(seq=seq, event=event.event, stage=event.stage, timestamp_ms=now, data=dict(event.data))

    async def append_worker_event(self, job_id: str, attempt: int, index: int, event: NewEvent) -> JobEvent | None:
        now = self._now_ms()
        seq = int(await self._eval("append_worker", self._job_keys(job_id),
                                   [int(attempt), int(index), encode_event(event, now)]))
        if seq < 0:
            raise JobNotFound(job_id)
        if seq == 0:
            return None
        return JobEvent(seq=seq, event=event.event, stage=event.stage, timestamp_ms=now, data=dict(event.data))

    async def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        reply = unpack(await self._eval("events", self._job_keys(job_id), [f"{max(after_seq, 0) + 1}-0"]))
        if reply is None:
            raise JobNotFound(job_id)
        return [decode_entry(e) for e in arr(reply[0])]

    def subscribe(self, job_id: str, after_seq: int, on_event: EventCallback) -> Subscription:
        """Replay (XRANGE) from ``after_seq``, then join the shared reader; delivery is
        asynchronous (callbacks run on the reactor, in seq order, each seq once)."""
        if self._reader is None or self._closed:
            raise StoreUnavailable(f"redis at {self.target.address}: not connected")
        sub = RedisSubscription(self._reader, job_id, max(after_seq, 0), on_event)
        d = Deferred.fromCoroutine(self._attach(sub))
        self._attaching.add(d)

        def done(result):
            self._attaching.discard(d)
            if isinstance(result, defer.Failure) and not result.check(defer.CancelledError):
                log.err(result, f"event subscription of job {job_id} failed")

        d.addBoth(done)
        return sub

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
            for entry in arr(entries):
                sub.deliver(decode_entry(entry))
            stream_last = int(str(last_id).split("-", 1)[0]) if last_id else 0
            if sub.closed or self._reader.attach(sub, stream_last):
                return

    async def claim_idempotency(self, key: str, fingerprint: str, job_id: str) -> tuple[str, str] | None:
        held = await self._eval("claim", [f"{self._prefix}idem:{key}"], [
            self._prefix, job_id, fingerprint, int(self.idem_pending_grace_s * 1000),
            max(self._retention_ms, int(self.idem_pending_grace_s * 1000)),
        ])
        if held is None:
            return None
        value = json.loads(held)
        return value[0], value[1]

    async def expire(self) -> int:
        """Redis drops terminal jobs itself (PEXPIRE); this removes their index entries and
        returns how many jobs were cleaned."""
        total = 0
        for _ in range(1000):
            dropped, scanned = await self._eval("expire", [], [self._prefix, self.expire_batch, *STATE_NAMES])
            total += int(dropped)
            if int(scanned) < self.expire_batch or int(dropped) == 0:
                break
        return total

    # -- several gateways ---------------------------------------------------------------------

    shared = True

    async def states(self, job_ids) -> dict[str, JobState]:
        ids = list(job_ids)
        if not ids:
            return {}
        reply = arr(unpack(await self._eval("states", [], [self._prefix, *ids])))
        return {job_id: JobState(state) for job_id, state in zip(ids, reply, strict=False) if state}

    async def refresh_lease(self, gateway_id: str, ttl_s: float) -> bool:
        reply = await self._eval("lease", [], [self._prefix, gateway_id, max(1, int(ttl_s * 1000))])
        return bool(int(reply[1])) if isinstance(reply, list) and len(reply) > 1 else False

    async def identity(self, candidate: str) -> str:
        return str(await self._eval("identity", [], [self._prefix, candidate]))

    async def live_gateways(self) -> set[str]:
        return set(arr(unpack(await self._eval("live", [], [self._prefix]))))

    async def orphans(self, live, limit: int = 500) -> list[tuple[str, str, JobState]]:
        reply = arr(unpack(await self._eval("orphans", [], [self._prefix, int(limit), csv(live)])))
        return [(job_id, owner, JobState(state)) for job_id, owner, state in reply]

    async def adopt(self, job_id: str, from_owner: str, to_owner: str) -> bool:
        return int(await self._eval("adopt", [self._job_key(job_id)], [from_owner, to_owner])) == 1

    # -- artifacts (bytes shared by every gateway, kept for the retention) --------------------

    def _artifact_key(self, sha256: str) -> str:
        return f"{self._prefix}artifact:{sha256}"

    async def put_artifact(self, sha256: str, mime: str, blob: bytes) -> None:
        payload = mime + "\n" + base64.b64encode(blob).decode()
        await self._call("SET", self._artifact_key(sha256), payload, "PX", self._retention_ms)

    async def get_artifact(self, sha256: str) -> tuple[bytes, str] | None:
        payload = await self._call("GET", self._artifact_key(sha256))
        if not payload:
            return None
        mime, _, data = str(payload).partition("\n")
        return base64.b64decode(data), mime

    # -- introspection (tests, readiness) -----------------------------------------------------

    def subscriber_count(self) -> int:
        return 0 if self._reader is None else self._reader.subscriber_count()
