"""The ``--remote-worker`` grammar: examples, errors, and hypothesis properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from omnirt.workers.spec import (
    RemoteWorkerSpec,
    SpecError,
    format_remote_worker,
    parse_remote_worker,
    parse_remote_workers,
)


class ParseExamplesTests(SynchronousTestCase):
    def test_full_spec(self):
        """id, address, models and tags are split at the first '=', '@' and '#'."""
        spec = parse_remote_worker("gpu0=10.0.0.5:50061@sdxl-base-1.0,sdxl-refiner-1.0#gpu,a100")
        self.assertEqual(
            spec,
            RemoteWorkerSpec("gpu0", "10.0.0.5", 50061, ("sdxl-base-1.0", "sdxl-refiner-1.0"), ("gpu", "a100")),
        )
        self.assertEqual(spec.address, "10.0.0.5:50061")

    def test_no_models_serves_every_model(self):
        """Without '@' the worker serves every model (empty models tuple)."""
        spec = parse_remote_worker("w=localhost:50061")
        self.assertEqual((spec.models, spec.tags), ((), ()))

    def test_tags_without_models(self):
        """'w=h:1#gpu' is tag 'gpu', not an address containing '#' (old bug)."""
        spec = parse_remote_worker("w=h:1#gpu")
        self.assertEqual((spec.host, spec.port, spec.models, spec.tags), ("h", 1, (), ("gpu",)))

    def test_items_trimmed_and_empty_dropped(self):
        """List items are trimmed, empty ones and duplicates dropped; id and address trimmed too."""
        spec = parse_remote_worker(" w = h:2 @ m1 , ,m2,m1 # t1,, t2 ,")
        self.assertEqual(spec, RemoteWorkerSpec("w", "h", 2, ("m1", "m2"), ("t1", "t2")))

    def test_empty_model_list_means_every_model(self):
        """'w=h:1@' (an empty list) also means every model."""
        self.assertEqual(parse_remote_worker("w=h:1@").models, ())

    def test_ipv6(self):
        """Bracketed IPv6 literals are accepted; host is stored without brackets, address re-brackets."""
        spec = parse_remote_worker("w=[::1]:50061@m")
        self.assertEqual((spec.host, spec.port, spec.address), ("::1", 50061, "[::1]:50061"))

    def test_many_and_duplicates(self):
        """Several specs parse in order; a duplicate id is an error naming both."""
        specs = parse_remote_workers(["a=h:1", "b=h:2"])
        self.assertEqual([s.worker_id for s in specs], ["a", "b"])
        with self.assertRaisesRegex(SpecError, "duplicate --remote-worker id 'a'"):
            parse_remote_workers(["a=h:1", "a=h:2"])


class ParseErrorTests(SynchronousTestCase):
    def assertSpecError(self, text: str, fragment: str) -> None:
        with self.assertRaises(SpecError) as caught:
            parse_remote_worker(text)
        message = str(caught.exception)
        self.assertIn(fragment, message)
        self.assertNotIn("\n", message)

    def test_missing_equals(self):
        """No '=' → SpecError 'missing ='."""
        self.assertSpecError("h:50061", "missing '='")

    def test_empty_id(self):
        """An empty (or blank) id is an error."""
        self.assertSpecError("=h:1", "empty worker id")
        self.assertSpecError("  =h:1", "empty worker id")

    def test_bad_ports(self):
        """Ports must be digits in 1..65535."""
        self.assertSpecError("w=h:0", "out of range")
        self.assertSpecError("w=h:65536", "out of range")
        self.assertSpecError("w=h:abc", "not a number")
        self.assertSpecError("w=h:-1", "not a number")
        self.assertSpecError("w=h:", "not a number")
        self.assertSpecError("w=h", "no ':port'")

    def test_bad_hosts(self):
        """Empty hosts, unbracketed IPv6, bad brackets and odd characters are errors."""
        self.assertSpecError("w=:1", "no host")
        self.assertSpecError("w=::1:50061", "brackets")
        self.assertSpecError("w=[::1:50061", "unclosed")
        self.assertSpecError("w=[nothost]:1", "not an IPv6")
        self.assertSpecError("w=[::1]50061", "no ':port'")
        self.assertSpecError("w=h/x:1", "not a valid host")
        self.assertSpecError("w=", "empty address")

    def test_tags_before_models_is_an_error(self):
        """'#' binds after '@': 'w=h:1#t@m' leaves '1#t' as the port, which is rejected."""
        self.assertSpecError("w=h:1#t@m", "not a number")

    def test_bad_id_characters(self):
        """Ids with whitespace or separators are rejected."""
        self.assertSpecError("a b=h:1", "may not contain")

    def test_not_a_string(self):
        """A non-string raises SpecError, not TypeError."""
        with self.assertRaises(SpecError):
            parse_remote_worker(None)  # type: ignore[arg-type]


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-", min_size=1, max_size=12)
_hostname = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?\Z")
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_specs = st.builds(
    RemoteWorkerSpec,
    worker_id=_name,
    host=st.one_of(_hostname, _ipv4, _ipv6),
    port=st.integers(1, 65535),
    models=st.lists(_name, max_size=4, unique=True).map(tuple),
    tags=st.lists(_name, max_size=4, unique=True).map(tuple),
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_specs)
    def test_round_trip(self, spec):
        """Any valid spec formats to text that parses back to the same spec."""
        self.assertEqual(parse_remote_worker(format_remote_worker(spec)), spec)

    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=60))
    def test_garbage_raises_only_spec_error(self, text):
        """Arbitrary text either parses or raises SpecError with a one-line message — nothing else."""
        try:
            spec = parse_remote_worker(text)
        except SpecError as exc:
            self.assertNotIn("\n", str(exc))
        else:
            self.assertTrue(spec.worker_id)
            self.assertTrue(1 <= spec.port <= 65535)

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet="w=h:1@#,[]: 0x9a", max_size=30))
    def test_separator_soup(self, text):
        """Text made of the grammar's separators never raises anything but SpecError."""
        try:
            parse_remote_worker(text)
        except SpecError:
            pass

    @settings(max_examples=100, deadline=None)
    @given(st.lists(_specs, max_size=5))
    def test_many_round_trip_or_duplicate(self, specs):
        """A list parses back in order unless two ids repeat, which is a SpecError."""
        texts = [format_remote_worker(s) for s in specs]
        ids = [s.worker_id for s in specs]
        if len(set(ids)) == len(ids):
            self.assertEqual(parse_remote_workers(texts), specs)
        else:
            with self.assertRaises(SpecError):
                parse_remote_workers(texts)
