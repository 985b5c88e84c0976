"""``omnirt bench``: an HTTP-only load generator against an OmniRT-compatible gateway.

Scenarios: ``sync`` (POST /v1/generate), ``async`` (POST /v1/jobs + SSE to the terminal event),
``sse`` (one job, many subscribers: delivery spread), ``cancel`` (DELETE at the first progress
event: time to ``job_cancelled``) and ``mixed`` (a blend). Bounded by ``--total`` and by
``--duration-limit-s``; refuses non-loopback targets unless ``--allow-remote``.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from omnirt.cli import CliError

SCENARIO_HELP = {
    "sync": "POST /v1/generate and wait for the image (req/s, latency)",
    "async": "POST /v1/jobs, follow /v1/jobs/{id}/events to the terminal event (jobs/s, completion, queue wait)",
    "sse": "one job with a step delay and --subscribers SSE streams on it (per-event delivery spread)",
    "cancel": "DELETE each job at its first stage_progress (time from DELETE to job_cancelled)",
    "mixed": "a blend: sync, async, sync, async, cancel, sse, repeated",
}

#: request flags that make up a body; --body excludes them
_REQUEST_FLAGS = ("model", "prompt", "width", "height", "steps", "backend", "step_delay_ms")


class _OneLineParser(argparse.ArgumentParser):
    """Flag errors as one line (``error: ...``, exit 2), unknown flags included."""

    def error(self, message):  # argparse override
        print(f"error: omnirt bench: {message} (see omnirt bench --help)", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):  # argparse override
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test a gateway over HTTP (sync, async, sse fan-out, cancel, mixed)",
        description=textwrap.fill(
            "Load-test an OmniRT-compatible gateway over HTTP only (treq, one persistent connection pool). "
            "Bounded by --total and by --duration-limit-s; refuses targets that do not resolve to loopback "
            "unless --allow-remote. Reports throughput, latency p50/p90/p99/max and errors by status.", 90),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios:\n" + "\n".join(f"  {k:<7} {v}" for k, v in SCENARIO_HELP.items())
        + "\n\nexit status: 0 when the run finished (see errors in the report), 1 when no measured "
        "operation succeeded, 2 for bad flags or an unreachable/refused target.",
    )
    p.__class__ = _OneLineParser
    p.add_argument("--url", required=True, help="gateway base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, metavar="KEY", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--scenario", choices=tuple(SCENARIO_HELP), default="sync")
    p.add_argument("--concurrency", type=int, metavar="C", default=4, help="operations in flight at once (default 4)")
    p.add_argument("--total", type=int, metavar="N", default=100, help="measured operations (requests or jobs; default 100)")
    p.add_argument("--warmup", type=int, metavar="W", default=5, help="operations run first and not measured (default 5)")
    g = p.add_argument_group("request (a --body file, or these flags)")
    g.add_argument("--body", metavar="FILE", default=None,
                   help="a JSON request body (task, model, inputs, config) sent as is for every operation")
    g.add_argument("--model", default=None, metavar="M", help="model id (default sdxl-base-1.0)")
    g.add_argument("--prompt", default=None, metavar="P")
    g.add_argument("--width", type=int, metavar="W", default=None, help="default 64")
    g.add_argument("--height", type=int, metavar="H", default=None, help="default 64")
    g.add_argument("--steps", type=int, metavar="N", default=None, help="default 4 (sync/async), 20 (sse/cancel)")
    g.add_argument("--backend", default=None, metavar="B", help="default: the server's default backend")
    g.add_argument("--step-delay-ms", type=float, metavar="MS", default=None,
                   help="cpu-stub stub_step_delay_ms per step (default 0 for sync/async, 50 for sse/cancel)")
    p.add_argument("--subscribers", type=int, metavar="S", default=None, help="sse/mixed: SSE subscribers per job (default 10)")
    p.add_argument("--duration-limit-s", type=float, metavar="T", default=300.0,
                   help="hard stop for the whole run, warmup included (default 300)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--output", metavar="FILE", default=None, help="also write the JSON report to FILE")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a target that does not resolve to loopback (127.0.0.0/8, ::1)")
    p.set_defaults(func=run, needs_reactor=True)


def _positive(args, name: str, minimum: float = 1) -> None:
    value = getattr(args, name)
    if value is not None and value < minimum:
        raise CliError(f"--{name.replace('_', '-')} must be at least {minimum:g} (got {value:g})")


def _load_body(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read --body {path}: {exc.strerror or exc}") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise CliError(f"--body {path} is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CliError(f"--body {path} must hold a JSON object (task, model, inputs, config)")
    return body


def options_from_args(args):
    """Check the flags (CliError on a bad one) and build BenchOptions; resolves nothing."""
    from omnirt.bench.runner import BenchOptions
    from omnirt.bench.scenarios import build_bodies
    from omnirt.bench.target import TargetError, parse_target

    for name in ("concurrency", "total", "width", "height", "steps", "subscribers"):
        _positive(args, name)
    _positive(args, "warmup", 0)
    _positive(args, "step_delay_ms", 0)
    if not args.duration_limit_s > 0:
        raise CliError(f"--duration-limit-s must be more than 0 (got {args.duration_limit_s:g})")
    if args.subscribers is not None and args.scenario not in ("sse", "mixed"):
        raise CliError("--subscribers applies to --scenario sse or mixed only")
    if args.body is not None:
        given = [f"--{n.replace('_', '-')}" for n in _REQUEST_FLAGS if getattr(args, n) is not None]
        if given:
            raise CliError(f"--body cannot be combined with {', '.join(given)}")
        bodies = build_bodies(_load_body(args.body))
    else:
        bodies = build_bodies(model=args.model, prompt=args.prompt, width=args.width, height=args.height,
                              steps=args.steps, backend=args.backend, step_delay_ms=args.step_delay_ms)
    try:
        target = parse_target(args.url)
    except TargetError as exc:
        raise CliError(str(exc)) from None
    return target, BenchOptions(
        base_url=target.base_url,
        scenario=args.scenario,
        concurrency=args.concurrency,
        total=args.total,
        warmup=args.warmup,
        bodies=bodies,
        subscribers=args.subscribers or 10,
        duration_limit_s=args.duration_limit_s,
        api_key=args.api_key,
    )


def _raise_fd_limit(wanted: int) -> None:
    """Connections cost descriptors: lift the soft limit towards the hard one when needed."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass


def _progress_factory():
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def make(label: str, total: int):
        return tqdm(total=total, desc=label, unit="op", file=sys.stderr, leave=False, dynamic_ncols=True)

    return make


def _log_problems_to_stderr() -> None:
    """Errors Twisted logs (unhandled failures) and signal shutdowns, one line each, on stderr."""
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    def observer(event) -> None:
        text = formatEvent(event)
        level = event.get("log_level")
        if (level is not None and level >= LogLevel.warn) or text.startswith("Received SIG"):
            failure = event.get("log_failure")
            detail = f": {failure.getErrorMessage()}" if failure is not None else ""
            print(f"omnirt bench: {text}{detail}", file=sys.stderr, flush=True)

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)


def run(args) -> int:
    target, options = options_from_args(args)
    from omnirt.bench.runner import BenchError, run_bench
    from omnirt.bench.scenarios import connections_needed
    from omnirt.bench.target import TargetError, check_loopback

    try:
        check_loopback(target, args.allow_remote)
    except TargetError as exc:
        raise CliError(str(exc)) from None
    if args.output:
        out_dir = Path(args.output).resolve().parent
        if not out_dir.is_dir():
            raise CliError(f"--output {args.output}: no such directory {out_dir}")
    _raise_fd_limit(connections_needed(options.scenario, options.concurrency, options.subscribers) + 256)

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    outcome: dict = {}

    def begin() -> None:
        d = Deferred.fromCoroutine(run_bench(reactor, options, progress_factory=_progress_factory()))
        d.addCallbacks(lambda report: outcome.setdefault("report", report),
                       lambda failure: outcome.setdefault("failure", failure))
        d.addBoth(lambda _: reactor.stop() if reactor.running else None)

    _log_problems_to_stderr()
    reactor.callWhenRunning(begin)
    reactor.run()

    failure = outcome.get("failure")
    if failure is not None:
        if failure.check(BenchError):
            raise CliError(str(failure.value))
        raise CliError(f"benchmark failed: {failure.getErrorMessage()}")
    report = outcome.get("report")
    if report is None:
        print("omnirt bench: interrupted (the reactor stopped before the run finished)", file=sys.stderr)
        return 130
    text = json.dumps(report, indent=None if args.json else 2)
    if args.output:
        try:
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise CliError(f"cannot write --output {args.output}: {exc.strerror or exc}") from None
    if args.json:
        print(text)
    else:
        from omnirt.bench.report import format_text

        print(format_text(report))
    sys.stdout.flush()
    return 0 if report["operations"]["ok"] > 0 else 1
