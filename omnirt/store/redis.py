"""Redis JobStore (txredisapi): job hashes, one Stream per job's events, Lua compare-and-set.

Data model (``P`` = ``{namespace}:``; all values are strings)::

    P job:{id}          hash   state (raw), _seq (last event seq), _order (creation counter),
                               _model, _idem (idempotency key), _owner (gateway id),
                               _expires_at_ms (once terminal), and every other JobRecord field
                               (request, result, error, worker_id, timestamps, attempts, ...)
                               JSON-encoded under its own name
    P job:{id}:events   stream one entry per event, entry id ``{seq}-0``, field ``e`` = JSON of
                               {event, stage, timestamp_ms, data}; replay from seq n is
                               ``XRANGE key {n+1}-0 +``
    P jobs              zset   every job, score = creation counter (newest = highest)
    P state:{state}     zset   jobs per state (moved atomically by transitions), same score
    P model:{model}     zset   jobs per model, same score
    P terminal          zset   member JSON [id, model], score = the ms its keys expire (Redis TIME)
    P idem:{key}        string JSON [job_id, fingerprint, claimed_at_ms]
    P order             string the creation counter
    P wake:{uuid}       stream one per store: XADDed to wake the blocking reader (MAXLEN 1, TTL)

Every write is ONE Lua script (EVALSHA, EVAL on NOSCRIPT) so state and events never disagree;
entering a terminal state PEXPIREs the hash, the stream and the idempotency key together
(retention), and ``expire()`` only cleans the indexes of jobs Redis has already dropped. The
scripts build index key names from the namespace, so this runs on one Redis (or a primary with
replicas), not on Redis Cluster.

Live events: one dedicated connection per store runs ``XREAD BLOCK`` over every stream that has
a live subscriber and fans entries out in-process; subscribers never cost a connection.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from collections.abc import Collection
from functools import cache
from hashlib import sha1
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from pydantic import TypeAdapter
from pydantic_core import to_jsonable_python
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python import log
from zope.interface import implementer

from omnirt.contract import ALLOWED_TRANSITIONS, IllegalTransition, JobEvent, JobRecord, JobState
from omnirt.store.base import EventCallback, JobNotFound, JobStore, NewEvent, StoreUnavailable, Subscription

__all__ = ["RedisJobStore", "RedisTarget", "parse_redis_url"]

# ---------------------------------------------------------------------------------------------
# URL


@dataclasses.dataclass(frozen=True, repr=False)
class RedisTarget:
    """Where Redis is. ``repr``/``str`` never show the password."""

    host: str
    port: int
    db: int | None
    username: str | None
    password: str | None
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def redacted(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        elif self.username:
            auth = f"{self.username}@"
        db = f"/{self.db}" if self.db is not None else ""
        return f"{scheme}://{auth}{self.address}{db}"

    def __repr__(self) -> str:
        return f"RedisTarget({self.redacted})"

    __str__ = __repr__


_TLS_PARAMS = {"ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile"}


def parse_redis_url(url: str) -> RedisTarget:
    """``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...`` (TLS; query parameters
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs=none|required``).
    Error messages never repeat the URL (it may hold a password)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("invalid Redis URL (expected redis://[:password@]host[:port][/db])") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (use redis:// or rediss://)")
    db: int | None = None
    path = parts.path.strip("/")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if "db" in query:
        path = path or query.pop("db")
    if path:
        try:
            db = int(path)
        except ValueError:
            raise ValueError("invalid Redis URL: the path must be a database number") from None
    unknown = set(query) - _TLS_PARAMS - {"db"}
    if unknown:
        raise ValueError(f"unsupported Redis URL parameters: {', '.join(sorted(unknown))}")
    tls = parts.scheme == "rediss"
    if not tls and set(query) & _TLS_PARAMS:
        raise ValueError("ssl_* Redis URL parameters need rediss://")
    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in ("none", "required"):
        raise ValueError("ssl_cert_reqs must be none or required")
    return RedisTarget(
        host=parts.hostname or "localhost",
        port=port or 6379,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=tls,
        ca_certs=query.get("ssl_ca_certs"),
        certfile=query.get("ssl_certfile"),
        keyfile=query.get("ssl_keyfile"),
        verify=cert_reqs == "required",
    )


# ---------------------------------------------------------------------------------------------
# Lua
#
# Scripts that return records or events return them as ONE cjson-encoded string: txredisapi's
# parser spends a reactor turn per bulk string of a multi-bulk reply (an HGETALL of a job is ~50),
# so packing makes reads and transitions several times cheaper. (cjson encodes an empty array as
# ``{}``: ``_arr`` reads both.)

_RETAIN = """
local function retain(P, id, hash, stream, retention_ms)
  local t = redis.call('TIME')
  local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + retention_ms
  redis.call('PEXPIRE', hash, retention_ms)
  redis.call('PEXPIRE', stream, retention_ms)
  local idem = redis.call('HGET', hash, '_idem')
  if idem and idem ~= '' then
    local ik = P .. 'idem:' .. idem
    local v = redis.call('GET', ik)
    if v and cjson.decode(v)[1] == id then redis.call('PEXPIRE', ik, retention_ms) end
  end
  local model = redis.call('HGET', hash, '_model') or ''
  redis.call('ZADD', P .. 'terminal', deadline, cjson.encode({id, model}))
  redis.call('HSET', hash, '_expires_at_ms', deadline)
end
"""

_APPEND = """
local function append(hash, stream, ev)
  local seq = redis.call('HINCRBY', hash, '_seq', 1)
  redis.call('XADD', stream, seq .. '-0', 'e', ev)
  return seq
end
"""

# KEYS: hash, stream. ARGV: P, id, state, model, idem, owner, terminal, retention_ms, event, f1, v1, ...
_CREATE = _RETAIN + _APPEND + """
local P, id, state, model, idem = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
local order = redis.call('INCR', P .. 'order')
local fv = {'state', state, '_model', model, '_idem', idem, '_owner', ARGV[6], '_order', order, '_seq', 0}
for i = 10, #ARGV do fv[#fv + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fv))
redis.call('ZADD', P .. 'jobs', order, id)
redis.call('ZADD', P .. 'state:' .. state, order, id)
redis.call('ZADD', P .. 'model:' .. model, order, id)
if idem ~= '' then
  local ik = P .. 'idem:' .. idem
  local v = redis.call('GET', ik)
  if v and cjson.decode(v)[1] == id then redis.call('PERSIST', ik) end
end
append(KEYS[1], KEYS[2], ARGV[9])
if ARGV[7] == '1' then retain(P, id, KEYS[1], KEYS[2], tonumber(ARGV[8])) end
return order
"""

# KEYS: hash, stream. ARGV: P, id, ",expected,", target, ",allowed sources,", terminal,
# retention_ms, event ('' = none), owner ('' = keep), f1, v1, ...
# Returns {1, hgetall} applied | {0, state} CAS lost | {-1, state} illegal | {-2} no such job.
_TRANSITION = _RETAIN + _APPEND + """
local P, id, target = ARGV[1], ARGV[2], ARGV[4]
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return cjson.encode({-2}) end
if not string.find(ARGV[3], ',' .. cur .. ',', 1, true) then return cjson.encode({0, cur}) end
if not string.find(ARGV[5], ',' .. cur .. ',', 1, true) then return cjson.encode({-1, cur}) end
local fv = {'state', target}
for i = 10, #ARGV do fv[#fv + 1] = ARGV[i] end
if ARGV[9] ~= '' then fv[#fv + 1] = '_owner'; fv[#fv + 1] = ARGV[9] end
redis.call('HSET', KEYS[1], unpack(fv))
if cur ~= target then
  local order = redis.call('HGET', KEYS[1], '_order')
  redis.call('ZREM', P .. 'state:' .. cur, id)
  redis.call('ZADD', P .. 'state:' .. target, order, id)
end
if ARGV[8] ~= '' then append(KEYS[1], KEYS[2], ARGV[8]) end
if ARGV[6] == '1' then retain(P, id, KEYS[1], KEYS[2], tonumber(ARGV[7])) end
return cjson.encode({1, redis.call('HGETALL', KEYS[1])})
"""

# KEYS: hash, stream. ARGV: event ('' = none), f1, v1, ...  Returns hgetall or nil (no job).
_UPDATE = _APPEND + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if #ARGV > 1 then
  local fv = {}
  for i = 2, #ARGV do fv[#fv + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fv))
end
if ARGV[1] ~= '' then append(KEYS[1], KEYS[2], ARGV[1]) end
return cjson.encode(redis.call('HGETALL', KEYS[1]))
"""

# KEYS: hash, stream. ARGV: event. Returns the new seq, or -1 (no job).
_APPEND_EVENT = _APPEND + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return append(KEYS[1], KEYS[2], ARGV[1])
"""

# KEYS: hash, stream. ARGV: attempt, index, event. Appends unless this attempt's event #index is
# already stored. Returns the new seq, 0 (already there) or -1 (no job).
_APPEND_WORKER_EVENT = _APPEND + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local field = '_w' .. ARGV[1]
local have = tonumber(redis.call('HGET', KEYS[1], field) or '0')
if tonumber(ARGV[2]) <= have then return 0 end
redis.call('HSET', KEYS[1], field, ARGV[2])
return append(KEYS[1], KEYS[2], ARGV[3])
"""

# KEYS: hash, stream. ARGV: with_events ('1'/'0'). Returns {hgetall[, entries]} or nil.
_GET = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
if ARGV[1] == '1' then return cjson.encode({h, redis.call('XRANGE', KEYS[2], '-', '+')}) end
return cjson.encode({h})
"""

# KEYS: hash, stream. ARGV: first id. Returns {entries} or nil (no job).
_EVENTS = """
local entries = redis.call('XRANGE', KEYS[2], ARGV[1], '+')
if #entries == 0 and redis.call('EXISTS', KEYS[1]) == 0 then return false end
return cjson.encode({entries})
"""

# KEYS: stream. ARGV: first id. Returns {entries, last entry id or ''} (subscription replay).
_REPLAY = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+')
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then return cjson.encode({entries, ''}) end
return cjson.encode({entries, last[1][1]})
"""

# KEYS: idem key. ARGV: P, job_id, fingerprint, pending_grace_ms, pending_ttl_ms.
# Returns the held JSON value, or nil when this call claimed the key.
_CLAIM = """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('GET', KEYS[1])
if v then
  local h = cjson.decode(v)
  if redis.call('EXISTS', P .. 'job:' .. h[1]) == 1 or now - (tonumber(h[3]) or 0) < tonumber(ARGV[4]) then
    return v
  end
end
local value = cjson.encode({ARGV[2], ARGV[3], now})
local pttl = redis.call('PTTL', P .. 'job:' .. ARGV[2])
if pttl == -1 then
  redis.call('SET', KEYS[1], value)
elseif pttl > 0 then
  redis.call('SET', KEYS[1], value, 'PX', pttl)
else
  redis.call('SET', KEYS[1], value, 'PX', ARGV[5])
end
return false
"""

# ARGV: P, state ('' = any), model ('' = any), limit. Returns a list of hgetall, newest first.
_LIST = """
local P, state, model, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local idx, check_state, check_model = P .. 'jobs', false, false
if state ~= '' and model ~= '' then
  local a, b = P .. 'state:' .. state, P .. 'model:' .. model
  if redis.call('ZCARD', a) <= redis.call('ZCARD', b) then idx = a; check_model = true
  else idx = b; check_state = true end
elseif state ~= '' then idx = P .. 'state:' .. state
elseif model ~= '' then idx = P .. 'model:' .. model end
local out = {}
local start, batch = 0, math.max(limit * 2, 64)
while #out < limit do
  local ids = redis.call('ZREVRANGE', idx, start, start + batch - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local key = P .. 'job:' .. id
    local ok = true
    if check_state or check_model then
      local v = redis.call('HMGET', key, 'state', '_model')
      ok = v[1] and (not check_state or v[1] == state) and (not check_model or v[2] == model)
    end
    if ok then
      local h = redis.call('HGETALL', key)
      if #h > 0 then
        out[#out + 1] = h
        if #out >= limit then break end
      end
    end
  end
  start = start + batch
end
return cjson.encode(out)
"""

# ARGV: P, batch, state1, state2, ...  Returns {dropped, scanned}.
_EXPIRE = """
local P, batch = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members = redis.call('ZRANGEBYSCORE', P .. 'terminal', '-inf', now, 'LIMIT', 0, batch)
local n = 0
for _, m in ipairs(members) do
  local e = cjson.decode(m)
  local id, model = e[1], e[2]
  if redis.call('EXISTS', P .. 'job:' .. id) == 0 then
    redis.call('ZREM', P .. 'jobs', id)
    for i = 3, #ARGV do redis.call('ZREM', P .. 'state:' .. ARGV[i], id) end
    if model ~= '' then redis.call('ZREM', P .. 'model:' .. model, id) end
    redis.call('ZREM', P .. 'terminal', m)
    n = n + 1
  end
end
return {n, #members}
"""

# ARGV: P, gateway_id, ttl_ms. A lease is a member of the P gateways zset scored by its deadline.
_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', ARGV[1] .. 'gateways', now + tonumber(ARGV[3]), ARGV[2])
redis.call('ZREMRANGEBYSCORE', ARGV[1] .. 'gateways', '-inf', now - 86400000)
return now
"""

# ARGV: P. Returns the ids of gateways whose lease has not run out.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return cjson.encode(redis.call('ZRANGEBYSCORE', ARGV[1] .. 'gateways', now, '+inf'))
"""

# ARGV: P, limit, ",live1,live2,". Returns {{id, owner, state}...} of unfinished jobs whose owner
# is not live.
_ORPHANS = """
local P, limit, live = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
for _, state in ipairs({'queued', 'running', 'cancelling'}) do
  local ids = redis.call('ZRANGE', P .. 'state:' .. state, 0, -1)
  for _, id in ipairs(ids) do
    local v = redis.call('HMGET', P .. 'job:' .. id, 'state', '_owner')
    if v[1] and not string.find(live, ',' .. (v[2] or '') .. ',', 1, true) then
      out[#out + 1] = {id, v[2] or '', v[1]}
      if #out >= limit then return cjson.encode(out) end
    end
  end
end
return cjson.encode(out)
"""

# KEYS: hash. ARGV: from_owner, to_owner. 1 when the job moved to the new owner.
_ADOPT = """
local v = redis.call('HGET', KEYS[1], '_owner')
if v == false or v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], '_owner', ARGV[2])
return 1
"""

# ARGV: P, id1, id2, ... Returns {state or '' per id}.
_STATES = """
local out = {}
for i = 2, #ARGV do
  out[#out + 1] = redis.call('HGET', ARGV[1] .. 'job:' .. ARGV[i], 'state') or ''
end
return cjson.encode(out)
"""

# KEYS: wake stream. ARGV: ttl_ms.
_WAKE = """
redis.call('XADD', KEYS[1], 'MAXLEN', '1', '*', 'w', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


class _Script:
    __slots__ = ("name", "src", "sha")

    def __init__(self, name: str, src: str):
        self.name = name
        self.src = src
        self.sha = sha1(src.encode()).hexdigest()


_SCRIPTS = {
    name: _Script(name, src)
    for name, src in {
        "create": _CREATE, "transition": _TRANSITION, "update": _UPDATE, "append": _APPEND_EVENT,
        "get": _GET, "events": _EVENTS, "replay": _REPLAY, "claim": _CLAIM, "list": _LIST, "expire": _EXPIRE, "wake": _WAKE,
        "append_worker": _APPEND_WORKER_EVENT, "lease": _LEASE, "live": _LIVE, "orphans": _ORPHANS, "adopt": _ADOPT, "states": _STATES,
    }.items()
}

# ---------------------------------------------------------------------------------------------
# Record and event encoding

_RECORD_FIELDS = frozenset(name for name in JobRecord.model_fields if name != "events")
_STATE_NAMES = tuple(s.value for s in JobState)


@cache
def _adapter(field: str) -> TypeAdapter:
    return TypeAdapter(JobRecord.model_fields[field].annotation)


def _encode_fields(fields: dict[str, Any] | None) -> list[str]:
    """``[name, json, ...]`` for a partial update; each value validated against JobRecord."""
    out: list[str] = []
    for name, value in (fields or {}).items():
        if name not in _RECORD_FIELDS or name in ("id", "state"):
            raise ValueError(f"cannot set job field {name!r}")
        adapter = _adapter(name)
        out += [name, adapter.dump_json(adapter.validate_python(value)).decode()]
    return out


def _arr(value: Any) -> list:
    """A Lua array from cjson (an empty one arrives as ``{}``)."""
    return value if isinstance(value, list) else []


def _unpack(reply: Any) -> Any:
    return None if reply is None else json.loads(reply)


def _pairs(flat: list) -> dict[str, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _decode_record(flat: list) -> JobRecord:
    h = _pairs(flat)
    data: dict[str, Any] = {k: json.loads(v) for k, v in h.items() if k in _RECORD_FIELDS and k != "state"}
    data["state"] = h["state"]
    return JobRecord.model_validate(data)


def _encode_event(event: NewEvent, timestamp_ms: int) -> str:
    return json.dumps(
        {"event": event.event, "stage": event.stage, "timestamp_ms": timestamp_ms, "data": event.data},
        separators=(",", ":"), default=to_jsonable_python,
    )


def _decode_entry(entry: list) -> JobEvent:
    entry_id, fields = entry[0], _arr(entry[1])
    body = json.loads(_pairs(fields)["e"])
    return JobEvent(seq=int(str(entry_id).split("-", 1)[0]), **body)


# ---------------------------------------------------------------------------------------------
# Connections


#: handshake replies that mean "your configuration is wrong": stop reconnecting, report it
_FATAL_HANDSHAKE = ("WRONGPASS", "invalid password", "invalid username", "without any password",
                    "DB index is out of range", "invalid DB index")


class _HandshakeProtocol(txredisapi.RedisProtocol):
    """txredisapi's connection with our own handshake (AUTH, SELECT, CLIENT SETNAME).

    txredisapi gives up reconnecting for good when AUTH or SELECT fails for ANY reason, a reply
    timeout included: a Redis that is paused (SIGSTOP, swapping) or still loading would stop the
    store until a restart. Here only bad credentials / a bad db number are final; any other
    failure drops the connection and the factory reconnects with its backoff."""

    @defer.inlineCallbacks
    def connectionMade(self):
        name = getattr(self.factory, "omnirt_client_name", None)
        try:
            if self.password is not None:
                reply = yield self.auth(self.password, self.username)
                if isinstance(reply, Exception):
                    raise reply
            if self.dbid is not None:
                reply = yield self.select(self.dbid)
                if isinstance(reply, Exception):
                    raise reply
            if name:
                yield self.execute_command("CLIENT", "SETNAME", name)
        except Exception as exc:
            text = str(exc)
            if isinstance(exc, txredisapi.ResponseError) and any(m in text for m in _FATAL_HANDSHAKE):
                self.factory.stopTrying()
                self.transport.loseConnection()
                self.factory.connectionError(f"Redis refused the connection setup: {text}")
            elif self.transport is not None:
                self.transport.abortConnection()
            return None
        self.connected = 1
        self._ready = True
        self._waiting_for_connect, waiting = [], self._waiting_for_connect
        for d in waiting:
            d.callback(self)


@implementer(IStreamClientEndpoint)
class _TLSEndpoint:
    """TLS over another endpoint; accepts a connection creator or an old-style context factory."""

    def __init__(self, wrapped, creator):
        self._wrapped = wrapped
        self._creator = creator

    def connect(self, factory):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        wrapper = TLSMemoryBIOFactory(self._creator, True, factory)
        return self._wrapped.connect(wrapper).addCallback(lambda p: p.wrappedProtocol)


def _tls_creator(target: RedisTarget):
    from twisted.internet import ssl

    client_cert = None
    if target.certfile:
        pem = open(target.certfile, "rb").read()
        if target.keyfile:
            pem += b"\n" + open(target.keyfile, "rb").read()
        client_cert = ssl.PrivateCertificate.loadPEM(pem)
    if not target.verify:
        kw = {}
        if client_cert is not None:
            kw = {"privateKey": client_cert.privateKey.original, "certificate": client_cert.original}
        return ssl.CertificateOptions(verify=False, **kw)
    trust = ssl.Certificate.loadPEM(open(target.ca_certs, "rb").read()) if target.ca_certs else ssl.platformTrust()
    return ssl.optionsForClientTLS(target.host, trustRoot=trust, clientCertificate=client_cert)


class _Connection:
    """One reconnecting txredisapi connection (pool of 1) with our own deadline on each call."""

    def __init__(self, store: RedisJobStore, name: str, reply_timeout_s: float):
        target = store.target
        self._store = store
        self.factory = txredisapi.RedisFactory(
            target.address, target.db, 1, isLazy=True, handler=txredisapi.ConnectionHandler,
            charset="utf-8", password=target.password, replyTimeout=reply_timeout_s,
            convertNumbers=False, username=target.username,
        )
        self.factory.protocol = _HandshakeProtocol
        self.factory.omnirt_client_name = name
        # reconnect quickly after a Redis restart (txredisapi defaults: 1 s growing to 10 s)
        self.factory.initialDelay = 0.1
        self.factory.factor = 2.0
        self.factory.maxDelay = 1.0
        self.factory.reconnect = True
        self.ready: Deferred = self.factory.deferred
        self.ready.addErrback(self._not_ready)
        self._failure: str | None = None
        self.factory.startConnecting(store._endpoint())
        self.handler = self.factory.handler

    def _not_ready(self, failure):
        self._failure = failure.getErrorMessage()
        return failure

    def execute(self, *args) -> Deferred:
        return self.handler.execute_command(*args)

    def disconnect(self) -> Deferred:
        return self.factory.disconnect()


# ---------------------------------------------------------------------------------------------
# Subscriptions


class _RedisSubscription(Subscription):
    __slots__ = ("_store", "job_id", "on_event", "last", "closed")

    def __init__(self, store: RedisJobStore, job_id: str, after_seq: int, on_event: EventCallback):
        self._store = store
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
        self._store._reader.detach(self)


class _Stream:
    __slots__ = ("job_id", "key", "subs", "cursor")

    def __init__(self, job_id: str, key: str, cursor: int):
        self.job_id = job_id
        self.key = key
        #: live subscribers (each has ``last >= cursor`` at attach time)
        self.subs: list[_RedisSubscription] = []
        #: the last seq the reader has read (and fanned out) from this stream
        self.cursor = cursor


class _StreamReader:
    """The one blocking ``XREAD`` loop of a store: all streams with live subscribers, one
    connection, entries fanned out in seq order. A stream joining wakes a blocked XREAD by
    XADDing to this reader's own wake stream (which every XREAD includes), so it is re-issued at
    once with the new set; on errors it backs off and resumes from the per-stream cursors."""

    BLOCK_MS = 1000
    COUNT = 256
    WAKE_TTL_MS = 3_600_000

    def __init__(self, store: RedisJobStore, conn: _Connection):
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

    def attach(self, sub: _RedisSubscription, stream_last: int) -> bool:
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

    def detach(self, sub: _RedisSubscription) -> None:
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
        backoff = 0.05
        failing = False
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
                if not failing:
                    log.msg(f"redis event reader ({store.target.address}): {_describe(exc)}; retrying")
                failing = True
                self._backoff = deferLater(store._clock, backoff)
                try:
                    await self._backoff
                except defer.CancelledError:
                    return
                finally:
                    self._backoff = None
                backoff = min(backoff * 2, 1.0)
                continue
            self._inflight = None
            if failing:
                log.msg(f"redis event reader ({store.target.address}): reading again")
            failing = False
            backoff = 0.05
            for key, entries in reply or ():
                if key == self._wake_key:
                    if entries:
                        self._wake_cursor = entries[-1][0]
                    continue
                stream = self._by_key.get(key)
                if stream is None:
                    continue
                for entry in entries:
                    try:
                        event = _decode_entry(entry)
                    except Exception:
                        log.err(None, f"unreadable event entry {entry[0]!r} in {key}; skipped")
                        continue
                    if event.seq <= stream.cursor:
                        continue
                    stream.cursor = event.seq
                    for sub in list(stream.subs):
                        sub.deliver(event)


# ---------------------------------------------------------------------------------------------
# The store


def _describe(exc: BaseException) -> str:
    if isinstance(exc, defer.TimeoutError | defer.CancelledError):
        return "no reply in time"
    if isinstance(exc, txredisapi.ConnectionError):
        return f"connection error ({exc})"
    return f"{type(exc).__name__}: {exc}"


#: Redis error replies that mean "not available right now" rather than "bug"
_UNAVAILABLE_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "NOAUTH", "WRONGPASS", "READONLY", "CLUSTERDOWN")


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
        self._cmd: _Connection | None = None
        self._reader: _StreamReader | None = None
        self._attaching: set[Deferred] = set()
        self._closed = False

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

    def _endpoint(self):
        endpoint = HostnameEndpoint(self._clock, self.target.host, self.target.port, timeout=self.call_timeout_s)
        if self.target.tls:
            endpoint = _TLSEndpoint(endpoint, _tls_creator(self.target))
        return endpoint

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"redis at {self.target.address}: {what}: {_describe(exc)}")

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
        tag = self.gateway_id or uuid.uuid4().hex[:8]
        # txredisapi's own reply timer (which drops a stuck connection so that it is made again)
        # runs a little shorter than our deadline on each call, so it usually fires first.
        cmd = self._cmd = _Connection(self, f"omnirt-{tag}-cmd", self.call_timeout_s * 0.8)
        reader_conn = _Connection(self, f"omnirt-{tag}-reader", _StreamReader.BLOCK_MS / 1000 + self.call_timeout_s)
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
        self._reader = _StreamReader(self, reader_conn)
        self._reader.start()

    def _cmd_failure(self, exc: BaseException, *conns) -> str:
        if isinstance(exc, defer.FirstError):
            exc = exc.subFailure.value
        if isinstance(exc, StoreUnavailable):
            return str(exc)
        for conn in conns:
            if conn is not None and conn._failure:
                return conn._failure
        return _describe(exc)

    async def _disconnect(self, *conns: _Connection | None) -> None:
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
                if str(exc).startswith(_UNAVAILABLE_REPLIES):
                    raise self._unavailable(str(args[0]), exc) from None
                raise
            if isinstance(exc, defer.TimeoutError | txredisapi.ConnectionError | ConnectionError):
                raise self._unavailable(str(args[0]), exc) from None
            raise

    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = _SCRIPTS[name]
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
            _encode_event(event, self._now_ms()), *fv,
        ])
        if int(created) == 0:
            raise ValueError(f"job {record.id} exists")
        return record.model_copy(update={"events": []})

    async def get(self, job_id: str, *, with_events: bool = False) -> JobRecord | None:
        reply = _unpack(await self._eval("get", self._job_keys(job_id), ["1" if with_events else "0"]))
        if reply is None:
            return None
        record = _decode_record(reply[0])
        if with_events:
            record = record.model_copy(update={"events": [_decode_entry(e) for e in _arr(reply[1])]})
        return record

    async def list(self, *, state: JobState | None = None, model: str | None = None, limit: int = 50) -> list[JobRecord]:
        if limit <= 0:
            return []
        reply = await self._eval("list", [], [
            self._prefix, state.value if state is not None else "", model or "", int(limit),
        ])
        return [_decode_record(flat) for flat in _arr(_unpack(reply))]

    async def transition(
        self,
        job_id: str,
        expected: Collection[JobState],
        target: JobState,
        event: NewEvent | None = None,
        fields: dict[str, Any] | None = None,
    ) -> JobRecord | None:
        target = JobState(target)
        fv = _encode_fields({k: v for k, v in (fields or {}).items() if k != "state"})
        sources = [s.value for s, targets in ALLOWED_TRANSITIONS.items() if target in targets]
        owner = (self.gateway_id or "") if target == JobState.running else ""
        reply = _unpack(await self._eval("transition", self._job_keys(job_id), [
            self._prefix, job_id, _csv(JobState(s).value for s in expected), target.value, _csv(sources),
            "1" if target.terminal else "0", self._retention_ms,
            _encode_event(event, self._now_ms()) if event is not None else "", owner, *fv,
        ]))
        code = int(reply[0])
        if code == 1:
            return _decode_record(reply[1])
        if code == 0:
            return None
        if code == -1:
            raise IllegalTransition(JobState(reply[1]), target)
        raise JobNotFound(job_id)

    async def update(self, job_id: str, fields: dict[str, Any], event: NewEvent | None = None) -> JobRecord | None:
        if "state" in fields:
            raise ValueError("state changes go through transition()")
        fv = _encode_fields(fields)
        reply = _unpack(await self._eval("update", self._job_keys(job_id), [
            _encode_event(event, self._now_ms()) if event is not None else "", *fv,
        ]))
        return None if reply is None else _decode_record(reply)

    async def append_event(self, job_id: str, event: NewEvent) -> JobEvent:
        now = self._now_ms()
        seq = int(await self._eval("append", self._job_keys(job_id), [_encode_event(event, now)]))
        if seq < 0:
            raise JobNotFound(job_id)
        return JobEvent(seq=seq, event=event.event, stage=event.stage, timestamp_ms=now, data=dict(event.data))

    async def append_worker_event(self, job_id: str, attempt: int, index: int, event: NewEvent) -> JobEvent | None:
        now = self._now_ms()
        seq = int(await self._eval("append_worker", self._job_keys(job_id),
                                   [int(attempt), int(index), _encode_event(event, now)]))
        if seq < 0:
            raise JobNotFound(job_id)
        if seq == 0:
            return None
        return JobEvent(seq=seq, event=event.event, stage=event.stage, timestamp_ms=now, data=dict(event.data))

    async def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        reply = _unpack(await self._eval("events", self._job_keys(job_id), [f"{max(after_seq, 0) + 1}-0"]))
        if reply is None:
            raise JobNotFound(job_id)
        return [_decode_entry(e) for e in _arr(reply[0])]

    def subscribe(self, job_id: str, after_seq: int, on_event: EventCallback) -> Subscription:
        """Replay (XRANGE) from ``after_seq``, then join the shared reader; delivery is
        asynchronous (callbacks run on the reactor, in seq order, each seq once)."""
        if self._reader is None or self._closed:
            raise StoreUnavailable(f"redis at {self.target.address}: not connected")
        sub = _RedisSubscription(self, job_id, max(after_seq, 0), on_event)
        d = Deferred.fromCoroutine(self._attach(sub))
        self._attaching.add(d)

        def done(result):
            self._attaching.discard(d)
            if isinstance(result, defer.Failure) and not result.check(defer.CancelledError):
                log.err(result, f"event subscription of job {job_id} failed")

        d.addBoth(done)
        return sub

    async def _attach(self, sub: _RedisSubscription) -> None:
        """Replay until the subscriber has seen everything the reader has, then go live (the
        check and the registration happen in one reactor turn: no gap, no duplicate)."""
        key = self._events_key(sub.job_id)
        delay = 0.05
        while not sub.closed and not self._closed:
            cursor = self._reader.cursor(sub.job_id)
            if cursor is not None and sub.last >= cursor:
                self._reader.attach(sub, cursor)  # the reader has read nothing this one needs
                return
            try:
                entries, last_id = _unpack(await self._eval("replay", [key], [f"{sub.last + 1}-0"]))
            except StoreUnavailable as exc:
                log.msg(f"replay of job {sub.job_id} events: {exc}; retrying")
                await deferLater(self._clock, delay)
                delay = min(delay * 2, 1.0)
                continue
            for entry in _arr(entries):
                sub.deliver(_decode_entry(entry))
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
            dropped, scanned = await self._eval("expire", [], [self._prefix, self.expire_batch, *_STATE_NAMES])
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
        reply = _arr(_unpack(await self._eval("states", [], [self._prefix, *ids])))
        return {job_id: JobState(state) for job_id, state in zip(ids, reply, strict=False) if state}

    async def refresh_lease(self, gateway_id: str, ttl_s: float) -> None:
        await self._eval("lease", [], [self._prefix, gateway_id, max(1, int(ttl_s * 1000))])

    async def live_gateways(self) -> set[str]:
        return set(_arr(_unpack(await self._eval("live", [], [self._prefix]))))

    async def orphans(self, live, limit: int = 500) -> list[tuple[str, str, JobState]]:
        reply = _arr(_unpack(await self._eval("orphans", [], [self._prefix, int(limit), _csv(live)])))
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


def _csv(values) -> str:
    return "," + ",".join(values) + ","

