"""The console's routes (``/``, ``/docs``, ``/console/...``) through the real gateway stack in memory."""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from omnirt.gateway import console_routes
from tests.unit.gateway_harness import Harness

CONSOLE_DIR = Path(console_routes.__file__).parent / "console"


class ConsoleRouteTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        self.h = Harness(self, keys=("sekrit",))
        yield self.h.start()

    @inlineCallbacks
    def test_pages_open_without_key_and_hold_no_data(self):
        """/ and /docs answer 200 HTML without a key (the API behind them still needs one), with a
        same-origin-only Content-Security-Policy; the files are the packaged ones."""
        for path, name in (("/", "index.html"), ("/docs", "docs.html"), ("/console/console.js", "console.js")):
            resp, content = yield self.h.request("GET", path)
            self.assertEqual(resp.code, 200, path)
            self.assertEqual(content, (CONSOLE_DIR / name).read_bytes())
            csp = resp.headers.getRawHeaders("content-security-policy")[0]
            self.assertIn("default-src 'self'", csp)
            self.assertNotIn("http", csp)
        resp, _ = yield self.h.request("GET", "/v1/jobs")
        self.assertEqual(resp.code, 401)

    @inlineCallbacks
    def test_vendored_swagger_ui_served_locally(self):
        """The docs page loads Swagger UI from the gateway itself (no CDN): its bundle and CSS are the
        files of the installed openapi-ui-bundles distribution."""
        from openapi_ui_bundles.swagger_ui import static_path

        _, page = yield self.h.request("GET", "/docs")
        self.assertIn(b'src="/console/vendor/swagger-ui/swagger-ui-bundle.js"', page)
        self.assertNotIn(b"//cdn", page)
        for name, mime in (("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
                           ("swagger-ui.css", "text/css; charset=utf-8")):
            resp, content = yield self.h.request("GET", f"/console/vendor/swagger-ui/{name}")
            self.assertEqual(resp.code, 200, name)
            self.assertEqual(content, (static_path / name).read_bytes())
            self.assertEqual(resp.headers.getRawHeaders("content-type"), [mime])
            if name.endswith(".js"):
                self.assertIn(b"SwaggerUIBundle", content)

    @inlineCallbacks
    def test_no_page_references_another_origin(self):
        """No packaged HTML/JS/CSS of ours loads anything from another origin."""
        for name in ("index.html", "docs.html", "console.js", "docs.js", "console.css"):
            text = (CONSOLE_DIR / name).read_text()
            self.assertNotRegex(text, r"(src|href)=\"(https?:)?//", name)
        yield None

    @inlineCallbacks
    def test_unknown_console_file_and_traversal_404(self):
        """Only the listed files are served: an unknown name or a ../ path is a JSON 404 (401 without
        a key: only the listed files are open)."""
        resp, _ = yield self.h.request("GET", "/console/nope.js")
        self.assertEqual(resp.code, 401)
        for path in ("/console/nope.js", "/console/../app.py", "/console/%2e%2e/app.py", "/console/"):
            resp, content = yield self.h.request("GET", path, headers={"Authorization": "Bearer sekrit"})
            self.assertEqual(resp.code, 404, path)
            self.assertIn("detail", json.loads(content))

    @inlineCallbacks
    def test_etag_revalidation(self):
        """A repeated request with the ETag gets 304 and no body."""
        resp, _ = yield self.h.request("GET", "/")
        etag = resp.headers.getRawHeaders("etag")[0]
        resp, content = yield self.h.request("GET", "/", headers={"If-None-Match": etag})
        self.assertEqual(resp.code, 304)
        self.assertEqual(content, b"")
