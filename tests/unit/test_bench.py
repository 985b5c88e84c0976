"""``omnirt bench`` pure parts: statistics, delivery spread, the loopback guard, the SSE parser,
request bodies, the bounded runner (on a fake clock) and flag checks."""

from __future__ import annotations

import contextlib
import io
import json
import socket

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from omnirt.bench.record import Recorder
from omnirt.bench.runner import Runner
from omnirt.bench.scenarios import build_bodies, connections_needed, queue_wait_ms
from omnirt.bench.sse import Message, Parser
from omnirt.bench.stats import delivery_spread, percentile, rate, summarize
from omnirt.bench.target import Target, TargetError, check_loopback, is_loopback_address, parse_target
from omnirt.cli import main

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


class PercentileTests(SynchronousTestCase):
    def test_interpolates_between_ranks(self):
        """The median of 1..4 is 2.5 (linear interpolation between the closest ranks)."""
        self.assertEqual(percentile([4, 1, 3, 2], 50), 2.5)
        self.assertAlmostEqual(percentile(range(1, 101), 99), 99.01)

    def test_extremes_and_single_value(self):
        """The 0th percentile is the minimum, the 100th the maximum; one value is every percentile."""
        self.assertEqual(percentile([5, 9, 7], 0), 5)
        self.assertEqual(percentile([5, 9, 7], 100), 9)
        self.assertEqual(percentile([3.5], 99), 3.5)

    def test_rejects_empty_and_out_of_range(self):
        """No values, or a percentile outside 0..100, is a ValueError."""
        with self.assertRaises(ValueError):
            percentile([], 50)
        for q in (-1, 100.5, float("nan")):
            with self.assertRaises(ValueError):
                percentile([1, 2], q)

    @given(st.lists(finite, min_size=1, max_size=50), st.floats(0, 100), st.floats(0, 100))
    def test_bounded_and_monotonic(self, values, q1, q2):
        """Any percentile lies within [min, max] and never decreases as q grows."""
        low, high = sorted((q1, q2))
        a, b = percentile(values, low), percentile(values, high)
        self.assertLessEqual(min(values), a + 1e-6)
        self.assertLessEqual(b, max(values) + 1e-6)
        self.assertLessEqual(a, b + 1e-6)

    @given(st.lists(finite, min_size=1, max_size=50), st.randoms())
    def test_order_does_not_matter(self, values, rnd):
        """Shuffling the samples changes no percentile."""
        shuffled = list(values)
        rnd.shuffle(shuffled)
        for q in (0, 50, 90, 99, 100):
            self.assertEqual(percentile(values, q), percentile(shuffled, q))


class SummaryTests(SynchronousTestCase):
    def test_summary_fields(self):
        """A summary has count, min, mean, p50, p90, p99 and max, rounded to 3 digits."""
        s = summarize([1.0, 2.0, 3.0, 4.0, 10.0004])
        self.assertEqual(list(s), ["count", "min", "mean", "p50", "p90", "p99", "max"])
        self.assertEqual((s["count"], s["min"], s["p50"], s["max"]), (5, 1.0, 3.0, 10.0))
        self.assertEqual(s["mean"], 4.0)

    def test_empty_summary(self):
        """No samples summarise to {count: 0}, not an error."""
        self.assertEqual(summarize([]), {"count": 0})

    def test_rate(self):
        """rate is count/seconds, and 0 when no time passed."""
        self.assertEqual(rate(30, 2.0), 15.0)
        self.assertEqual(rate(5, 0), 0.0)


class SpreadTests(SynchronousTestCase):
    def test_spread_per_event(self):
        """Each event's spread is its last arrival minus its first, across subscribers, in ms."""
        arrivals = {"a": {1: 10.000, 2: 11.000}, "b": {1: 10.002, 2: 11.0005}, "c": {1: 10.001, 2: 11.000}}
        spread = delivery_spread(arrivals, live_from=None)
        self.assertEqual(len(spread.spreads_ms), 2)
        self.assertAlmostEqual(spread.spreads_ms[0], 2.0, places=6)
        self.assertAlmostEqual(spread.spreads_ms[1], 0.5, places=6)
        self.assertEqual((spread.replayed, spread.missing), (0, 0))

    def test_replayed_events_are_not_spread(self):
        """Events whose first arrival is not after the last subscriber attached count as replayed."""
        arrivals = {"a": {1: 1.0, 2: 5.0}, "b": {1: 3.0, 2: 5.1}}
        spread = delivery_spread(arrivals, live_from=3.0)
        self.assertEqual(spread.replayed, 1)
        self.assertEqual(len(spread.spreads_ms), 1)
        self.assertAlmostEqual(spread.spreads_ms[0], 100.0, places=6)

    def test_missing_deliveries_counted(self):
        """An event some subscribers never got is counted once per missing delivery, not spread."""
        arrivals = {"a": {1: 1.0, 2: 2.0, 3: 3.0}, "b": {1: 1.0}, "c": {1: 1.0, 3: 3.0}}
        spread = delivery_spread(arrivals, live_from=None)
        self.assertEqual(spread.missing, 3)
        self.assertEqual(spread.spreads_ms, [0.0])

    def test_no_subscribers(self):
        """No subscribers: nothing measured, nothing missing."""
        spread = delivery_spread({}, live_from=None)
        self.assertEqual((spread.spreads_ms, spread.replayed, spread.missing), ([], 0, 0))

    @given(st.dictionaries(st.integers(0, 20), st.lists(st.floats(0, 1000), min_size=3, max_size=3),
                           min_size=1, max_size=20))
    def test_spread_never_negative(self, per_seq):
        """Spread is never negative and never exceeds the whole arrival window."""
        arrivals = {sub: {seq: times[sub] for seq, times in per_seq.items()} for sub in range(3)}
        spread = delivery_spread(arrivals, live_from=None)
        window = max(max(t) for t in per_seq.values()) - min(min(t) for t in per_seq.values())
        for value in spread.spreads_ms:
            self.assertGreaterEqual(value, 0)
            self.assertLessEqual(value, window * 1000 + 1e-6)


def resolver_for(table):
    def resolve(host, port, family=0, socktype=0):
        if host not in table:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]

    return resolve


class LoopbackGuardTests(SynchronousTestCase):
    def test_loopback_addresses(self):
        """127.0.0.0/8, ::1 and IPv4-mapped 127.x count as loopback; everything else does not."""
        for address in ("127.0.0.1", "127.1.2.3", "127.255.255.254", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(is_loopback_address(address), address)
        for address in ("10.0.0.1", "128.0.0.1", "0.0.0.0", "::", "::ffff:10.0.0.1", "fe80::1%lo",
                        "192.168.1.1", "localhost", ""):
            self.assertFalse(is_loopback_address(address), address)

    def test_names_must_resolve_to_loopback_only(self):
        """A name passes only when every address it resolves to is loopback."""
        resolve = resolver_for({"localhost": ["127.0.0.1", "::1"], "both": ["127.0.0.1", "10.0.0.7"],
                                "far": ["93.184.216.34"]})
        self.assertEqual(check_loopback(Target("http", "localhost", 80), False, resolve), ["127.0.0.1", "::1"])
        with self.assertRaisesRegex(TargetError, r"not a loopback address.*--allow-remote"):
            check_loopback(Target("http", "both", 80), False, resolve)
        with self.assertRaisesRegex(TargetError, "93.184.216.34"):
            check_loopback(Target("http", "far", 80), False, resolve)

    def test_literal_remote_refused(self):
        """An IP literal outside loopback is refused (resolution of a literal is the literal)."""
        with self.assertRaisesRegex(TargetError, "10.0.0.1"):
            check_loopback(Target("http", "10.0.0.1", 8000), False)
        self.assertEqual(check_loopback(Target("http", "127.0.0.5", 8000), False), ["127.0.0.5"])

    def test_allow_remote_skips_the_check(self):
        """--allow-remote accepts any host without resolving it."""
        def never(*a, **kw):
            raise AssertionError("resolved")

        self.assertEqual(check_loopback(Target("http", "far", 80), True, never), [])

    def test_unresolvable_refused(self):
        """A host that does not resolve is refused with the resolver's reason."""
        with self.assertRaisesRegex(TargetError, "cannot resolve 'nowhere'"):
            check_loopback(Target("http", "nowhere", 80), False, resolver_for({}))

    def test_parse_target(self):
        """Base URLs parse with default ports; paths, other schemes, credentials and IPv6 literals are refused."""
        self.assertEqual(parse_target("http://127.0.0.1:8123/"), Target("http", "127.0.0.1", 8123))
        self.assertEqual(parse_target("https://localhost").port, 443)
        self.assertEqual(parse_target("http://localhost").base_url, "http://localhost:80")
        for bad, why in (("ftp://127.0.0.1", "scheme"), ("http://127.0.0.1/v1", "without a path"),
                         ("http://u:p@127.0.0.1", "credentials"), ("http://", "no host"),
                         ("http://127.0.0.1:99999", "bad --url"), ("http://[::1]:80", "IPv6"),
                         ("127.0.0.1:8000", "scheme")):
            with self.assertRaisesRegex(TargetError, why, msg=bad):
                parse_target(bad)


EVENTS = (b"id: 1\nevent: job_enqueued\ndata: {\"seq\":1,\"timestamp_ms\":100}\n\n"
          b": keep-alive\n\n"
          b"id: 2\r\nevent: stage_progress\r\ndata: {\"seq\":2,\"note\":\"\xc3\xa9t\xc3\xa9\"}\r\n\r\n"
          b"id: 3\revent: job_finished\rdata: {\"seq\":3}\r\r")


class SSEParserTests(SynchronousTestCase):
    def test_messages_and_comments(self):
        """LF, CRLF and CR line ends all work; comments are counted, not returned."""
        parser = Parser()
        messages = parser.feed(EVENTS)
        self.assertEqual([(m.seq, m.event) for m in messages],
                         [(1, "job_enqueued"), (2, "stage_progress"), (3, "job_finished")])
        self.assertEqual(parser.comments, 1)
        self.assertEqual(messages[1].payload["note"], "été")
        self.assertTrue(messages[2].terminal)
        self.assertFalse(messages[0].terminal)

    @given(st.lists(st.integers(1, len(EVENTS) - 1), unique=True, max_size=12))
    def test_any_chunking_same_messages(self, cuts):
        """Split anywhere (mid-line, mid-CRLF, mid-UTF-8), the parser yields the same messages."""
        cuts = sorted(cuts)
        parser = Parser()
        messages = []
        for start, end in zip([0, *cuts], [*cuts, len(EVENTS)], strict=True):
            messages.extend(parser.feed(EVENTS[start:end]))
        self.assertEqual(messages, Parser().feed(EVENTS))

    def test_multiline_data_and_defaults(self):
        """Data lines join with newlines; no event field means 'message'; no data means no message."""
        messages = Parser().feed(b"data: a\ndata:b\n\nevent: x\n\nid: 7\ndata: {}\n\n")
        self.assertEqual(messages, [Message(None, "message", "a\nb"), Message("7", "message", "{}")])
        self.assertIsNone(messages[0].seq)
        self.assertEqual(messages[1].seq, 7)

    def test_seq_from_payload_without_id(self):
        """Without an SSE id the seq comes from the payload; a non-object payload has none."""
        self.assertEqual(Message(None, "e", '{"seq": 4}').seq, 4)
        self.assertIsNone(Message(None, "e", "[1]").payload)
        self.assertIsNone(Message(None, "e", "not json").seq)


class BodyTests(SynchronousTestCase):
    def test_defaults(self):
        """Flag bodies: quick jobs 4 steps without delay, slow jobs 20 steps at 50 ms per step."""
        bodies = build_bodies()
        self.assertEqual(bodies.quick["config"], {"width": 64, "height": 64, "num_inference_steps": 4})
        self.assertEqual(bodies.slow["config"]["num_inference_steps"], 20)
        self.assertEqual(bodies.slow["config"]["stub_step_delay_ms"], 50.0)
        self.assertNotIn("backend", bodies.quick)
        self.assertEqual(json.loads(bodies.encoded("quick", sync=True))["async_run"], False)
        self.assertNotIn("async_run", json.loads(bodies.encoded("slow")))

    def test_flags_apply_to_both(self):
        """Given flags override both bodies (steps, delay, size, backend, model, prompt)."""
        bodies = build_bodies(model="m", prompt="p", width=32, height=48, steps=7, backend="cpu-stub",
                              step_delay_ms=5)
        for body in (bodies.quick, bodies.slow):
            self.assertEqual(body["model"], "m")
            self.assertEqual(body["inputs"], {"prompt": "p"})
            self.assertEqual(body["backend"], "cpu-stub")
            self.assertEqual(body["config"], {"width": 32, "height": 48, "num_inference_steps": 7,
                                              "stub_step_delay_ms": 5})

    def test_file_body_sent_as_is(self):
        """A --body file is used for every kind as is, except async_run, which the scenario decides."""
        body = {"task": "text2image", "model": "x", "inputs": {"prompt": "q"}, "config": {"seed": 3},
                "async_run": True}
        bodies = build_bodies(body)
        self.assertEqual(bodies.quick, bodies.slow)
        self.assertNotIn("async_run", bodies.quick)
        self.assertEqual(json.loads(bodies.encoded("quick", sync=True))["config"], {"seed": 3})

    def test_queue_wait(self):
        """Queue wait is job_started minus job_enqueued (first of each); None when either is missing."""
        events = [{"event": "job_enqueued", "timestamp_ms": 100}, {"event": "job_dispatched", "timestamp_ms": 101},
                  {"event": "job_started", "timestamp_ms": 130}, {"event": "job_started", "timestamp_ms": 500}]
        self.assertEqual(queue_wait_ms(events), 30.0)
        self.assertIsNone(queue_wait_ms(events[:2]))

    def test_connections_needed(self):
        """Pool sizes: sync 1, async 2, cancel 3, sse subscribers+1 connections per operation."""
        self.assertEqual(connections_needed("sync", 32), 32)
        self.assertEqual(connections_needed("async", 4), 8)
        self.assertEqual(connections_needed("cancel", 2), 6)
        self.assertEqual(connections_needed("sse", 2, subscribers=500), 1002)
        self.assertEqual(connections_needed("mixed", 1, subscribers=10), 11)


class RunnerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.started: list[int] = []
        self.pending: dict[int, Deferred] = {}

    async def op(self, index, rec):
        self.started.append(index)
        d = Deferred()
        self.pending[index] = d
        await d
        rec.done(True)

    def test_runs_count_at_concurrency(self):
        """The runner keeps at most `concurrency` operations in flight and runs exactly `count`."""
        runner = Runner(self.clock, deadline=100.0, now=self.clock.seconds)
        rec = Recorder()
        done = Deferred.fromCoroutine(runner.run(self.op, 5, 2, rec))
        self.assertEqual(self.started, [0, 1])
        self.pending[0].callback(None)
        self.assertEqual(self.started, [0, 1, 2])
        for i in (1, 2, 3, 4):
            self.pending[i].callback(None)
        self.assertEqual(self.successResultOf(done), True)
        self.assertEqual((rec.ok, rec.failed, rec.aborted), (5, 0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline_cancels_in_flight(self):
        """At the deadline nothing new starts and operations in flight are cancelled (aborted)."""
        runner = Runner(self.clock, deadline=10.0, now=self.clock.seconds)
        rec = Recorder()
        done = Deferred.fromCoroutine(runner.run(self.op, 100, 3, rec))
        self.pending[0].callback(None)
        self.clock.advance(10.0)
        self.assertEqual(self.successResultOf(done), False)
        self.assertEqual((rec.ok, rec.aborted), (1, 3))
        self.assertEqual(len(self.started), 4)

    def test_failures_are_recorded(self):
        """An operation that raises counts as failed under its error key; the run goes on."""
        async def boom(index, rec):
            if index % 2:
                raise ConnectionResetError("x")
            rec.done(True)

        rec = Recorder()
        runner = Runner(self.clock, deadline=10.0, now=self.clock.seconds)
        self.assertTrue(self.successResultOf(Deferred.fromCoroutine(runner.run(boom, 4, 2, rec))))
        self.assertEqual((rec.ok, rec.failed, dict(rec.errors)), (2, 2, {"ConnectionResetError": 2}))


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue(), err.getvalue()


class FlagTests(SynchronousTestCase):
    def assert_refused(self, argv, pattern):
        status, out, err = cli("bench", *argv)
        self.assertEqual(status, 2, err)
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertRegex(err, pattern)

    def test_bad_flags_one_line_exit_2(self):
        """Unknown flags, bad values and missing --url each exit 2 with one line on stderr."""
        self.assert_refused(["--url", "http://127.0.0.1:1", "--bogus"], "unrecognized arguments: --bogus")
        self.assert_refused(["--url", "http://127.0.0.1:1", "--concurrency", "x"], "invalid int value")
        self.assert_refused(["--url", "http://127.0.0.1:1", "--scenario", "nope"], "invalid choice")
        self.assert_refused([], "--url")

    def test_value_checks(self):
        """Out-of-range counts, --subscribers outside sse/mixed, and --body with request flags are refused."""
        url = ["--url", "http://127.0.0.1:1"]
        self.assert_refused([*url, "--concurrency", "0"], "--concurrency must be at least 1")
        self.assert_refused([*url, "--warmup", "-1"], "--warmup must be at least 0")
        self.assert_refused([*url, "--duration-limit-s", "0"], "--duration-limit-s must be more than 0")
        self.assert_refused([*url, "--subscribers", "3"], "--subscribers applies to --scenario sse or mixed")
        body = self.mktemp()
        with open(body, "w") as f:
            json.dump({"model": "m"}, f)
        self.assert_refused([*url, "--body", body, "--steps", "3"], "--body cannot be combined with --steps")
        with open(body, "w") as f:
            f.write("[1]")
        self.assert_refused([*url, "--body", body], "must hold a JSON object")

    def test_remote_target_refused(self):
        """A non-loopback target is refused with exit 2 before any request, unless --allow-remote."""
        self.assert_refused(["--url", "http://192.0.2.10:8000"], "not a loopback address")
