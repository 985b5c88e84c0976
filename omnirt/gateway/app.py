"""The gateway's HTTP API: thin Klein routes over the job service (parse -> service -> encode)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from klein import Klein
from pydantic import ValidationError
from twisted.internet.defer import CancelledError
from twisted.web.resource import Resource

from omnirt.contract import (
    JobRecord,
    JobState,
    Problem,
    RequestInvalid,
    parse_generate_request,
    problems_from_pydantic,
)
from omnirt.gateway import compat, console_routes, sse
from omnirt.gateway.auth import ApiKeys, owner_of, tenant_of
from omnirt.gateway.edge import parse_idempotency_key, parse_int_arg, parse_json_body, scoped_idempotency_key
from omnirt.gateway.errors import HTTPError, error_response, job_outcome_error
from omnirt.gateway.trace_view import trace_view
from omnirt.gateway.views import (
    DeliveryList,
    Health,
    JobList,
    JobSummary,
    Readiness,
    RedeliverRequest,
    TraceView,
    job_body,
    model_list,
)
from omnirt.jobs.limits import RateLimited, principal_of
from omnirt.jobs.service import JobService
from omnirt.registry import TIERS, list_models
from omnirt.store.base import StoreUnavailable
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.webhooks.urls import WebhookURLRefused, refuse_private_target

JSON = b"application/json"
OPEN_PATHS = frozenset({b"/healthz", b"/readyz"})
SUBMIT_ROUTES = frozenset({"/v1/generate", "/v1/jobs", "/v1/images/generations"})

_ROUTE_LABELS = [
    (re.compile(r"^/v1/jobs/[^/]+/events$"), "/v1/jobs/{id}/events"),
    (re.compile(r"^/v1/jobs/[^/]+/stream$"), "/v1/jobs/{id}/stream"),
    (re.compile(r"^/v1/jobs/[^/]+/trace$"), "/v1/jobs/{id}/trace"),
    (re.compile(r"^/v1/jobs/[^/]+/webhooks$"), "/v1/jobs/{id}/webhooks"),
    (re.compile(r"^/v1/jobs/[^/]+/webhooks/redeliver$"), "/v1/jobs/{id}/webhooks/redeliver"),
    (re.compile(r"^/v1/jobs/[^/]+$"), "/v1/jobs/{id}"),
    (re.compile(r"^/v1/artifacts/[^/]+$"), "/v1/artifacts/{sha256}"),
    (re.compile(r"^/console/"), "/console/{file}"),
]
_KNOWN_ROUTES = {
    "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/generate", "/v1/jobs", "/v1/images/generations",
    "/openapi.json", "/", "/docs",
}


def route_label(path: str) -> str:
    if path in _KNOWN_ROUTES:
        return path
    for pattern, label in _ROUTE_LABELS:
        if pattern.match(path):
            return label
    return "other"


def write_json(request, status: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON)
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    return json.dumps(body, separators=(",", ":")).encode()


class GatewayAPI:
    """Routes of API.md. Fields are the domain services; handlers parse, call, encode."""

    app = Klein()

    def __init__(
        self,
        *,
        service: JobService,
        metrics: GatewayMetrics,
        reactor,
        api_keys: ApiKeys | None = None,
        readiness=None,
        keepalive_s: float = 15.0,
        rate_limiter=None,
        public_url: str | None = None,
        webhooks=None,
        webhook_allow_private: bool = False,
    ):
        self.service = service
        self.metrics = metrics
        self.reactor = reactor
        self.api_keys = api_keys or ApiKeys()
        #: async () -> (ok, body) extra readiness facts (set by the composition root)
        self.readiness = readiness
        self.keepalive_s = keepalive_s
        #: jobs.limits.RateLimiter for submissions per client, or None
        self.rate_limiter = rate_limiter
        #: base of absolute result URLs (``--public-url``); None: the listening address
        self.public_url = public_url.rstrip("/") if public_url else None
        #: omnirt.webhooks.service.WebhookService (deliveries, redelivery), or None
        self.webhooks = webhooks
        self.webhook_allow_private = webhook_allow_private

    def resource(self) -> Resource:
        return GatewayResource(self)

    # -- errors ------------------------------------------------------------------------------

    @app.handle_errors(Exception)
    def _errors(self, request, failure):
        if failure.check(CancelledError):
            return b""
        status, body, headers = error_response(failure.value)
        return write_json(request, status, body, headers)

    # -- health ------------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        return write_json(request, 200, Health(ok=True).model_dump(mode="json"))

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request):
        pool = self.service.dispatcher.pool
        store = self.service.store
        body: dict[str, Any] = {
            "ok": True,
            "job_store_backend": store.backend_name,
            "remote_worker_count": sum(1 for e in pool.entries.values() if e.conn.address != "in-process"),
            "allowed_model_tiers": list(self.service.allowed_tiers),
            "workers": pool.snapshot(),
            "queue_depth": self.service.dispatcher.depth(),
            "backend": self.service.default_backend,
            "accepting": self.service.accepting,
        }
        problems = []
        body["job_store"] = dict(store.status())
        if self.service.store_lost_info is not None:
            body["job_store"]["lost"] = self.service.store_lost_info
        if body["job_store"].get("state") == "degraded":
            problems.append(f"job store degraded: {body['job_store'].get('reason') or 'switching master'}")
        try:
            await store.ping()
        except StoreUnavailable as exc:
            problems.append(f"job store unreachable: {exc}")
            body["job_store_error"] = str(exc)
        if pool.usable_count() == 0:
            problems.append("no usable worker")
        if not self.service.accepting:
            problems.append("shutting down")
        if self.readiness is not None:
            extra_ok, extra = await self.readiness()
            body.update(extra)
            if not extra_ok:
                problems.append(extra.get("reason", "not ready"))
        if problems:
            body["ok"] = False
            body["reason"] = "; ".join(problems)
        view = Readiness.model_validate(body).model_dump(mode="json", exclude_none=True)
        return write_json(request, 503 if problems else 200, view)

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request):
        from omnirt.gateway.openapi import openapi_document

        return write_json(request, 200, openapi_document())

    @app.route("/metrics", methods=["GET"])
    def metrics_route(self, request):
        request.setHeader(b"Content-Type", self.metrics.content_type.encode())
        return self.metrics.render()

    # -- models ------------------------------------------------------------------------------

    @app.route("/v1/models", methods=["GET"])
    def models(self, request):
        tier = (request.args.get(b"tier") or [b"all"])[0].decode("utf-8", "replace")
        allowed = self.service.allowed_tiers
        if tier == "all":
            tiers = allowed
        elif tier in TIERS:
            tiers = tuple(t for t in allowed if t == tier)
        else:
            raise HTTPError(400, f"unknown tier {tier!r} (one of: {', '.join(TIERS)}, all)")
        specs = list_models(tiers) if tiers else []
        return write_json(request, 200, model_list(specs, self.service.dispatcher.pool).model_dump(mode="json"))

    # -- jobs --------------------------------------------------------------------------------

    def _parse_submit(self, request):
        payload = parse_json_body(request.getHeader(b"content-type"), request.content.read())
        payload, request.omnirt_warnings = compat.split_unknown(payload)
        generate = parse_generate_request(payload)
        if generate.webhook and not self.webhook_allow_private:
            try:
                refuse_private_target(generate.webhook)
            except WebhookURLRefused as exc:
                raise RequestInvalid([Problem(loc=("webhook",), msg=str(exc))]) from None
        key = parse_idempotency_key(request.getHeader(b"idempotency-key"))
        return generate, scoped_idempotency_key(getattr(request, "omnirt_principal", None), key)

    @app.route("/v1/generate", methods=["POST"])
    async def generate(self, request):
        generate, key = self._parse_submit(request)
        if generate.async_run:
            record, _ = await self.service.submit(generate, execution_mode="async", idempotency_key=key,
                                                        **_who(request))
            return write_json(request, 200, compat.with_warnings(job_body(record), request))  # 200 as upstream
        record, _ = await self.service.submit(generate, execution_mode="sync", idempotency_key=key,
                                             **_who(request))
        final = await self._wait_or_cancel(record.id)
        return await self._sync_result(request, final)

    async def _wait_or_cancel(self, job_id: str) -> JobRecord:
        """Wait for a sync job; a client that goes away cancels it."""
        try:
            return await self.service.wait(job_id)
        except CancelledError:
            try:
                await self.service.cancel(job_id)
            except Exception:  # noqa: BLE001 - already terminal or gone: nothing to stop
                pass
            raise

    async def _sync_result(self, request, final: JobRecord):
        if final.state == JobState.succeeded and final.result is not None:
            outputs = []
            for artifact in final.result.outputs:
                blob = await self.service.dispatcher.artifacts.read(artifact.sha256)
                inline = {"transport": "inline_bytes", "data_b64": base64.b64encode(blob or b"").decode()}
                outputs.append(artifact.model_copy(update=inline))
            body = final.result.model_copy(update={"outputs": outputs}).model_dump(mode="json")
            return write_json(request, 200, compat.with_warnings(body, request))
        status, detail = job_outcome_error(final)
        return write_json(request, status, {"detail": detail, "job_id": final.id})

    @app.route("/v1/jobs", methods=["POST"])
    async def submit_job(self, request):
        generate, key = self._parse_submit(request)
        record, created = await self.service.submit(generate, execution_mode="async", idempotency_key=key,
                                                        **_who(request))
        return write_json(request, 202 if created else 200, compat.with_warnings(job_body(record), request))

    @app.route("/v1/jobs", methods=["GET"])
    async def list_jobs(self, request):
        raw_state = (request.args.get(b"state") or [None])[0]
        state = None
        if raw_state:
            try:
                state = JobState(raw_state.decode("utf-8", "replace"))
            except ValueError:
                raise HTTPError(400, f"unknown state (one of: {', '.join(s.value for s in JobState)})") from None
        model = (request.args.get(b"model") or [None])[0]
        limit = parse_int_arg((request.args.get(b"limit") or [None])[0], "limit", minimum=1, maximum=1000, default=50)
        records = await self.service.list(state=state, model=model.decode("utf-8", "replace") if model else None,
                                          limit=limit, owner=owner_of(request))
        body = JobList(data=[JobSummary.of(r) for r in records])
        return write_json(request, 200, body.model_dump(mode="json"))

    @app.route("/v1/jobs/<job_id>", methods=["GET"])
    async def get_job(self, request, job_id):
        raw = (request.args.get(b"events") or [b"true"])[0].lower()
        if raw not in (b"true", b"false", b"1", b"0"):
            raise HTTPError(400, "events must be true or false")
        record = await self.service.get(job_id, owner=owner_of(request))
        return write_json(request, 200, job_body(record, include_events=raw in (b"true", b"1")))

    @app.route("/v1/jobs/<job_id>", methods=["DELETE"])
    async def cancel_job(self, request, job_id):
        record = await self.service.cancel(job_id, owner=owner_of(request))
        return write_json(request, 200, job_body(record, include_events=False))

    @app.route("/v1/jobs/<job_id>/events", methods=["GET"])
    async def job_events(self, request, job_id):
        after = sse.resume_point(request)
        await sse.stream_events(self.service, self.reactor, request, job_id, after, self.keepalive_s,
                                owner=owner_of(request))
        return b""

    @app.route("/v1/jobs/<job_id>/trace", methods=["GET"])
    async def job_trace(self, request, job_id):
        record = await self.service.get(job_id, owner=owner_of(request))
        view = TraceView.model_validate(trace_view(self.service.dispatcher.tracing, record))
        return write_json(request, 200, view.model_dump(mode="json"))

    @app.route("/v1/jobs/<job_id>/webhooks", methods=["GET"])
    async def job_webhooks(self, request, job_id):
        views = await self._webhook_service().deliveries(job_id, owner=owner_of(request))
        return write_json(request, 200, DeliveryList(data=views).model_dump(mode="json"))

    @app.route("/v1/jobs/<job_id>/webhooks/redeliver", methods=["POST"])
    async def redeliver_webhooks(self, request, job_id):
        raw = request.content.read()
        ids = None
        if raw.strip():
            payload = parse_json_body(request.getHeader(b"content-type"), raw)
            try:
                ids = RedeliverRequest.model_validate(payload).ids
            except ValidationError as exc:
                raise RequestInvalid(problems_from_pydantic(exc)) from None
        views = await self._webhook_service().redeliver(job_id, ids, owner=owner_of(request))
        return write_json(request, 202, DeliveryList(data=views).model_dump(mode="json"))

    def _webhook_service(self):
        if self.webhooks is None:
            raise HTTPError(503, "webhook delivery is not running on this server")
        return self.webhooks

    @app.route("/v1/jobs/<job_id>/stream", methods=["GET"])
    def job_stream(self, request, job_id):
        from omnirt.gateway.websocket import job_stream_resource

        return job_stream_resource(self, job_id)

    # -- artifacts ---------------------------------------------------------------------------

    @app.route("/v1/artifacts/<sha256>", methods=["GET"])
    async def artifact(self, request, sha256):
        etag = f'"{sha256}"'.encode()
        found = await self.service.dispatcher.artifacts.get(sha256)  # off the reactor thread
        if found is None:
            raise HTTPError(404, f"unknown artifact {sha256!r}")
        blob, mime = found
        request.setHeader(b"ETag", etag)
        request.setHeader(b"Cache-Control", b"public, max-age=31536000, immutable")
        if request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Type", mime.encode())
        return blob

    # -- OpenAI-compatible -------------------------------------------------------------------

    @app.route("/v1/images/generations", methods=["POST"])
    async def openai_images(self, request):
        from omnirt.gateway.openai import images_generations

        return await images_generations(self, request)


console_routes.install(GatewayAPI.app)


class GatewayResource(Resource):
    """Wraps the Klein resource: API-key check (all but /healthz, /readyz; the WebSocket route
    checks its key itself to close with 4401), HTTP request metrics, and the request's trace (a
    server span when exporting; an incoming ``traceparent`` is the parent of the jobs it submits)."""

    isLeaf = True

    def __init__(self, api: GatewayAPI):
        super().__init__()
        self.api = api
        self.inner = api.app.resource()
        #: requests not yet answered (shutdown waits for them, bounded)
        self.inflight: set = set()
        #: (route label, status code) -> the http_requests counter child
        self._counted: dict[tuple[str, int], Any] = {}

    def render(self, request):
        path = request.path.decode("latin-1")
        label = route_label(path)
        counter = self.api.metrics.http_requests
        children = self._counted

        trace = self.api.service.dispatcher.tracing.begin_request(
            request.method.decode("latin-1"), path, label,
            {"traceparent": request.getHeader(b"traceparent"), "tracestate": request.getHeader(b"tracestate")},
        )

        def count(_=None):
            self.inflight.discard(request)
            key = (label, request.code)
            child = children.get(key)
            if child is None:  # labels() costs more than the increment: one child per route and code
                child = children[key] = counter.labels(route=label, code=str(request.code))
            child.inc()
            trace.end(request.code)

        self.inflight.add(request)
        request.notifyFinish().addBoth(count)
        token = trace.enter()
        try:
            return self._render(request, label)
        finally:
            trace.exit(token)

    def _render(self, request, label: str):
        keys = self.api.api_keys
        presented = keys.from_headers(request.getHeader(b"authorization"), request.getHeader(b"x-api-key"))
        if (keys.enabled and request.path not in OPEN_PATHS and request.path not in console_routes.CONSOLE_PATHS
                and label != "/v1/jobs/{id}/stream"):
            if not keys.check(presented):
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="omnirt"')
                if label == "/v1/images/generations":
                    return write_json(request, 401, {"error": {
                        "message": "missing or invalid API key", "type": "invalid_request_error",
                        "code": "invalid_api_key"}})
                return write_json(request, 401, {"detail": "missing or invalid API key"})
        request.omnirt_tenant = keys.identify(presented) if keys.enabled else None
        client = request.getClientAddress()
        request.omnirt_principal = principal_of(presented if keys.enabled else None, getattr(client, "host", None))
        limiter = self.api.rate_limiter
        if limiter is not None and request.method == b"POST" and label in SUBMIT_ROUTES:
            try:
                limiter.take(request.omnirt_principal)
            except RateLimited as exc:
                status, body, headers = error_response(exc)
                if label == "/v1/images/generations":
                    body = {"error": {"message": exc.message, "type": "rate_limit_error", "code": "rate_limit_exceeded"}}
                return write_json(request, status, body, headers)
        return self.inner.render(request)


def _who(request) -> dict[str, str | None]:
    """The submitter: its principal (limits, idempotency scope) and its tenant (job owner)."""
    return {"principal": getattr(request, "omnirt_principal", None), "tenant": tenant_of(request)}


