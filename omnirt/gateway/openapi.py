"""The OpenAPI 3.1 document of the gateway, served at /openapi.json.

Schemas come from the same pydantic models the gateway validates requests with (contract.py,
openai.py) and builds its answers with (views.py), so the document cannot drift from what the
server does; tests check every Klein route is described and that real answers validate.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from omnirt import __version__
from omnirt.contract import GenerateRequest, GenerateResult, JobEvent
from omnirt.gateway.openai import OpenAIImagesRequest
from omnirt.gateway.views import (
    DeliveryList,
    ErrorBody,
    Health,
    JobList,
    JobView,
    ModelList,
    OpenAIError,
    OpenAIImagesResponse,
    Readiness,
    RedeliverRequest,
    TraceView,
)

_MODELS = (GenerateRequest, GenerateResult, JobView, JobEvent, ErrorBody, OpenAIImagesRequest, OpenAIError,
           OpenAIImagesResponse, ModelList, JobList, Readiness, Health, TraceView, DeliveryList, RedeliverRequest)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _one_of(models: tuple[type[BaseModel], ...], description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"anyOf": [_ref(m) for m in models]}}}}


def _errors(*codes: int, openai: bool = False) -> dict[str, Any]:
    text = {400: "invalid request (every problem listed)", 401: "missing or invalid API key",
            403: "model tier not allowed", 404: "unknown model, job or artifact", 409: "conflict",
            413: "body too large", 415: "body is not JSON", 429: "queue full (see Retry-After)",
            503: "no worker can serve the model, store unavailable, or shutting down"}
    body = OpenAIError if openai else ErrorBody
    return {str(code): _json(body, text[code]) for code in codes}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
               "schema": {"type": "string", "minLength": 1, "maxLength": 255},
               "description": "1 to 255 characters of UTF-8 text (else 400); same key + same body from the same "
                              "client (API key, or address without auth) within the retention = the same job"}
#: a query value that may be sent empty, meaning the same as leaving it out
EMPTY_OK = {"allowEmptyValue": True}


@functools.cache
def _page(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "security": [], "responses": {
        "200": {"description": "an HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}}}}


def openapi_document() -> dict[str, Any]:
    _, defs = models_json_schema([(m, "serialization") for m in _MODELS],
                                 ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})
    submit_body = {"required": True, "content": {"application/json": {"schema": _ref(GenerateRequest)}},
                   "description": "unknown top-level fields are ignored (as upstream OmniRT 0.1 does) and listed "
                                  "in the answer's `warnings`; unknown keys inside inputs or config are a 400"}
    authed = [{"bearer": []}, {"apiKey": []}]
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "liveness", "security": [], "responses": {"200": _json(Health, "alive")}}},
        "/readyz": {"get": {"summary": "readiness: store reachable and a usable worker", "security": [],
                            "responses": {"200": _json(Readiness, "ready"), "503": _json(Readiness, "not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(401)}}},
        "/openapi.json": {"get": {"summary": "this document", "responses": {
            "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}},
            **_errors(401)}}},
        "/v1/models": {"get": {
            "summary": "models this server allows",
            "parameters": [{"name": "tier", "in": "query", "schema": {
                "type": "string", "enum": ["core", "adjacent", "experimental", "all"]}}],
            "responses": {"200": _json(ModelList, "models"), **_errors(400, 401)}}},
        "/v1/generate": {"post": {
            "summary": "generate: sync (waits; outputs inline) or async_run=true (200 + the queued JobRecord, "
                       "as upstream OmniRT; POST /v1/jobs answers 202)",
            "parameters": [IDEMPOTENCY], "requestBody": submit_body,
            "responses": {"200": _one_of((GenerateResult, JobView), "the sync result; with async_run: the queued job"),
                          **_errors(400, 401, 403, 404, 409, 413, 415, 429, 503),
                          "500": _json(ErrorBody, "the job failed (its error)")}}},
        "/v1/jobs": {
            "post": {"summary": "submit an async job", "parameters": [IDEMPOTENCY], "requestBody": submit_body,
                     "responses": {"202": _json(JobView, "accepted"), "200": _json(JobView, "idempotent replay"),
                                   **_errors(400, 401, 403, 404, 409, 413, 415, 429, 503)}},
            "get": {"summary": "jobs, newest first", "parameters": [
                {"name": "state", "in": "query", **EMPTY_OK, "schema": {"type": "string", "enum": [
                    "queued", "running", "cancelling", "succeeded", "failed", "cancelled"]}},
                {"name": "model", "in": "query", **EMPTY_OK, "schema": {"type": "string"}},
                {"name": "limit", "in": "query", **EMPTY_OK,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}}],
                "responses": {"200": _json(JobList, "jobs"), **_errors(400, 401)}}},
        "/v1/jobs/{job_id}": {
            "get": {"summary": "a job: state, result (output URLs first), ..., request, events last", "parameters": [
                JOB_ID, {"name": "events", "in": "query", "description": "false: a light record without the events",
                         "schema": {"type": "boolean", "default": True}}],
                    "responses": {"200": _json(JobView, "the job"), **_errors(400, 401, 404)}},
            "delete": {"summary": "cancel: queued -> cancelled, running -> cancelling", "parameters": [JOB_ID],
                       "responses": {"200": _json(JobView, "cancelled or cancelling"), **_errors(401, 404, 409)}}},
        "/v1/jobs/{job_id}/events": {"get": {
            "summary": "server-sent events: replay from Last-Event-ID / ?after=, then live; ends after the terminal event",
            "parameters": [JOB_ID, {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                           {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}}],
            "responses": {"200": {"description": "id: <seq> / event: <name> / data: <JobEvent JSON>",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(400, 401, 404)}}},
        "/v1/jobs/{job_id}/stream": {"get": {
            "summary": "WebSocket: each event as JSON; send {\"action\":\"cancel\"}; close 4404 unknown job, 4401 unauthorized",
            "parameters": [JOB_ID, {"name": "after", "in": "query", "schema": {"type": "string"},
                                    "description": "replay events after this seq (digits; anything else = 0)"},
                           {"name": "api_key", "in": "query", "schema": {"type": "string"},
                            "description": "the API key, for browsers that cannot set headers"}],
            "responses": {"101": {"description": "switching protocols"},
                          "426": _json(ErrorBody, "a plain HTTP request (no Upgrade: websocket)")}}},
        "/v1/jobs/{job_id}/trace": {"get": {
            "summary": "the job's trace: gateway and worker spans with parent links", "parameters": [JOB_ID],
            "responses": {"200": _json(TraceView, "trace view"), **_errors(401, 404)}}},
        "/v1/jobs/{job_id}/webhooks": {"get": {
            "summary": "the job's webhook deliveries: state, attempts, last status, next try", "parameters": [JOB_ID],
            "responses": {"200": _json(DeliveryList, "deliveries"), **_errors(401, 404, 503)}}},
        "/v1/jobs/{job_id}/webhooks/redeliver": {"post": {
            "summary": "send settled deliveries again under the same webhook-id", "parameters": [JOB_ID],
            "requestBody": {"required": False, "content": {"application/json": {"schema": _ref(RedeliverRequest)}}},
            "responses": {"202": _json(DeliveryList, "deliveries queued again"),
                          **_errors(400, 401, 404, 409, 415, 503)}}},
        "/v1/artifacts/{sha256}": {"get": {
            "summary": "an output by content hash",
            "parameters": [{"name": "sha256", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}],
            "responses": {"200": {"description": "the bytes (ETag = sha256)",
                                  "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                          "304": {"description": "not modified"}, **_errors(401, 404)}}},
        "/": _page("the web console: workers, jobs, live progress, submit"),
        "/docs": _page("this API, interactive (Swagger UI)"),
        "/console/{file}": {"get": {
            "summary": "the console's static files", "security": [],
            "parameters": [{"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the file"}, "304": {"description": "not modified"},
                          **_errors(404)}}},
        "/v1/images/generations": {"post": {
            "summary": "OpenAI Images API",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(OpenAIImagesRequest)}}},
            "responses": {"200": _json(OpenAIImagesResponse, "images"),
                          **_errors(400, 401, 403, 404, 409, 413, 415, 429, 503, openai=True),
                          "500": _json(OpenAIError, "generation failed")}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "OmniRT serving", "version": __version__,
                 "description": "Image-generation jobs over HTTP: sync, async, SSE/WebSocket progress, cancel."},
        "security": authed,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        },
        "paths": paths,
    }
