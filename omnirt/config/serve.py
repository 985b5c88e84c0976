"""``omnirt serve``'s configuration: its flags, and ``GatewayConfig``, the typed object they are
parsed into once (every check made here, each failure one line); the service tree is built from it."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from omnirt.config.flags import ConfigError, add_model_path_arg, parse_model_paths
from omnirt.registry import DEFAULT_ALLOWED_TIERS, TIERS
from omnirt.webhooks.settings import WebhookSettings

#: the memory store's default byte bound on finished jobs (``--job-store-max-bytes``)
DEFAULT_JOB_STORE_MAX_BYTES = 256 << 20


def add_arguments(p) -> None:
    """The flags of ``omnirt serve``."""
    from omnirt.config.adapters import add_adapter_dir_arg
    from omnirt.store.redis.options import add_ha_arguments
    from omnirt.telemetry.options import add_cli_args as add_tracing_args
    from omnirt.webhooks.options import add_cli_args as add_webhook_args

    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "ascend", "cpu", "cpu-stub"],
                   help="default backend for requests that say auto")
    p.add_argument("--max-concurrency", type=int, default=1, help="jobs the in-process engine runs at once")
    p.add_argument("--pipeline-cache-size", type=int, default=4)
    from omnirt.config.engine import add_engine_arguments

    add_engine_arguments(p)  # the in-process engine's batching and accelerator options
    p.add_argument("--model-tier", action="append", choices=TIERS, default=None,
                   help=f"allowed model tier (repeatable; default: {', '.join(DEFAULT_ALLOWED_TIERS)})")
    p.add_argument("--api-key-file", default=None,
                   help="file with one API key per line, 'name:key' or 'key' (# comments); each key is a "
                        "tenant that sees only its own jobs")
    p.add_argument("--admin-key-file", default=None,
                   help="file of admin keys (same form): they see and cancel every tenant's jobs")
    p.add_argument("--redis-url", default=None,
                   help="shared, durable job store: redis://[:password@]host:port/db or rediss://")
    p.add_argument("--redis-namespace", default="omnirt", help="prefix of every Redis key")
    add_ha_arguments(p)
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
    add_adapter_dir_arg(p)
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--shutdown-grace-s", type=float, default=30.0)
    p.add_argument("--job-retention-s", type=float, default=86400.0)
    p.add_argument("--job-store-max-bytes", type=int, default=None,
                   help="memory store: bytes finished jobs may take, oldest evicted first "
                        "(default 256 MiB; 0 = no byte bound)")
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
    add_webhook_args(p)
    from omnirt.workers import upstream

    upstream.add_arguments(p)


def default_artifact_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return os.path.join(base, "omnirt", "artifacts")


def default_gateway_id(port: int) -> str:
    import socket
    import uuid

    return f"{socket.gethostname()}-{port}-{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    """Everything a gateway is built from (``omnirt.service.make_gateway_service``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    max_concurrency: int = 1
    pipeline_cache_size: int = 4
    allowed_tiers: tuple[str, ...] = DEFAULT_ALLOWED_TIERS
    #: omnirt.gateway.auth.ApiKeys (None: no auth)
    api_keys: Any = None
    #: omnirt.workers.spec.RemoteWorkerSpec of each --remote-worker
    remote_specs: tuple[Any, ...] = ()
    #: run an in-process engine (always when no remote worker or fleet is configured)
    local_worker: bool = True
    max_queue: int = 1000
    artifact_dir: str = dataclasses.field(default_factory=default_artifact_dir)
    #: model -> weights folder (checked to be a directory)
    model_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    #: --adapter-dir folders of the in-process engine (absolute; LoRA files are looked up there)
    adapter_dirs: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    job_retention_s: float = 86400.0
    #: seconds between retention sweeps (None: the store's own rate, derived from the retention)
    retention_sweep_s: float | None = None
    #: bytes the memory store's finished jobs may take, oldest evicted first (None: no byte bound)
    job_store_max_bytes: int | None = DEFAULT_JOB_STORE_MAX_BYTES
    max_attempts: int = 3
    health_interval_s: float = 2.0
    health_failure_threshold: int = 2
    keepalive_s: float = 15.0
    worker_idle_timeout_s: float = 10.0
    #: redis://, rediss:// or redis+sentinel:// (``--redis-sentinel``/``--redis-master-name`` folded in)
    redis_url: str | None = None
    redis_namespace: str = "omnirt"
    #: WAIT for this many replicas after a create and a terminal transition (``--redis-min-replicas``)
    redis_min_replicas: int = 0
    redis_wait_timeout_s: float = 1.0
    gateway_id: str = ""
    lease_ttl_s: float = 10.0
    request_deadline_s: float = 30.0
    #: omnirt.workers.tls.ClientTLS for remote workers, or None (plaintext)
    worker_tls: Any = None
    access_log: bool = False
    #: base of absolute result URLs (None: the listening address)
    public_url: str | None = None
    rate_limit: float | None = None
    max_jobs_per_key: int | None = None
    #: omnirt.fleet.Fleet of --fleet, or None
    fleet: Any = None
    fleet_stop_on_exit: bool = False
    otlp_endpoint: str | None = None
    otlp_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    log_format: str = "text"
    #: signing secrets, retry policy, limits of webhook delivery (the ``--webhook-*`` flags)
    webhooks: WebhookSettings = dataclasses.field(default_factory=WebhookSettings)
    #: omnirt.workers.upstream.UpstreamOptions for upstream OmniRT 0.1 workers (None: the defaults)
    upstream_options: Any = None
    #: the in-process engine's batching and accelerator options (omnirt.config.engine.EngineOptions)
    engine_options: Any = None

    @property
    def job_capacity(self) -> int:
        """Jobs the in-process engine admits at once (a batch counts as the jobs it holds)."""
        if self.engine_options is None:
            return self.max_concurrency
        return self.engine_options.job_capacity(self.max_concurrency)
    #: one line per warning, printed at start (e.g. plaintext links to remote workers)
    warnings: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.gateway_id or default_gateway_id(self.port)

    @classmethod
    def from_args(cls, args) -> GatewayConfig:
        """Parse and check ``omnirt serve``'s flags; ConfigError (one line) for the first bad one."""
        _check_numbers(args)
        from omnirt.telemetry.options import cli_options

        try:
            otlp_endpoint, otlp_headers = cli_options(args)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        remote_specs = _remote_specs(args.remote_worker)
        fleet = _fleet(args.fleet, remote_specs)
        worker_tls = _worker_tls(args)
        webhooks = _webhooks(args)
        upstream_options = _upstream_options(args)
        redis = _redis_options(args)
        from omnirt.config.engine import engine_options, refuse_on_cpu

        try:
            options = refuse_on_cpu(engine_options(args), args.backend)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(
            host=args.host, port=args.port, backend=args.backend, max_concurrency=args.max_concurrency,
            pipeline_cache_size=args.pipeline_cache_size,
            allowed_tiers=tuple(args.model_tier or DEFAULT_ALLOWED_TIERS),
            api_keys=_api_keys(args.api_key_file, args.admin_key_file), remote_specs=tuple(remote_specs),
            local_worker=args.local_worker or not (remote_specs or fleet), max_queue=args.max_queue,
            artifact_dir=args.artifact_dir or default_artifact_dir(), model_paths=parse_model_paths(args.model_path),
            adapter_dirs=_adapter_dirs(args.adapter_dir),
            max_body_bytes=args.max_body_bytes, shutdown_grace_s=args.shutdown_grace_s,
            job_retention_s=args.job_retention_s, job_store_max_bytes=_job_store_max_bytes(args),
            max_attempts=args.max_attempts,
            health_interval_s=args.health_interval_s, health_failure_threshold=args.health_failure_threshold,
            keepalive_s=args.keepalive_s, worker_idle_timeout_s=args.worker_idle_timeout_s,
            redis_url=redis["url"], redis_namespace=args.redis_namespace,
            redis_min_replicas=redis["min_replicas"], redis_wait_timeout_s=redis["wait_timeout_s"],
            gateway_id=args.gateway_id or default_gateway_id(args.port), lease_ttl_s=args.lease_ttl_s,
            request_deadline_s=args.request_deadline_s, worker_tls=worker_tls, access_log=args.access_log,
            public_url=_public_url(args.public_url), rate_limit=args.rate_limit, max_jobs_per_key=args.max_jobs_per_key, fleet=fleet,
            fleet_stop_on_exit=args.fleet_stop_on_exit, otlp_endpoint=otlp_endpoint, otlp_headers=otlp_headers,
            log_format=args.log_format, webhooks=webhooks, upstream_options=upstream_options,
            engine_options=options,
            warnings=tuple(plaintext_warnings(remote_specs, worker_tls)
                           + _adapter_dir_warnings(args, local_worker=args.local_worker or not (remote_specs or fleet))),
        )


def _check_numbers(args) -> None:
    if args.fleet_stop_on_exit and not args.fleet:
        raise ConfigError("--fleet-stop-on-exit needs --fleet FILE")
    for name in ("max_concurrency", "pipeline_cache_size", "max_queue", "max_body_bytes", "max_attempts",
                 "health_failure_threshold"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate_limit is not None and args.rate_limit <= 0:
        raise ConfigError("--rate-limit must be positive")
    if args.max_jobs_per_key is not None and args.max_jobs_per_key < 1:
        raise ConfigError("--max-jobs-per-key must be at least 1")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0..65535 (got {args.port})")
    if args.job_store_max_bytes is not None and (args.job_store_max_bytes < 0 or args.redis_url):
        raise ConfigError("--job-store-max-bytes must be >= 0 and bounds the memory store "
                          "(not --redis-url: Redis's maxmemory does)")


def _job_store_max_bytes(args) -> int | None:
    """--job-store-max-bytes: unset -> the default bound, 0 -> no byte bound."""
    if args.job_store_max_bytes is None:
        return DEFAULT_JOB_STORE_MAX_BYTES
    return args.job_store_max_bytes or None


def _public_url(value: str | None) -> str | None:
    if value is None:
        return None
    from omnirt.gateway.edge import parse_public_url

    try:
        return parse_public_url(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _redis_options(args) -> dict[str, Any]:
    from omnirt.store.redis.options import store_settings

    try:
        return store_settings(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _webhooks(args) -> WebhookSettings:
    from omnirt.webhooks.options import cli_settings

    try:
        return cli_settings(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _adapter_dirs(items: list[str]) -> tuple[str, ...]:
    from omnirt.config.adapters import parse_adapter_dirs

    try:
        return parse_adapter_dirs(items)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _adapter_dir_warnings(args, *, local_worker: bool) -> list[str]:
    """--adapter-dir is the in-process engine's: without one it is ignored, and said so."""
    if not args.adapter_dir or local_worker:
        return []
    return ["warning: --adapter-dir is ignored: it applies to the in-process engine (--local-worker); "
            "remote workers resolve adapters in their own --adapter-dir"]


def _api_keys(path: str | None, admin_path: str | None = None):
    from omnirt.gateway.auth import ApiKeys, AuthConfigError, load_api_keys

    try:
        keys = load_api_keys(path) if path else ()
        admin = load_api_keys(admin_path, "--admin-key-file") if admin_path else ()
        return ApiKeys(keys, admin)
    except AuthConfigError as exc:
        raise ConfigError(str(exc)) from None


def _remote_specs(items: list[str]) -> list:
    if not items:
        return []
    from omnirt.workers.spec import SpecError, parse_remote_workers

    try:
        return parse_remote_workers(items)
    except SpecError as exc:
        raise ConfigError(str(exc)) from None


def _fleet(path: str | None, remote_specs):
    if not path:
        return None
    from omnirt.fleet import FleetError, load_fleet

    try:
        fleet = load_fleet(path)
    except FleetError as exc:
        raise ConfigError("\nerror: ".join(exc.lines())) from None
    clash = sorted({w.id for w in fleet.workers} & {s.worker_id for s in remote_specs})
    if clash:
        raise ConfigError(f"worker id(s) {', '.join(clash)} are both --remote-worker and fleet workers")
    return fleet


def _upstream_options(args):
    from omnirt.workers import upstream

    try:
        return upstream.options_from_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _worker_tls(args):
    from omnirt.workers.tls import ClientTLS, TLSConfigError

    try:
        return ClientTLS.from_files(args.remote_worker_tls_ca, args.remote_worker_tls_cert, args.remote_worker_tls_key)
    except TLSConfigError as exc:
        raise ConfigError(str(exc)) from None


def plaintext_warnings(remote_specs, worker_tls) -> list[str]:
    """One warning per non-loopback worker reached without TLS."""
    from omnirt.workers.tls import is_loopback_host

    if worker_tls is not None:
        return []
    return [f"warning: remote worker {spec.worker_id} at {spec.address} is reached over plaintext gRPC; "
            "use --remote-worker-tls-ca (and a worker started with --grpc-tls-cert/--grpc-tls-key)"
            for spec in remote_specs if not is_loopback_host(spec.host)]


def print_warnings(config: GatewayConfig) -> None:
    for warning in config.warnings:
        print(warning, file=sys.stderr, flush=True)
