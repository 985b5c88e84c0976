"""``SseWriter`` and delivery rounds: inside a round its chunks are held and sent as one write
when the round ends; outside one they go out at once; any other write sends what is held first."""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from omnirt.contract import JobEvent
from omnirt.gateway.sse import SseWriter, encode_chunk, encode_event
from omnirt.store.fanout import delivery_round


class _Transport(StringTransport):
    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


class _Channel:
    def __init__(self):
        self.transport = _Transport()


class _Request:
    """What SseWriter reads of a twisted.web request whose headers are out (chunked); its own
    ``write`` goes to the same transport, marked, as Twisted's buffered write would."""

    def __init__(self):
        self.startedWriting = True
        self.chunked = True
        self.finished = False
        self._disconnected = False
        self.sentLength = 0
        self.channel = _Channel()

    def write(self, data: bytes) -> None:
        self.channel.transport.write(b"<request.write>" + data)


def event(seq: int, name: str = "stage_progress") -> JobEvent:
    return JobEvent(seq=seq, event=name, stage="denoise", timestamp_ms=seq, data={"step": seq})


class SseWriterRoundTests(unittest.TestCase):
    def test_outside_a_round_each_event_is_written_at_once(self):
        request = _Request()
        writer = SseWriter(request)
        writer.write_event(event(1))
        writer.write_event(event(2))
        self.assertEqual(request.channel.transport.writes, [encode_chunk(event(1)), encode_chunk(event(2))])

    def test_a_round_sends_its_events_as_one_write_in_order(self):
        """Three events delivered in one round: nothing written until it ends, then one write of
        the three chunks in seq order; sentLength counts the three frames as request.write would."""
        request = _Request()
        writer = SseWriter(request)
        events = [event(1), event(2), event(3, "job_finished")]
        with delivery_round():
            for e in events:
                writer.write_event(e)
            self.assertEqual(request.channel.transport.writes, [])
        self.assertEqual(request.channel.transport.writes, [b"".join(encode_chunk(e) for e in events)])
        self.assertEqual(request.sentLength, sum(len(encode_event(e)) for e in events))

    def test_another_write_in_a_round_sends_what_is_held_first(self):
        """A frame that has to go through request.write (the response ended meanwhile) goes
        after the chunks held before it: the byte order is kept."""
        request = _Request()
        writer = SseWriter(request)
        with delivery_round():
            writer.write_event(event(1))
            request.finished = True
            writer.write_event(event(2))
        self.assertEqual(request.channel.transport.writes,
                         [encode_chunk(event(1)), b"<request.write>" + encode_chunk(event(2))])
