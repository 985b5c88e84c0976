"""The web console (``/``) and the interactive API page (``/docs``): static files shipped in the
package under ``omnirt/gateway/console/`` and Swagger UI's from the ``openapi-ui-bundles``
distribution (its static files, no code), served from memory (a fixed whitelist, no directory
listing, no path from the URL ever reaches the filesystem). The pages hold no data: they are open
without a key and ask for one themselves when the API needs it."""

from __future__ import annotations

import hashlib
from importlib import resources

_OURS = "omnirt.gateway"
_SWAGGER_UI = "openapi_ui_bundles.swagger_ui"

#: URL path -> (package, file under the package's folder, content type)
STATIC_FILES: dict[str, tuple[str, str, str]] = {
    "/": (_OURS, "console/index.html", "text/html; charset=utf-8"),
    "/docs": (_OURS, "console/docs.html", "text/html; charset=utf-8"),
    "/console/console.css": (_OURS, "console/console.css", "text/css; charset=utf-8"),
    "/console/console.js": (_OURS, "console/console.js", "text/javascript; charset=utf-8"),
    "/console/docs.js": (_OURS, "console/docs.js", "text/javascript; charset=utf-8"),
    "/console/favicon.svg": (_OURS, "console/favicon.svg", "image/svg+xml"),
    "/console/vendor/swagger-ui/swagger-ui-bundle.js": (
        _SWAGGER_UI, "vendor/swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "/console/vendor/swagger-ui/swagger-ui.css": (_SWAGGER_UI, "vendor/swagger-ui.css", "text/css; charset=utf-8"),
}

#: paths open without an API key (the API calls the pages make carry the key themselves)
CONSOLE_PATHS = frozenset(p.encode() for p in STATIC_FILES)

#: Swagger UI needs inline styles and data: images; nothing loads from another origin
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

_cache: dict[str, tuple[bytes, str]] = {}


def load(path: str) -> tuple[bytes, str, str] | None:
    """``(body, content type, etag)`` of a console URL path, or None. Files are small (the largest,
    Swagger UI's bundle, about 1.5 MB) and read once per process."""
    entry = STATIC_FILES.get(path)
    if entry is None:
        return None
    package, name, mime = entry
    if path not in _cache:
        body = resources.files(package).joinpath(*name.split("/")).read_bytes()
        _cache[path] = (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    body, etag = _cache[path]
    return body, mime, etag


def install(app) -> None:
    """Register ``/``, ``/docs`` and ``/console/...`` on the gateway's Klein app."""

    def serve(self, request):
        from omnirt.gateway.errors import HTTPError

        found = load(request.path.decode("latin-1"))
        if found is None:
            raise HTTPError(404, f"no such console file {request.path.decode('latin-1')!r}")
        body, mime, etag = found
        request.setHeader(b"Content-Type", mime.encode())
        request.setHeader(b"ETag", etag.encode())
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Security-Policy", CSP.encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        if request.getHeader(b"if-none-match") == etag.encode():
            request.setResponseCode(304)
            return b""
        return body

    app.route("/", methods=["GET", "HEAD"])(serve)
    app.route("/docs", methods=["GET", "HEAD"], endpoint="console_docs")(serve)
    app.route("/console/<path:file>", methods=["GET", "HEAD"], endpoint="console_static")(
        lambda self, request, file: serve(self, request))
