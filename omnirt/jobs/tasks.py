"""Fire-and-forget work tracked, so that shutdown can wait for it (bounded) instead of losing it."""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python import log


class Tasks:
    """A set of Deferreds nobody awaits (a dispatch, an event write); each one's failure is logged."""

    def __init__(self) -> None:
        self._pending: set[Deferred] = set()

    def track(self, d: Deferred, why: str = "background task failed") -> Deferred:
        self._pending.add(d)
        d.addErrback(log.err, why)
        d.addBoth(lambda _: self._pending.discard(d))
        return d

    def pending(self) -> list[Deferred]:
        return list(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def wait(self, clock: IReactorTime, timeout_s: float | None = None) -> Deferred:
        """Fires (with True) once every task tracked now has ended, or (with False) after
        ``timeout_s``; the tasks themselves are never cancelled by the wait."""
        pending = self.pending()
        if not pending:
            return succeed(True)
        waiters = []
        for d in pending:
            w: Deferred = Deferred()
            d.addBoth(lambda r, w=w: (w.called or w.callback(None), r)[1])
            waiters.append(w)
        done = DeferredList(waiters, consumeErrors=True).addCallback(lambda _: True)
        if timeout_s is not None:
            done.addTimeout(timeout_s, clock)
            done.addErrback(lambda f: f.trap(TimeoutError) and False)
        return done
