"""Connections to Redis: our handshake (AUTH, SELECT, CLIENT SETNAME), TLS, reconnects with
backoff, and how a failed call is described."""

from __future__ import annotations

from typing import TYPE_CHECKING

import txredisapi
from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from omnirt.store.redis.url import RedisTarget

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Connection", "UNAVAILABLE_REPLIES", "describe", "endpoint_for", "retry_delay"]

#: handshake replies that mean "your configuration is wrong": stop reconnecting, report it
_FATAL_HANDSHAKE = ("WRONGPASS", "invalid password", "invalid username", "without any password",
                    "DB index is out of range", "invalid DB index")

#: Redis error replies that mean "not available right now" rather than "bug"
UNAVAILABLE_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "NOAUTH", "WRONGPASS", "READONLY", "CLUSTERDOWN")

#: delay before retry number ``attempt`` (0-based) of a failed read: 50 ms doubling to 1 s
retry_delay: Callable[[int], float] = backoffPolicy(initialDelay=0.05, maxDelay=1.0, factor=2.0,
                                                    jitter=lambda: 0.0)


def describe(exc: BaseException) -> str:
    """One line for a failed call (never a traceback, never the URL)."""
    if isinstance(exc, defer.TimeoutError | defer.CancelledError):
        return "no reply in time"
    if isinstance(exc, txredisapi.ConnectionError):
        return f"connection error ({exc})"
    return f"{type(exc).__name__}: {exc}"


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
            monitor = getattr(self.factory, "omnirt_monitor", None)
            if monitor is not None and getattr(self.factory, "omnirt_master_only", False):
                # Sentinel may still name a node that has just been demoted (or not yet promoted)
                role = yield self.execute_command("ROLE")
                if not role or role[0] != "master":
                    monitor.not_master(self.transport.getPeer())
                    self.transport.abortConnection()
                    return None
                monitor.confirmed(self.transport.getPeer())
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

    def connectionLost(self, why):
        monitor = getattr(self.factory, "omnirt_monitor", None)
        if monitor is not None and getattr(self.factory, "omnirt_master_only", False) and self.connected:
            monitor.lost("connection to the master lost")
        return super().connectionLost(why)


def _tls_creator(target: RedisTarget):
    from twisted.internet import ssl

    client_cert = None
    if target.certfile:
        with open(target.certfile, "rb") as f:
            pem = f.read()
        if target.keyfile:
            with open(target.keyfile, "rb") as f:
                pem += b"\n" + f.read()
        client_cert = ssl.PrivateCertificate.loadPEM(pem)
    if not target.verify:
        kw = {}
        if client_cert is not None:
            kw = {"privateKey": client_cert.privateKey.original, "certificate": client_cert.original}
        return ssl.CertificateOptions(verify=False, **kw)
    if target.ca_certs:
        with open(target.ca_certs, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(target.host, trustRoot=trust, clientCertificate=client_cert)


def endpoint_for(clock: IReactorTime, target: RedisTarget, timeout_s: float) -> IStreamClientEndpoint:
    """A TCP endpoint to ``target``, wrapped in TLS for ``rediss://``."""
    endpoint = HostnameEndpoint(clock, target.host, target.port, timeout=timeout_s)
    if target.tls:
        return wrapClientTLS(_tls_creator(target), endpoint)
    return endpoint


class Connection:
    """One reconnecting txredisapi connection (pool of 1) to ``target``. Calls get their deadline
    from the caller (``Deferred.addTimeout``); txredisapi's own reply timer drops a stuck link so
    the factory makes it again (50-100 ms doubling to 1 s, instead of its 1 s → 10 s)."""

    def __init__(self, target: RedisTarget, endpoint: IStreamClientEndpoint, name: str | None, reply_timeout_s: float,
                 *, protocol: type[txredisapi.RedisProtocol] | None = None, monitor=None, master_only: bool = False):
        self.factory = txredisapi.RedisFactory(
            target.address, target.db, 1, isLazy=True, handler=txredisapi.ConnectionHandler,
            charset="utf-8", password=target.password, replyTimeout=reply_timeout_s,
            convertNumbers=False, username=target.username,
        )
        self.factory.protocol = protocol or _HandshakeProtocol
        self.factory.omnirt_client_name = name
        #: a Sentinel monitor: told when this connection finds (or does not find) the master
        self.factory.omnirt_monitor = monitor
        self.factory.omnirt_master_only = master_only
        self.factory.initialDelay = 0.1
        self.factory.factor = 2.0
        self.factory.maxDelay = 1.0
        self.factory.reconnect = True
        self.ready: Deferred = self.factory.deferred
        self.ready.addErrback(self._not_ready)
        #: why the first connection failed, when it did (a handshake refusal reads better than a timeout)
        self.failure: str | None = None
        self.factory.startConnecting(endpoint)
        self.handler = self.factory.handler

    def _not_ready(self, failure):
        self.failure = failure.getErrorMessage()
        return failure

    def execute(self, *args) -> Deferred:
        return self.handler.execute_command(*args)

    def disconnect(self) -> Deferred:
        return self.factory.disconnect()

    def drop(self) -> None:
        """Close the live connection(s) so that the factory reconnects (to a new master): calls
        waiting on them errback, later calls wait for the new connection."""
        for proto in list(self.factory.pool):
            if proto.transport is not None:
                proto.transport.abortConnection()
