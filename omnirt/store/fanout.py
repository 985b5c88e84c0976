"""Delivery rounds: a store that hands several events to its subscribers in one reactor turn
(the Redis reader with one ``XREAD`` reply of several entries) opens a round around that
fan-out; a subscriber's writer may hold what it writes during the round and send it all when
the round ends, so a connection gets one ``send`` per round instead of one per event.

Rounds are reactor-thread state (deliveries happen on the reactor thread only); they nest, and
the held writes are sent when the outermost round ends, in the order the writers joined, then
what was to happen after the round (``after_round``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from twisted.python import log

__all__ = ["after_round", "at_round_end", "delivery_round"]

_depth = 0
_flushes: list[Callable[[], None]] = []
_afters: list[Callable[[], None]] = []


@contextlib.contextmanager
def delivery_round() -> Iterator[None]:
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth:
            _flush_all()


def at_round_end(flush: Callable[[], None]) -> bool:
    """Run ``flush`` when the open round ends; False (nothing registered) when no round is open:
    the caller writes now."""
    if not _depth:
        return False
    _flushes.append(flush)
    return True


def after_round(then: Callable[[], None]) -> bool:
    """Run ``then`` when the open round ends, after every held write of the round has gone out
    (a stream that got its terminal event finishes its response there, not between two other
    subscribers' writes); False when no round is open: the caller runs it now."""
    if not _depth:
        return False
    _afters.append(then)
    return True


def _flush_all() -> None:
    for pending, what in ((_flushes, "a held event write"), (_afters, "the end of a delivery round")):
        batch = pending[:]
        pending.clear()
        for call in batch:
            try:
                call()
            except Exception:
                log.err(None, f"{what} failed")
