"""The OpenAPI document: generated from the validating schemas, and describing every route."""

from __future__ import annotations

import re

from twisted.trial import unittest

from omnirt.contract import GenerateRequest
from omnirt.gateway.app import GatewayAPI
from omnirt.gateway.openapi import openapi_document


def klein_routes() -> set[tuple[str, str]]:
    out = set()
    for rule in GatewayAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                out.add((path, method.lower()))
    return out


class OpenAPITests(unittest.TestCase):
    def test_every_route_described_and_nothing_else(self):
        """Each Klein route (path + method) has an operation in the document, and vice versa."""
        doc = openapi_document()
        described = {(path, method) for path, ops in doc["paths"].items() for method in ops}
        self.assertEqual(klein_routes(), described)

    def test_request_schema_is_the_validating_model(self):
        """The GenerateRequest schema is pydantic's own (same fields, same required set)."""
        schema = openapi_document()["components"]["schemas"]["GenerateRequest"]
        self.assertEqual(set(schema["properties"]), set(GenerateRequest.model_fields))
        self.assertEqual(set(schema.get("required", [])), {"task", "model"})
        self.assertFalse(schema.get("additionalProperties", True))

    def test_every_ref_resolves(self):
        """Every $ref points at a schema present in components."""
        doc = openapi_document()
        names = set(doc["components"]["schemas"])
        refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', __import__("json").dumps(doc)))
        self.assertTrue(refs)
        self.assertEqual(refs - names, set())

    def test_error_statuses_of_the_contract(self):
        """Submit documents 400/403/404/413/415/429/503 with the JSON error body."""
        op = openapi_document()["paths"]["/v1/jobs"]["post"]
        for code in ("400", "403", "404", "413", "415", "429", "503"):
            self.assertIn(code, op["responses"])
