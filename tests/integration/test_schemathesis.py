"""Schemathesis against a live ``omnirt serve --backend cpu-stub`` on loopback, from its own
/openapi.json: for every operation, a bounded number of generated requests (valid ones, then
invalid ones) must get an answer the document describes (status, content type, body schema,
headers) and never a 5xx. A change on one side only (schema drift) fails here.

``OMNIRT_SCHEMATHESIS_EXAMPLES`` sets the examples per operation and mode (CI: the default).
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial import unittest

from tests.support.procs import free_port, start_omnirt

EXAMPLES = int(os.environ.get("OMNIRT_SCHEMATHESIS_EXAMPLES", "25"))
REQUEST_TIMEOUT_S = 15.0
#: operations whose valid requests cannot get a 2xx over plain HTTP, and the documented reason
NO_PLAIN_HTTP_SUCCESS = {
    "GET /v1/jobs/{job_id}/stream": "a WebSocket route: a plain GET is answered 426, as documented",
}


class SchemaConformance(unittest.TestCase):
    timeout = 900

    def test_every_operation_answers_as_documented(self):
        """Generated positive and negative requests for each documented operation get answers
        that conform to the document; a failure names the operation, the request and the check."""
        import schemathesis
        from hypothesis import HealthCheck, given, settings
        from hypothesis.errors import Unsatisfiable
        from schemathesis import GenerationMode
        from schemathesis.checks import positive_data_acceptance

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        scratch = Path(self.mktemp()).resolve()
        scratch.mkdir(parents=True)
        keys = scratch / "keys"
        keys.write_text("schema-test-key\n")
        auth = {"Authorization": "Bearer schema-test-key"}
        start_omnirt(self, ["serve", "--backend", "cpu-stub", "--port", str(port), "--artifact-dir",
                            str(scratch / "artifacts"), "--max-queue", "100000", "--api-key-file", str(keys),
                            # a generated webhook host may be a private IPv4 literal: the document
                            # gives the URL syntax; refusing private targets is this policy flag's
                            "--webhook-allow-private"],
                     port, name="serve")
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers=auth)
        failures: list[str] = []
        ran: list[str] = []
        for result in schema.get_all_operations():
            operation = result.ok()
            excluded = [positive_data_acceptance] if operation.label in NO_PLAIN_HTTP_SUCCESS else []
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                label = f"{operation.label} [{mode.value}]"

                @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck), print_blob=False)
                @given(case=operation.as_strategy(generation_mode=mode))
                def check(case):
                    response = case.call(base_url=base, headers=auth, timeout=REQUEST_TIMEOUT_S)
                    # run at once below, inside this iteration: the late binding is the intended one
                    case.validate_response(response, headers=auth, excluded_checks=excluded)  # noqa: B023

                try:
                    check()
                except Unsatisfiable:
                    if mode is GenerationMode.POSITIVE:
                        failures.append(f"{label}: no valid request can be generated from the document")
                    continue  # no parameter or body to make invalid
                except (Exception, BaseExceptionGroup) as exc:  # every failing operation is reported at once
                    failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:3000]}")
                ran.append(label)
        print(f"schemathesis: {len(ran)} operation/mode pairs, {EXAMPLES} examples each, {len(failures)} failing")
        self.assertGreater(len(ran), 20)
        self.assertEqual(failures, [], "\n\n".join(failures))
