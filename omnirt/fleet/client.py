"""Non-blocking supervisord XML-RPC for the gateway: a Twisted ``Agent`` over a UNIX endpoint,
payloads encoded by ``xmlrpc.client``."""

from __future__ import annotations

import xmlrpc.client
from pathlib import Path
from typing import Any

from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer  # interfaces only: no reactor is imported
from zope.interface import implementer

__all__ = ["AsyncSupervisorClient"]


class AsyncSupervisorClient:
    """supervisord XML-RPC from Twisted: ``Agent`` over a UNIX endpoint, xmlrpc.client for the payload."""

    def __init__(self, reactor, socket_path: str | Path, *, timeout: float = 10.0):
        from twisted.web.client import Agent, HTTPConnectionPool

        self.reactor = reactor
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._agent = Agent.usingEndpointFactory(reactor, _UnixEndpointFactory(reactor, self.socket_path),
                                                 pool=self._pool)

    def call(self, method: str, *params: Any, timeout: float | None = None):
        """A Deferred firing with the result; ``xmlrpc.client.Fault`` for a supervisor fault."""
        from twisted.internet.defer import Deferred

        d = Deferred.fromCoroutine(self._call(method, params))
        d.addTimeout(timeout or self.timeout, self.reactor)
        return d

    async def _call(self, method: str, params: tuple) -> Any:
        from twisted.web.client import readBody
        from twisted.web.http_headers import Headers

        body = xmlrpc.client.dumps(params, method, allow_none=True).encode()
        response = await self._agent.request(
            b"POST", b"http://localhost/RPC2", Headers({b"Content-Type": [b"text/xml"]}), _BytesProducer(body)
        )
        data = await readBody(response)
        if response.code != 200:
            raise OSError(f"supervisord answered HTTP {response.code}")
        (result,), _ = xmlrpc.client.loads(data)
        return result

    def close(self):
        return self._pool.closeCachedConnections()


@implementer(IAgentEndpointFactory)
class _UnixEndpointFactory:
    def __init__(self, reactor, path: str):
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri):  # noqa: N802 - Twisted interface
        from twisted.internet.endpoints import UNIXClientEndpoint

        return UNIXClientEndpoint(self._reactor, self._path, timeout=5)


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):  # noqa: N802 - Twisted interface
        from twisted.internet.defer import succeed

        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self):  # noqa: N802
        pass

    def resumeProducing(self):  # noqa: N802
        pass

    def stopProducing(self):  # noqa: N802
        pass
