"""Fire-and-forget Deferreds, tracked so that a planned shutdown can wait for them."""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredList
from twisted.python import log


class TaskTracker:
    """Holds every Deferred given to ``track`` until it fires; ``wait`` fires once all have.

    A tracked Deferred's failure is logged (with ``what``), never left unhandled.
    """

    def __init__(self) -> None:
        self._pending: set[Deferred] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def track(self, d: Deferred, what: str = "background task") -> Deferred:
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            if hasattr(result, "getErrorMessage"):  # a Failure: logged here, handled
                log.err(result, f"{what} failed")
                return None
            return result

        d.addBoth(done)
        return d

    def wait(self) -> Deferred:
        """Fires (with None) once every Deferred tracked so far has fired."""
        pending = list(self._pending)
        return DeferredList(pending).addCallback(lambda _: None)
