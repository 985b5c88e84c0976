"""The ceiling for gateway benchmarks: a bare Klein app with one JSON route, on the same asyncio
Twisted reactor as the gateway, and no access log.

    python -m benchmarks.ceiling --port 8200 [--host 127.0.0.1]

Every path answers ``{"ok": true}`` (a POST body is parsed as JSON first), so the same wrk script
or ``omnirt bench --scenario sync`` that drives ``POST /v1/generate`` drives this too.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_app():
    from klein import Klein

    app = Klein()

    @app.route("/", branch=True, methods=["GET", "POST"])
    def answer(request):
        if request.method == b"POST":
            try:
                json.loads(request.content.read() or b"{}")
            except ValueError:
                request.setResponseCode(400)
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"ok":true}'

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    opts = parser.parse_args(argv)

    from omnirt.cli import install_reactor

    install_reactor()
    from twisted.internet import reactor
    from twisted.web.server import Site

    site = Site(build_app().resource())
    site.noisy = False
    site.log = lambda request: None  # no access log: this is the floor of per-request cost
    port = reactor.listenTCP(opts.port, site, interface=opts.host)
    print(f"ceiling listening on http://{opts.host}:{port.getHost().port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
