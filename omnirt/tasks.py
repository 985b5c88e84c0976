"""Fire-and-forget Deferreds tracked, so that a planned shutdown can wait for them (bounded)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python import log
from twisted.python.failure import Failure


class Tasks:
    """A set of Deferreds nobody awaits (a dispatch, an event write, a worker's store write);
    each one's failure is logged (with ``why``), never left unhandled."""

    def __init__(self) -> None:
        self._pending: set[Deferred[Any]] = set()

    def track(self, d: Deferred[Any], why: str = "background task failed") -> Deferred[Any]:
        self._pending.add(d)
        d.addErrback(log.err, why)
        d.addBoth(self._forget, d)
        return d

    def _forget(self, result: object, d: Deferred[Any]) -> object:
        self._pending.discard(d)
        return result

    def pending(self) -> list[Deferred[Any]]:
        return list(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def wait(self, clock: IReactorTime | None = None, timeout_s: float | None = None) -> Deferred[bool]:
        """Fires (with True) once every task tracked now has ended, or (with False) after
        ``timeout_s`` (which needs ``clock``); the tasks themselves are never cancelled by the wait."""
        pending = self.pending()
        if not pending:
            return succeed(True)
        waiters: list[Deferred[None]] = []
        for d in pending:
            w: Deferred[None] = Deferred()
            d.addBoth(fire_waiter, w)
            waiters.append(w)
        done: Deferred[Any] = DeferredList(waiters, consumeErrors=True).addCallback(lambda _: True)
        if timeout_s is not None:
            if clock is None:
                raise ValueError("a bounded wait needs a clock")
            done.addTimeout(timeout_s, clock)
            done.addErrback(_timed_out)
        return done


def fire_waiter(result: object, waiter: Deferred[None]) -> object:
    """A callback that fires ``waiter`` (with None, once) and passes ``result`` on untouched: a
    second party waits for a Deferred without taking its result (``d.addBoth(fire_waiter, w)``)."""
    if not waiter.called:
        waiter.callback(None)
    return result


def _timed_out(failure: Failure) -> bool:
    failure.trap(TimeoutError)
    return False
