"""The webhook deliverer: drains the store's outbox on the reactor. It claims due entries under a
lease (so several gateways on one store never send one entry at the same time), POSTs each with
treq, and settles it: delivered (2xx), failed (another 4xx, a redirect), retried with exponential
backoff and jitter (connection errors, timeouts, 408, 429, 5xx; Retry-After honoured) until
``max_attempts`` or ``max_age_s``, then dead. A slow host only delays its own deliveries: at most
``per_host`` attempts in flight per host, a deadline on each."""

from __future__ import annotations

import random
from collections import Counter, deque
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python import log

from omnirt.store.base import StoreUnavailable
from omnirt.webhooks.http import WebhookHTTP
from omnirt.webhooks.model import OutboxEntry, delivery_body
from omnirt.webhooks.settings import WebhookSettings
from omnirt.webhooks.signing import Signer
from omnirt.webhooks.urls import is_private_address

__all__ = ["WebhookDeliverer", "WebhookSettings", "classify"]


def classify(status: int | None) -> str:
    """delivered | retry | failed for an attempt's HTTP status (None: no response)."""
    if status is None or status in (408, 429) or status >= 500:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    return "failed"


class WebhookDeliverer(Service):
    """``owner`` names this deliverer in claims (the gateway id). ``http`` may be given (tests);
    by default one is made from the settings."""

    name = "webhooks"

    def __init__(self, *, reactor, store, settings: WebhookSettings, owner: str, metrics=None,
                 http: WebhookHTTP | None = None, rng: random.Random | None = None):
        self._reactor = reactor
        self.store = store
        self.settings = settings
        self.owner = owner
        self.metrics = metrics
        self.signer = Signer(list(settings.secrets))
        self.http = http or WebhookHTTP(reactor, timeout_s=settings.timeout_s, per_host=settings.per_host,
                                        max_response_bytes=settings.max_response_bytes)
        self._rng = rng or random.Random()
        self._loop: LoopingCall | None = None
        self._polling: Deferred | None = None
        self._inflight: set[Deferred] = set()
        self._per_host: Counter[str] = Counter()
        #: claimed entries waiting for a free slot of their host (bounded; the rest are handed back)
        self._waiting: dict[str, deque[OutboxEntry]] = {}
        self._ticks = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self.settings.poll_interval_s, now=True).addErrback(log.err, "webhook loop failed")

    async def stop(self) -> None:
        """Stop claiming; in-flight attempts are cancelled and handed back (due again at once)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._polling is not None:
            await defer.DeferredList([self._polling], consumeErrors=True)
        waiting = [e for q in self._waiting.values() for e in q]
        self._waiting.clear()
        for entry in waiting:  # claimed but never started: hand them back at once
            await self._settle(entry, "retry", attempted=False)
        for d in list(self._inflight):
            d.cancel()
        if self._inflight:
            await defer.DeferredList(list(self._inflight), consumeErrors=True)
        await self.http.close()

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self.stop())

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def wake(self) -> None:
        """Poll now (e.g. after a redelivery was requested)."""
        if self._loop is not None and self._loop.running:
            self._tick()

    # -- polling -----------------------------------------------------------------------------

    def _tick(self) -> None:
        if self._polling is not None:
            return
        d = self._polling = Deferred.fromCoroutine(self._poll())

        def done(result):
            self._polling = None
            if isinstance(result, defer.Failure) and not result.check(defer.CancelledError):
                log.err(result, "webhook poll failed")

        d.addBoth(done)

    async def _poll(self) -> None:
        self._ticks += 1
        for _ in range(16):  # a full batch claims again at once (bounded per tick)
            room = self.settings.concurrency - len(self._inflight)
            if room <= 0:
                break
            try:
                entries = await self.store.claim_webhooks(self.owner, min(room, 64), self.settings.lease_s)
            except StoreUnavailable as exc:
                log.msg(f"webhooks: cannot claim deliveries: {exc}")
                return
            for entry in entries:
                self._start(entry)
            if len(entries) < min(room, 64):
                break
        if self.metrics is not None and self._ticks % 10 == 1:
            try:
                self.metrics.outbox_depth.set(await self.store.webhook_outbox_depth())
            except StoreUnavailable:
                pass

    def _start(self, entry: OutboxEntry) -> None:
        d = Deferred.fromCoroutine(self._deliver(entry))
        self._inflight.add(d)

        def done(result):
            self._inflight.discard(d)
            if isinstance(result, defer.Failure) and not result.check(defer.CancelledError):
                log.err(result, f"webhook {entry.id} failed unexpectedly")
            if self._loop is not None and self._loop.running:
                self._tick()  # a slot is free: claim more now rather than at the next tick

        d.addBoth(done)

    @staticmethod
    def _host(entry: OutboxEntry) -> str:
        parts = urlsplit(entry.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"

    def _next_waiting(self, host: str) -> None:
        """A slot of ``host`` is free: start its next waiting entry still safely inside its lease."""
        queue = self._waiting.get(host)
        while queue:
            entry = queue.popleft()
            if not queue:
                del self._waiting[host]
            margin_ms = (self.settings.timeout_s + 2.0) * 1000
            if entry.lease_until_ms is not None and self._reactor.seconds() * 1000 > entry.lease_until_ms - margin_ms:
                self._start_handback(entry)  # too close to its lease end to send safely
                continue
            self._start(entry)
            return

    # -- one delivery --------------------------------------------------------------------------

    def _start_handback(self, entry: OutboxEntry) -> None:
        d = Deferred.fromCoroutine(self._settle(entry, "retry", retry_in_s=0.05 + self._rng.random() * 0.2,
                                                attempted=False))
        self._inflight.add(d)
        d.addBoth(lambda _: self._inflight.discard(d))

    async def _deliver(self, entry: OutboxEntry) -> None:
        parts = urlsplit(entry.url)
        host = self._host(entry)
        if self._per_host[host] >= self.settings.per_host:
            queue = self._waiting.setdefault(host, deque())
            if len(queue) < self.settings.per_host * 4:  # wait here for a slot (the lease holds it)
                queue.append(entry)
                return
            # hand it back unsent, soon due again
            await self._settle(entry, "retry", retry_in_s=0.05 + self._rng.random() * 0.2, attempted=False)
            return
        self._per_host[host] += 1
        try:
            await self._attempt(entry, parts.hostname or "")
        except defer.CancelledError:
            # stopping: hand it back (due at once for whoever claims next)
            d = Deferred.fromCoroutine(self._settle(entry, "retry", attempted=False))
            d.addErrback(lambda f: None)
            raise
        finally:
            self._per_host[host] -= 1
            if self._per_host[host] <= 0:
                del self._per_host[host]
            if self._loop is not None and self._loop.running:
                self._next_waiting(host)

    async def _attempt(self, entry: OutboxEntry, hostname: str) -> None:
        now = self._reactor.seconds()
        age_s = now - entry.created_at_ms / 1000
        body = entry.body
        if body is None:
            record = await self.store.get(entry.job_id)
            if record is None:
                await self._settle(entry, "dead", error="the job no longer exists")
                return
            body = delivery_body(record, entry)
        if not self.settings.allow_private:
            refused = await self._private(hostname)
            if refused:
                await self._settle(entry, "failed", error=refused, body=body)
                return
        raw = body.encode()
        attempt = await self.http.post(entry.url, raw, self.signer.headers(entry.id, int(now), raw))
        if self.metrics is not None:
            self.metrics.delivery_seconds.observe(attempt.seconds)
        outcome = classify(attempt.status)
        error = attempt.error
        if attempt.status is not None and outcome != "delivered":
            snippet = attempt.body[:200].decode("utf-8", "replace").strip()
            error = f"HTTP {attempt.status}" + (f": {snippet}" if snippet else "")
            if 300 <= attempt.status < 400:
                error = f"HTTP {attempt.status}: redirects are not followed"
        delay = 0.0
        if outcome == "retry":
            attempts = entry.attempts + 1
            delay = self.backoff(attempts)
            if attempt.retry_after_s is not None:
                delay = max(delay, min(attempt.retry_after_s, 3600.0))
            if attempts >= self.settings.max_attempts:
                outcome, error = "dead", f"{error} (gave up after {attempts} attempts)"
            elif age_s + delay > self.settings.max_age_s:
                outcome, error = "dead", f"{error} (gave up: older than {self.settings.max_age_s:g}s)"
        await self._settle(entry, outcome, retry_in_s=delay, status=attempt.status, error=error, body=body)

    def backoff(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: base * 2^(attempts-1), capped, with jitter (50-100%)."""
        raw = min(self.settings.retry_max_s, self.settings.retry_base_s * 2 ** max(0, attempts - 1))
        return raw * (0.5 + 0.5 * self._rng.random())

    async def _private(self, hostname: str) -> str | None:
        """Why the host may not be called (it resolves to a private address), or None."""
        address = hostname
        if not any(c == ":" for c in hostname) and not hostname.replace(".", "").isdigit():
            try:
                address = await self._reactor.resolve(hostname, timeout=(1, 3))
            except Exception:  # noqa: BLE001 - unresolvable: let the attempt report it
                return None
        if is_private_address(address):
            return f"refused: {hostname} is a private address ({address}); see --webhook-allow-private"
        return None

    async def _settle(self, entry: OutboxEntry, outcome: str, **kw) -> None:
        try:
            held = await self.store.settle_webhook(entry, self.owner, outcome, **kw)
        except StoreUnavailable as exc:
            log.msg(f"webhooks: cannot record {entry.id} ({outcome}): {exc}; its lease will run out")
            return
        if self.metrics is not None and kw.get("attempted", True):
            self.metrics.deliveries.labels(outcome=outcome if held else "lost_lease").inc()
