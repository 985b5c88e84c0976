"""Redis JobStore (txredisapi): job hashes, one Stream per job's events, Lua compare-and-set.

Data model (``P`` = ``{namespace}:``; all values are strings)::

    P job:{id}          hash   state (raw), _seq (last event seq), _order (creation counter),
                               _model, _idem (idempotency key), _owner (gateway id),
                               _expires_at_ms (once terminal), and every other JobRecord field
                               (request, result, error, worker_id, timestamps, attempts, ...)
                               JSON-encoded under its own name
    P job:{id}:events   stream one entry per write: its events in order, an ``e`` field each =
                               JSON of {event, stage, timestamp_ms, data}, entry id ``{seq}-0``
                               = the seq of its last event (a burst of k events holds seq-k+1..seq);
                               replay from seq n is ``XRANGE key {n+1}-0 +`` (skipping seq <= n)
    P jobs              zset   every job, score = creation counter (newest = highest)
    P state:{state}     zset   jobs per state (moved atomically by transitions), same score
    P model:{model}     zset   jobs per model, same score
    P terminal          zset   member JSON [id, model], score = the ms its keys expire (Redis TIME)
    P idem:{key}        string JSON [job_id, fingerprint, claimed_at_ms]
    P order             string the creation counter
    P wake:{uuid}       stream one per store: XADDed to wake the blocking reader (MAXLEN 1, TTL)
    P job:{id}:hooks    hash   the job's webhook outbox entries (see ``outbox``), expire with the job
    P hooks:due         zset   outbox entries due (or leased) by time: ``{job}/{entry id}``
    P gateways          zset   leases (gateways, recording workers), score = deadline (ms, Redis TIME)
    P lease:ttl         hash   each lease holder's TTL (ms)
    P lease:beat        string Redis TIME (ms) of the last lease refresh by anyone (outage fence)
    P lease:fence       string JSON [last beat before a gap, until]: leases alive then count as live
    P store:id          string the store's identity (missing: new or emptied Redis)

Every write is ONE Lua script (``lua/``, loaded at startup) (EVALSHA, EVAL on NOSCRIPT) so state and events never disagree;
entering a terminal state PEXPIREs the hash, the stream and the idempotency key together
(retention), and ``expire()`` only cleans the indexes of jobs Redis has already dropped. The
scripts build index key names from the namespace, so this runs on one Redis (or a primary with
replicas), not on Redis Cluster.

Live events: one dedicated connection per store runs ``XREAD BLOCK`` over every stream that has
a live subscriber and fans entries out in-process; subscribers never cost a connection.

Modules: ``url`` (targets), ``scripts`` + ``lua/`` (the Lua scripts), ``codec`` (records and
events), ``connection`` (handshake, TLS, reconnects, deadlines), ``reader`` (the blocking stream
reader and subscriptions), ``outbox`` (the webhook outbox calls), ``sentinel`` (finding and
following the master through Redis Sentinel), ``options`` (the high-availability CLI flags),
``store`` (the JobStore).
"""

from omnirt.store.redis.url import RedisTarget, SentinelTarget, parse_redis_url, parse_store_url

__all__ = ["RedisJobStore", "RedisTarget", "SentinelTarget", "parse_redis_url", "parse_store_url"]


def __getattr__(name: str):
    # the store imports txredisapi, which imports the global reactor: only on first use, so the
    # CLI (``options``, ``url``) can be imported before the asyncio reactor is installed
    if name == "RedisJobStore":
        from omnirt.store.redis.store import RedisJobStore

        return RedisJobStore
    raise AttributeError(name)
