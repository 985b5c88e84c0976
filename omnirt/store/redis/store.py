"""The Redis JobStore: every write one Lua script, reads packed by Lua, live events through the
shared stream reader (the key layout is in the package docstring)."""

from __future__ import annotations

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
from omnirt.store import upstream_format
from omnirt.store.base import (
    JobNotFound,
    JobStore,
    NewEvent,
    NotReplicated,
    StoreUnavailable,
)
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
from omnirt.store.redis.connection import UNAVAILABLE_REPLIES, Connection, describe, endpoint_for
from omnirt.store.redis.leases import RedisLeases, artifact_payload
from omnirt.store.redis.outbox import RedisOutbox
from omnirt.store.redis.reader import StreamReader
from omnirt.store.redis.scripts import load_scripts
from omnirt.store.redis.sentinel import MasterEndpoint, SentinelMonitor
from omnirt.store.redis.streams import RedisStreams
from omnirt.store.redis.url import SentinelTarget, parse_store_url

__all__ = ["RedisJobStore"]


class RedisJobStore(RedisStreams, RedisLeases, RedisOutbox, JobStore):
    """JobStore on Redis; see the module docstring for the keys. ``clock`` is the reactor (time,
    call deadlines, TCP). Call ``connect()`` before use and ``close()`` at the end.

    ``url`` is ``redis://``, ``rediss://`` or ``redis+sentinel://`` (the master found and followed
    through Sentinel, see ``sentinel``). With ``min_replicas`` N > 0 a job's creation and its
    terminal transition are followed by ``WAIT N wait_timeout_s``: a create that fewer replicas
    acknowledged is removed again and raises NotReplicated (a 503). ``metrics`` may carry
    ``store_failovers`` and ``store_wait_timeouts`` counters."""

    backend_name = "redis"
    #: a claimed idempotency key whose job does not exist yet is honoured this long
    idem_pending_grace_s = 30.0
    #: expire() drops at most this many jobs per Redis call (it loops)
    expire_batch = 500
    #: ``transition(worker_events=...)``: a worker's last events and its outcome in one script
    outcome_with_events = True

    def __init__(
        self,
        clock: IReactorTime,
        *,
        url: str,
        namespace: str = "omnirt",
        retention_s: float = 86400.0,
        call_timeout_s: float = 2.0,
        gateway_id: str | None = None,
        min_replicas: int = 0,
        wait_timeout_s: float = 1.0,
        metrics: Any = None,
    ):
        self._clock = clock
        self.target = parse_store_url(url)
        if min_replicas < 0:
            raise ValueError("min_replicas must be >= 0")
        if wait_timeout_s <= 0:
            raise ValueError("the replica acknowledgement timeout must be > 0")
        self.min_replicas = int(min_replicas)
        self.wait_timeout_s = float(wait_timeout_s)
        self._metrics = metrics
        self.wait_timeouts = 0
        self.monitor: SentinelMonitor | None = None
        #: the store's identity (``P store:id``); a different or missing one means Redis came back empty
        self.identity: str | None = None
        self.resets = 0
        self.last_reset: str | None = None
        self._dur: Connection | None = None
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
        name = f"omnirt-{tag}-{role}"
        if self.monitor is None:
            endpoint = endpoint_for(self._clock, self.target, self.call_timeout_s)
            return Connection(self.target, endpoint, name, reply_timeout_s)
        assert isinstance(self.target, SentinelTarget)
        endpoint = MasterEndpoint(self._clock, self.monitor, self.call_timeout_s)
        conn = Connection(self.target.node(self.target.master_name, 0), endpoint, name, reply_timeout_s,
                          monitor=self.monitor, master_only=True)
        self.monitor.follow(conn)
        return conn

    @property
    def address(self) -> str:
        """Where the data is now: host:port (the current master with Sentinel)."""
        return self.monitor.address if self.monitor is not None else self.target.address

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"redis at {self.address}: {what}: {describe(exc)}")

    def _count(self, name: str) -> None:
        counter = getattr(self._metrics, name, None)
        if counter is not None:
            counter.inc()

    async def connect(self) -> None:
        """Open the command connection and the event reader; StoreUnavailable if Redis cannot be
        reached (within about ``call_timeout_s``) or refuses the credentials."""
        if self._cmd is not None:
            return
        if isinstance(self.target, SentinelTarget):
            self.monitor = SentinelMonitor(self._clock, self.target, timeout_s=self.call_timeout_s,
                                           name=self.gateway_id or self._tag,
                                           on_failover=lambda: self._count("store_failovers"))
            try:
                await self.monitor.start()
            except StoreUnavailable as exc:
                await self.monitor.close()
                self.monitor = None
                raise StoreUnavailable(f"cannot find the redis master: {exc}") from None
        else:
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
        conns = [cmd, reader_conn]
        if self.min_replicas:
            # WAIT counts the writes of its own connection and blocks it: acknowledged writes
            # (creates, terminal transitions) get a connection of their own
            self._dur = self._connection("durable", self.wait_timeout_s + self.call_timeout_s)
            conns.append(self._dur)
        both = defer.gatherResults([c.ready for c in conns], consumeErrors=True)
        both.addTimeout(self.call_timeout_s * 2, self._clock)
        try:
            await both
            await self._call("PING")
            self.identity = str(await self._eval("identity", [], [self._prefix, uuid.uuid4().hex]))
        except Exception as exc:
            reason = self._cmd_failure(exc, *conns)
            self._cmd = self._dur = None
            await self._disconnect(*conns)
            if self.monitor is not None:
                await self.monitor.close()
            raise StoreUnavailable(f"cannot connect to redis at {self.address}: {reason}") from None
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
        if self.monitor is not None:
            self.monitor._closed = True
        if self._reader is not None:
            self._reader.stop()
            reader_conn = self._reader._conn
        await self._disconnect(self._cmd, reader_conn, self._dur)
        if self.monitor is not None:
            await self.monitor.close()
        if self._reader is not None and self._reader.loop is not None:
            await self._reader.loop

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, *args) -> Any:
        return await self._call_on(self._cmd, *args)

    async def _call_on(self, conn: Connection | None, *args, timeout_s: float | None = None) -> Any:
        if conn is None:
            raise StoreUnavailable(f"redis at {self.address}: not connected")
        d = conn.execute(*args)
        d.addTimeout(timeout_s or self.call_timeout_s, self._clock)
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
                if self.monitor is not None and str(exc).startswith("READONLY"):
                    self.monitor.invalidate(f"{self.address} answered READONLY (a demoted master)")
                if str(exc).startswith(UNAVAILABLE_REPLIES):
                    raise self._unavailable(str(args[0]), exc) from None
                if upstream_format.is_wrongtype(exc):
                    # a key of this namespace holds another format (upstream OmniRT 0.1 records)
                    raise upstream_format.namespace_conflict(self.namespace, _key_of(args)) from None
                raise
            if isinstance(exc, defer.TimeoutError | txredisapi.ConnectionError | ConnectionError):
                raise self._unavailable(str(args[0]), exc) from None
            raise

    async def _eval(self, name: str, keys: list[str], args: list[Any], conn: Connection | None = None) -> Any:
        script = self._scripts[name]
        conn = conn or self._cmd
        try:
            return await self._call_on(conn, "EVALSHA", script.sha, len(keys), *keys, *args)
        except txredisapi.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._call_on(conn, "EVAL", script.src, len(keys), *keys, *args)

    async def _acknowledged(self, what: str) -> bool:
        """``WAIT min_replicas`` for the writes just made on the durable connection: True when
        enough replicas have them."""
        try:
            acked = await self._call_on(self._dur, "WAIT", self.min_replicas, max(1, int(self.wait_timeout_s * 1000)),
                                        timeout_s=self.wait_timeout_s + self.call_timeout_s)
        except StoreUnavailable as exc:
            log.msg(f"{what}: replica acknowledgement lost: {exc}")
            acked = 0
        if int(acked) >= self.min_replicas:
            return True
        self.wait_timeouts += 1
        self._count("store_wait_timeouts")
        log.msg(f"{what}: {acked} of {self.min_replicas} replica(s) acknowledged within {self.wait_timeout_s:g}s")
        return False

    async def find_upstream_records(self) -> str | None:
        """A one-line problem when this namespace holds upstream OmniRT 0.1 records (bounded scan),
        else None; run once after ``connect`` (gateway and worker startup)."""
        return await upstream_format.find_upstream_records(self._call, self.namespace)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # -- JobStore ----------------------------------------------------------------------------

    async def ping(self) -> None:
        reply = await self._call("PING")
        if reply != "PONG":
            raise StoreUnavailable(f"redis at {self.address}: unexpected PING reply")

    async def create(self, record: JobRecord, event: NewEvent) -> JobRecord:
        data = record.model_dump(mode="json", exclude={"events"})
        state = data.pop("state")
        fv: list[str] = []
        for name, value in data.items():
            fv += [name, json.dumps(value, separators=(",", ":"))]
        fv += self._hook_fields(record)
        created = await self._eval("create", self._job_keys(record.id), [
            self._prefix, record.id, state, record.request.model, record.idempotency_key or "",
            self.gateway_id or "", "1" if record.state.terminal else "0", self._retention_ms,
            encode_event(event, self._now_ms()), *fv,
        ], conn=self._dur)
        if int(created) == 0:
            raise ValueError(f"job {record.id} exists")
        if self.min_replicas and not await self._acknowledged(f"job {record.id} create"):
            await self._discard(record)
            raise NotReplicated(
                f"redis at {self.address}: the job was not acknowledged by {self.min_replicas} replica(s) "
                f"within {self.wait_timeout_s:g}s; it was not accepted")
        return record.model_copy(update={"events": []})

    async def _discard(self, record: JobRecord) -> None:
        """Remove a create that was not acknowledged (nothing half-created is left behind)."""
        try:
            await self._eval("discard", self._job_keys(record.id), [self._prefix, record.id], conn=self._dur)
        except Exception as exc:  # the lease's self-heal would then run it: say so
            log.msg(f"job {record.id}: unacknowledged create could not be removed: {describe(exc)}")

    async def get(self, job_id: str, *, with_events: bool = False) -> JobRecord | None:
        reply = unpack(await self._eval("get", self._job_keys(job_id), ["1" if with_events else "0"]))
        if reply is None:
            return None
        record = decode_record(reply[0])
        if with_events:
            record = record.model_copy(update={"events": [ev for e in arr(reply[1]) for ev in decode_entry(e)]})
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
        *,
        defaults: dict[str, Any] | None = None,
        artifacts: Collection[tuple[str, str, bytes]] = (),
        worker_events: tuple[int, list[tuple[int, NewEvent]]] | None = None,
    ) -> JobRecord | None:
        """``defaults``: fields set only where the job has none yet (one call, no read first);
        ``artifacts``: ``(sha256, mime, bytes)`` put in the same script when the move applies
        (an outcome and its outputs in one round trip); ``worker_events``: ``(attempt, [(index,
        event)])`` appended before ``event`` as ``append_worker_events`` would (also when the
        move does not apply), in the same script."""
        target = JobState(target)
        fv = encode_fields({k: v for k, v in (fields or {}).items() if k != "state"})
        dv = encode_fields(defaults or {})
        av: list[Any] = []
        for sha, mime, blob in artifacts:
            av += [self._artifact_key(sha), artifact_payload(mime, blob)]
        now = self._now_ms()
        wv: list[Any] = ["", 0]
        if worker_events is not None:
            wv = [int(worker_events[0]), len(worker_events[1])]
            for index, worker_event in worker_events[1]:
                wv += [int(index), encode_event(worker_event, now)]
        sources = [s.value for s, targets in ALLOWED_TRANSITIONS.items() if target in targets]
        owner = (self.gateway_id or "") if target == JobState.running else ""
        durable = self.min_replicas > 0 and target.terminal
        reply = unpack(await self._eval("transition", self._job_keys(job_id), [
            self._prefix, job_id, csv(JobState(s).value for s in expected), target.value, csv(sources),
            "1" if target.terminal else "0", self._retention_ms,
            encode_event(event, now) if event is not None else "", owner,
            len(dv) // 2, *dv, len(av) // 2, *av, *wv, *fv,
        ], conn=self._dur if durable else None))
        code = int(reply[0])
        if code == 1:
            if durable:
                # a terminal state a failover could undo would let the job run again: wait for
                # the replicas (a shortfall is counted and logged; the state stays)
                await self._acknowledged(f"job {job_id} {target.value}")
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

    async def append_worker_events(self, job_id: str, attempt: int, events: list[tuple[int, NewEvent]], *,
                                   fields: dict[str, Any] | None = None) -> list[JobEvent | None]:
        """The whole burst in one script call (one round trip, one HMGET/HSET of the attempt's
        mark), ``fields`` set in the same call."""
        if not events:
            return []
        now = self._now_ms()
        fv = encode_fields(fields or {})
        args: list[Any] = [int(attempt), len(fv) // 2, *fv]
        for index, event in events:
            args += [int(index), encode_event(event, now)]
        reply = await self._eval("append_worker_batch", self._job_keys(job_id), args)
        if isinstance(reply, int):  # -1: no such job
            raise JobNotFound(job_id)
        out: list[JobEvent | None] = []
        for seq, (_, event) in zip(arr(unpack(reply)), events, strict=True):
            e: NewEvent = event
            out.append(JobEvent(seq=int(seq), event=e.event, stage=e.stage, timestamp_ms=now, data=dict(e.data))
                       if int(seq) > 0 else None)
        return out

    async def set_fields(self, job_id: str, fields: dict[str, Any]) -> bool:
        """Set non-state fields of an existing job, nothing read back; False when there is no such job."""
        if "state" in fields:
            raise ValueError("state changes go through transition()")
        if not fields:
            return True
        return int(await self._eval("set_fields", [self._job_key(job_id)], encode_fields(fields))) == 1

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

    # -- introspection (tests, readiness) -----------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Readiness detail: ``state`` ok | degraded (switching master), ``master``, failovers."""
        if self.monitor is not None:
            out = self.monitor.status()
        else:
            out = {"state": "ok", "master": self.target.address}
        out["min_replicas"] = self.min_replicas
        out["wait_timeouts"] = self.wait_timeouts
        if self.resets:
            out["resets"] = self.resets
            out["last_reset"] = self.last_reset
        return out



def _key_of(args: tuple[Any, ...]) -> str:
    """The first key a command names (EVAL/EVALSHA: the first of its KEYS), or ""."""
    name = str(args[0]).upper() if args else ""
    if name in ("EVAL", "EVALSHA"):
        return str(args[3]) if len(args) > 3 and str(args[2]) not in ("0", "") else ""
    return str(args[1]) if len(args) > 1 else ""
