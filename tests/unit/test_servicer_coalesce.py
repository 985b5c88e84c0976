"""The worker's Run stream coalesces events per window and never holds back the final update."""

from __future__ import annotations

import asyncio

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from omnirt.workers.base import WorkerUpdate
from omnirt.workers.core import RunEnd
from omnirt.workers.servicer import _EVENT, _FINAL, WorkerServicer


def _update(name: str) -> WorkerUpdate:
    return WorkerUpdate(name, "job", {"name": name}, 1)


def _names(message) -> list[str]:
    kind = message.WhichOneof("update")
    if kind == "event":
        return [message.event.event]
    if kind == "events":
        return [e.event for e in message.events.events]
    return [kind]


class CoalesceTests(unittest.TestCase):
    def run_stream(self, feed) -> Deferred:
        """Collect the stream's messages while ``feed(queue, seen)`` puts items (a coroutine)."""
        servicer = WorkerServicer(None, heartbeat_s=3600.0, coalesce_s=3600.0)  # type: ignore[arg-type]

        async def go() -> list[list[str]]:
            queue: asyncio.Queue = asyncio.Queue()
            seen: list[list[str]] = []
            feeder = asyncio.ensure_future(feed(queue, seen))
            async for message in servicer.updates(queue):
                seen.append(_names(message))
            await feeder
            return seen

        return Deferred.fromFuture(asyncio.ensure_future(go()))

    def test_first_event_goes_at_once_then_a_window_then_final_flushes(self):
        """The first event is sent alone at once; events within the window wait and go together
        as one RunEvents message as soon as the final update comes (which follows at once),
        although the window (an hour here) is not over."""

        async def feed(queue, seen):
            queue.put_nowait((_EVENT, _update("job_started")))
            while not seen:
                await asyncio.sleep(0)
            queue.put_nowait((_EVENT, _update("progress")))
            for _ in range(5):
                await asyncio.sleep(0)
            queue.put_nowait((_EVENT, _update("stage_end")))
            for _ in range(5):
                await asyncio.sleep(0)
            self.assertEqual(seen, [["job_started"]])  # held in the window
            queue.put_nowait((_FINAL, RunEnd("cancelled", message="stopped")))

        d = self.run_stream(feed)
        d.addCallback(self.assertEqual, [["job_started"], ["progress", "stage_end"], ["end"]])
        return d

    def test_events_queued_together_with_the_final(self):
        """Events already queued with the final update go as one message, then the final."""

        async def feed(queue, seen):
            for name in ("job_started", "progress"):
                queue.put_nowait((_EVENT, _update(name)))
            queue.put_nowait((_FINAL, RunEnd("failed", message="boom")))

        d = self.run_stream(feed)
        d.addCallback(self.assertEqual, [["job_started", "progress"], ["end"]])
        return d


