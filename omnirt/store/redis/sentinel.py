"""Redis Sentinel: find the master through txredisapi's Sentinel support and follow it.

One ``SentinelMonitor`` per store. It asks the Sentinels for the master (txredisapi's
``Sentinel.discover_master``: ``SENTINEL MASTERS``, first healthy answer), listens to their
``+switch-master`` channel, and every connection of the store (commands, the stream reader, the
acknowledged-write connection; the lease refresher uses the command connection) reaches Redis
through a ``MasterEndpoint`` that asks the monitor for the master on each (re)connect and checks
``ROLE`` once connected. The master is looked up again when a connection is lost or refused, when
a reply says ``-READONLY`` (we were talking to a demoted master), or when a Sentinel announces
``+switch-master``; a changed master counts as a failover, and every connection still open to the
old one is dropped so that each follows the new one. From the first sign of trouble until a
connection has confirmed the master again the store reports itself ``degraded``.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python import log
from zope.interface import implementer

from omnirt.store.base import StoreUnavailable
from omnirt.store.redis.connection import Connection, _HandshakeProtocol, endpoint_for
from omnirt.store.redis.url import SentinelTarget

__all__ = ["MasterEndpoint", "SentinelMonitor"]


class _Sentinels(txredisapi.Sentinel):
    """txredisapi's Sentinel manager on our connections (TLS, AUTH, our backoff) and our clock."""

    def __init__(self, clock: IReactorTime, conns: list[Connection], timeout_s: float):
        # not super().__init__: it opens plain-TCP connections on the global reactor
        self._clock = clock
        self._conns = conns
        self.sentinels = [c.handler for c in conns]
        self.min_other_sentinels = 0
        self.discovery_timeout = timeout_s

    def discover_master(self, service_name: str) -> Deferred:
        """The first healthy master any Sentinel names (txredisapi's rule: flagged master, not
        subjectively or objectively down); MasterNotFoundError after ``discovery_timeout``."""
        result: Deferred = Deferred()

        def on_response(response):
            if result.called:
                return
            state = response.get(service_name)
            if state and self.check_master_state(state):
                timer.cancel()
                result.callback((state["ip"], int(state["port"])))

        def on_timeout():
            if not result.called:
                result.errback(txredisapi.MasterNotFoundError(f"no Sentinel names a healthy master {service_name!r}"))

        for sentinel in self.sentinels:
            d = sentinel.sentinel_masters()
            d.addTimeout(self.discovery_timeout, self._clock)
            d.addCallbacks(on_response, lambda _f: None)
        timer = self._clock.callLater(self.discovery_timeout, on_timeout)
        return result


class _SwitchListener(_HandshakeProtocol, txredisapi.SubscriberProtocol):
    """A Sentinel pub/sub connection subscribed to ``+switch-master`` (again after each reconnect)."""

    @defer.inlineCallbacks
    def connectionMade(self):
        yield _HandshakeProtocol.connectionMade(self)
        if not self.connected:
            return
        try:
            yield self.subscribe("+switch-master")
        except Exception as exc:  # the connection went away again; the factory reconnects
            log.msg(f"Sentinel +switch-master subscription failed: {exc}")
            return
        # a switch may have happened while this link was down
        self.factory.omnirt_monitor.switch_heard(None)

    def messageReceived(self, pattern, channel, message):
        self.factory.omnirt_monitor.switch_heard(message)


class SentinelMonitor:
    """Knows which node is the master of ``target.master_name`` and makes every followed
    connection reconnect to it after a failover. ``on_failover`` is called once per change of
    master (metrics)."""

    def __init__(self, clock: IReactorTime, target: SentinelTarget, *, timeout_s: float, name: str,
                 on_failover=None):
        self._clock = clock
        self.target = target
        self.timeout_s = timeout_s
        self._name = name
        self._on_failover = on_failover
        self.master: tuple[str, int] | None = None
        #: the master must be looked up again before the next connection
        self._stale = True
        self._discovering: Deferred | None = None
        #: since when (clock seconds) the store has been switching / unsure of its master
        self.degraded_since: float | None = None
        self.degraded_reason: str | None = None
        self.failovers = 0
        self.last_error: str | None = None
        self._followers: list[Connection] = []
        self._sentinel_conns: list[Connection] = []
        self._listeners: list[Connection] = []
        self._sentinels: _Sentinels | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def _reachable(self) -> list[str]:
        """TCP-probe every Sentinel at once; the errors of those that refuse (all of them: fail
        fast with a clear reason instead of retrying in the background)."""

        async def probe(host: str, port: int) -> str | None:
            endpoint = HostnameEndpoint(self._clock, host, port, timeout=self.timeout_s)
            try:
                proto = await connectProtocol(endpoint, Protocol())
            except Exception as exc:
                return f"{host}:{port}: {exc}"
            proto.transport.loseConnection()
            return None

        results = await defer.gatherResults(
            [Deferred.fromCoroutine(probe(h, p)) for h, p in self.target.sentinels], consumeErrors=True)
        return [r for r in results if r is not None]

    async def start(self) -> tuple[str, int]:
        """Connect to the Sentinels and find the master (StoreUnavailable when none answers)."""
        errors = await self._reachable()
        if len(errors) == len(self.target.sentinels):
            raise StoreUnavailable(f"no Sentinel reachable ({'; '.join(errors)})")
        for host, port in self.target.sentinels:
            node = self.target.node(host, port, sentinel=True)
            endpoint = endpoint_for(self._clock, node, self.timeout_s)
            self._sentinel_conns.append(Connection(node, endpoint, None, self.timeout_s))
            listener = Connection(node, endpoint_for(self._clock, node, self.timeout_s), None, self.timeout_s,
                                  protocol=_SwitchListener, monitor=self)
            self._listeners.append(listener)
        self._sentinels = _Sentinels(self._clock, self._sentinel_conns, self.timeout_s)
        try:
            return await self.current()
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"{exc} (Sentinels {self._sentinel_list()})") from None

    async def close(self) -> None:
        self._closed = True
        for conn in self._sentinel_conns + self._listeners:
            d = conn.disconnect()
            d.addTimeout(self.timeout_s, self._clock)
            try:
                await d
            except Exception:
                pass

    def follow(self, conn: Connection) -> None:
        """``conn`` is one of the store's data-node connections: drop it when the master changes."""
        self._followers.append(conn)

    def _sentinel_list(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.target.sentinels)

    # -- the master --------------------------------------------------------------------------

    @property
    def address(self) -> str:
        if self.master is None:
            return f"sentinel master {self.target.master_name} (unknown)"
        host, port = self.master
        return f"{host}:{port}"

    async def current(self) -> tuple[str, int]:
        """The master's address, asking the Sentinels first when it may have changed."""
        if not self._stale and self.master is not None:
            return self.master
        if self._discovering is None:
            self._discovering = Deferred.fromCoroutine(self._discover())

            def done(result):
                self._discovering = None
                return result

            self._discovering.addBoth(done)
        d: Deferred = Deferred()
        self._discovering.addBoth(_fan(d))
        return await d

    async def _discover(self) -> tuple[str, int]:
        assert self._sentinels is not None
        try:
            host, port = await self._sentinels.discover_master(self.target.master_name)
        except Exception as exc:
            self.last_error = str(exc)
            self._mark_degraded(f"no master: {exc}")
            raise StoreUnavailable(f"redis {self.target.master_name}: {exc}") from None
        self._set_master((host, port), "Sentinel discovery")
        return host, port

    def _set_master(self, addr: tuple[str, int], how: str) -> None:
        self._stale = False
        old, self.master = self.master, addr
        if old is not None and old != addr:
            self.failovers += 1
            self._mark_degraded(f"master moved from {old[0]}:{old[1]} to {addr[0]}:{addr[1]}")
            log.msg(f"redis {self.target.master_name}: master is now {addr[0]}:{addr[1]} (was {old[0]}:{old[1]}, "
                    f"{how}); reconnecting every client")
            if self._on_failover is not None:
                try:
                    self._on_failover()
                except Exception:
                    log.err(None, "failover callback failed")
            for conn in self._followers:
                conn.drop()

    def _mark_degraded(self, reason: str) -> None:
        if self.degraded_since is None:
            self.degraded_since = self._clock.seconds()
        self.degraded_reason = reason

    def invalidate(self, reason: str) -> None:
        """Something says the master may have changed: look it up before the next connection, and
        drop the followed connections (a ``-READONLY`` reply means they talk to a replica)."""
        if self._closed:
            return
        self._stale = True
        self._mark_degraded(reason)
        for conn in self._followers:
            conn.drop()

    def lost(self, reason: str) -> None:
        """A followed connection could not reach the master: look it up again before reconnecting."""
        if self._closed:
            return
        self._stale = True
        self._mark_degraded(reason)

    # -- told by the connections -------------------------------------------------------------

    def not_master(self, peer) -> None:
        self.lost(f"{peer.host}:{peer.port} is not the master (yet)")

    def confirmed(self, peer) -> None:
        if self.master is not None and (peer.host, peer.port) != self.master:
            return
        if self.degraded_since is not None:
            log.msg(f"redis {self.target.master_name}: master {self.address} confirmed after "
                    f"{self._clock.seconds() - self.degraded_since:.2f}s")
        self.degraded_since = None
        self.degraded_reason = None

    def switch_heard(self, message: str | None) -> None:
        """``+switch-master`` (``name old-ip old-port new-ip new-port``), or None after a
        (re)subscription, when a switch may have been missed."""
        if self._closed:
            return
        if message is None:
            if self.master is not None:
                self._stale = True  # checked at the next reconnect; nothing dropped
            return
        parts = str(message).split()
        if len(parts) != 5 or parts[0] != self.target.master_name:
            return
        try:
            addr = (parts[3], int(parts[4]))
        except ValueError:
            return
        self._set_master(addr, "+switch-master")

    # -- readiness ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": "degraded" if self.degraded_since is not None else "ok",
            "master": self.address if self.master is not None else None,
            "master_name": self.target.master_name,
            "sentinels": self._sentinel_list(),
            "failovers": self.failovers,
        }
        if self.degraded_since is not None:
            out["degraded_for_s"] = round(max(0.0, self._clock.seconds() - self.degraded_since), 3)
            out["reason"] = self.degraded_reason
        return out


def _fan(d: Deferred):
    def relay(result):
        if isinstance(result, defer.Failure):
            d.errback(result)
        else:
            d.callback(result)
        return result if not isinstance(result, defer.Failure) else None

    return relay


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """Connects to whichever node the monitor says is the master, at every (re)connection."""

    def __init__(self, clock: IReactorTime, monitor: SentinelMonitor, timeout_s: float):
        self._clock = clock
        self._monitor = monitor
        self._timeout_s = timeout_s

    def connect(self, protocolFactory):
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory):
        host, port = await self._monitor.current()
        node = self._monitor.target.node(host, port)
        try:
            return await endpoint_for(self._clock, node, self._timeout_s).connect(protocolFactory)
        except Exception as exc:
            self._monitor.lost(f"cannot connect to master {host}:{port}: {exc}")
            raise
