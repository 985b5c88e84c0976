"""``omnirt serve``: the gateway. Builds the service tree in one place and runs it on the reactor.

Startup: check flags -> store -> workers (local engine and/or probed remote workers) -> dispatcher
and job service -> HTTP. Shutdown (SIGTERM/SIGINT): stop listening, stop admitting, let running
jobs finish within ``--shutdown-grace-s``, cancel the rest, close workers, close the store.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omnirt.cli import CliError
from omnirt.commands.common import add_model_path_arg, parse_model_paths
from omnirt.registry import DEFAULT_ALLOWED_TIERS, TIERS
from omnirt.telemetry.options import add_cli_args as add_tracing_args
from omnirt.telemetry.options import cli_options as tracing_options


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP gateway (single process, or in front of remote workers)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "ascend", "cpu", "cpu-stub"],
                   help="default backend for requests that say auto")
    p.add_argument("--max-concurrency", type=int, default=1, help="jobs the in-process engine runs at once")
    p.add_argument("--pipeline-cache-size", type=int, default=4)
    p.add_argument("--model-tier", action="append", choices=TIERS, default=None,
                   help=f"allowed model tier (repeatable; default: {', '.join(DEFAULT_ALLOWED_TIERS)})")
    p.add_argument("--api-key-file", default=None, help="file with one API key per line (# comments)")
    p.add_argument("--redis-url", default=None,
                   help="shared, durable job store: redis://[:password@]host:port/db or rediss://")
    p.add_argument("--redis-namespace", default="omnirt", help="prefix of every Redis key")
    p.add_argument("--gateway-id", default=None, help="this gateway's id in Redis (default: host-port-random)")
    p.add_argument("--lease-ttl-s", type=float, default=10.0,
                   help="a gateway silent this long is dead; another adopts its unfinished jobs")
    add_tracing_args(p)
    p.add_argument("--remote-worker", action="append", default=[], metavar="SPEC",
                   help="'worker_id=host:port@model1,model2#tag1,tag2' (repeatable)")
    p.add_argument("--remote-worker-tls-ca", default=None, metavar="PEM",
                   help="connect to remote workers over TLS, trusting this CA")
    p.add_argument("--remote-worker-tls-cert", default=None, metavar="PEM",
                   help="client certificate for workers that require mutual TLS")
    p.add_argument("--remote-worker-tls-key", default=None, metavar="PEM", help="the client certificate's key")
    p.add_argument("--fleet", default=None, metavar="FILE",
                   help="fleet file (TOML): start or adopt its supervisord and serve its workers (see omnirt fleet)")
    p.add_argument("--fleet-stop-on-exit", action="store_true",
                   help="stop the fleet (workers drain) when the gateway exits (default: leave it running)")
    p.add_argument("--local-worker", action="store_true",
                   help="also run an in-process engine when remote workers are configured")
    p.add_argument("--max-queue", type=int, default=1000, help="jobs allowed to wait; beyond -> 429")
    p.add_argument("--artifact-dir", default=None, help="where output images are stored (content-addressed)")
    add_model_path_arg(p)
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--shutdown-grace-s", type=float, default=30.0)
    p.add_argument("--job-retention-s", type=float, default=86400.0)
    p.add_argument("--job-store-max-bytes", type=int, default=None, help="memory store: bytes finished jobs may take, oldest evicted first (default 256 MiB; 0 = no byte bound)")
    p.add_argument("--max-attempts", type=int, default=3, help="dispatch attempts per job across workers")
    p.add_argument("--health-interval-s", type=float, default=2.0)
    p.add_argument("--health-failure-threshold", type=int, default=2)
    p.add_argument("--worker-idle-timeout-s", type=float, default=10.0,
                   help="a remote job with no event or heartbeat this long counts as a lost worker")
    p.add_argument("--request-deadline-s", type=float, default=30.0,
                   help="a client must deliver each request (headers and body) within this time (408)")
    p.add_argument("--rate-limit", type=float, default=None, metavar="PER_S",
                   help="job submissions per second per client (API key, or address without auth); beyond -> 429")
    p.add_argument("--max-jobs-per-key", type=int, default=None, metavar="N",
                   help="unfinished jobs per client (API key, or address without auth); beyond -> 429")
    p.add_argument("--access-log", action="store_true", help="log one line per HTTP request")
    p.add_argument("--public-url", default=None, metavar="URL",
                   help="base of absolute result URLs (e.g. https://img.example.com behind a proxy); "
                        "default: the listening address, never the client's Host header")
    p.add_argument("--keepalive-s", type=float, default=15.0, help="SSE/WebSocket keep-alive interval")
    p.set_defaults(func=run, needs_reactor=True)


def _check(args) -> None:
    if args.fleet_stop_on_exit and not args.fleet:
        raise CliError("--fleet-stop-on-exit needs --fleet FILE")
    for name in ("max_concurrency", "pipeline_cache_size", "max_queue", "max_body_bytes", "max_attempts",
                 "health_failure_threshold"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1")
    if args.job_store_max_bytes is not None and (args.job_store_max_bytes < 0 or args.redis_url):
        raise CliError("--job-store-max-bytes must be >= 0 and bounds the memory store (not --redis-url: Redis's maxmemory does)")
    if args.rate_limit is not None and args.rate_limit <= 0:
        raise CliError("--rate-limit must be positive")
    if args.max_jobs_per_key is not None and args.max_jobs_per_key < 1:
        raise CliError("--max-jobs-per-key must be at least 1")
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be 0..65535 (got {args.port})")
    if args.public_url is not None:
        from omnirt.gateway.edge import parse_public_url

        try:
            args.public_url = parse_public_url(args.public_url)
        except ValueError as exc:
            raise CliError(str(exc)) from None


def plaintext_warnings(remote_specs, worker_tls) -> list[str]:
    """One warning per non-loopback worker reached without TLS."""
    from omnirt.workers.tls import is_loopback_host

    if worker_tls is not None:
        return []
    return [f"warning: remote worker {spec.worker_id} at {spec.address} is reached over plaintext gRPC; "
            "use --remote-worker-tls-ca (and a worker started with --grpc-tls-cert/--grpc-tls-key)"
            for spec in remote_specs if not is_loopback_host(spec.host)]


def default_artifact_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return os.path.join(base, "omnirt", "artifacts")


def run(args) -> int:
    _check(args)
    try:
        otlp_endpoint, otlp_headers = tracing_options(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    model_paths = parse_model_paths(args.model_path)
    from omnirt.gateway.auth import ApiKeys, AuthConfigError, load_api_keys

    keys = ApiKeys()
    if args.api_key_file:
        try:
            keys = ApiKeys(load_api_keys(args.api_key_file))
        except AuthConfigError as exc:
            raise CliError(str(exc)) from None
    remote_specs = []
    if args.remote_worker:
        from omnirt.workers.spec import SpecError, parse_remote_workers

        try:
            remote_specs = parse_remote_workers(args.remote_worker)
        except SpecError as exc:
            raise CliError(str(exc)) from None
    fleet = None
    if args.fleet:
        from omnirt.fleet import FleetError, load_fleet

        try:
            fleet = load_fleet(args.fleet)
        except FleetError as exc:
            raise CliError("\nerror: ".join(exc.lines())) from None
        clash = sorted({w.id for w in fleet.workers} & {s.worker_id for s in remote_specs})
        if clash:
            raise CliError(f"worker id(s) {', '.join(clash)} are both --remote-worker and fleet workers")

    from omnirt.workers.tls import ClientTLS, TLSConfigError

    try:
        worker_tls = ClientTLS.from_files(args.remote_worker_tls_ca, args.remote_worker_tls_cert,
                                          args.remote_worker_tls_key)
    except TLSConfigError as exc:
        raise CliError(str(exc)) from None
    for warning in plaintext_warnings(remote_specs, worker_tls):
        print(warning, file=sys.stderr, flush=True)

    from omnirt.gateway.server import Gateway

    gateway = Gateway(
        host=args.host,
        port=args.port,
        backend=args.backend,
        max_concurrency=args.max_concurrency,
        pipeline_cache_size=args.pipeline_cache_size,
        allowed_tiers=tuple(args.model_tier or DEFAULT_ALLOWED_TIERS),
        api_keys=keys,
        remote_specs=remote_specs,
        local_worker=args.local_worker or not (remote_specs or fleet),
        max_queue=args.max_queue,
        artifact_dir=args.artifact_dir or default_artifact_dir(),
        model_paths=model_paths,
        max_body_bytes=args.max_body_bytes,
        shutdown_grace_s=args.shutdown_grace_s,
        job_retention_s=args.job_retention_s,
        job_store_max_bytes=256 << 20 if args.job_store_max_bytes is None else args.job_store_max_bytes or None,
        max_attempts=args.max_attempts,
        health_interval_s=args.health_interval_s,
        health_failure_threshold=args.health_failure_threshold,
        keepalive_s=args.keepalive_s,
        worker_idle_timeout_s=args.worker_idle_timeout_s,
        redis_url=args.redis_url,
        redis_namespace=args.redis_namespace,
        gateway_id=args.gateway_id,
        lease_ttl_s=args.lease_ttl_s,
        request_deadline_s=args.request_deadline_s,
        worker_tls=worker_tls,
        access_log=args.access_log,
        public_url=args.public_url,
        rate_limit=args.rate_limit,
        max_jobs_per_key=args.max_jobs_per_key,
        fleet=fleet,
        fleet_stop_on_exit=args.fleet_stop_on_exit,
        otlp_endpoint=otlp_endpoint,
        otlp_headers=otlp_headers,
        log_format=args.log_format,
    )
    code = gateway.run_forever()
    sys.stdout.flush()
    return code
