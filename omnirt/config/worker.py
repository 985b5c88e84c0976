"""``omnirt worker``'s configuration: its flags, and one typed value parsed from them once.

``add_arguments`` declares the flags; ``WorkerConfig.from_args`` checks every value and raises
``ConfigError`` with a one-line reason for the first bad one. Nothing here imports the engine,
torch or a reactor.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os

from omnirt.config.adapters import add_adapter_dir_arg, parse_adapter_dirs
from omnirt.config.engine import EngineOptions, add_engine_arguments, engine_options, refuse_on_cpu
from omnirt.config.flags import ConfigError, add_model_path_arg, parse_model_paths
from omnirt.workers.compat import ALLOW_PATH_FLAG, MAX_QUEUE_FLAG, OUTPUT_DIR_FLAG
from omnirt.workers.spec import comma_list as _comma_list  # the one comma-list parser (``--remote-worker``'s)

__all__ = ["DEFAULT_PORT", "ConfigError", "WorkerConfig", "add_arguments", "format_address"]

DEFAULT_PORT = 50061


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from omnirt.store.redis.options import add_ha_arguments
    from omnirt.telemetry.options import add_cli_args as add_tracing_args

    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port; 0 picks a free one (default 50061)")
    p.add_argument("--worker-id", default="worker", help="this worker's id as gateways and job records show it")
    p.add_argument("--backend", default="auto", help="auto | cuda | ascend | cpu | cpu-stub (auto resolves here)")
    p.add_argument("--max-concurrency", type=int, default=1, help="jobs run at once; more are refused (default 1)")
    p.add_argument("--pipeline-cache-size", type=int, default=4, help="pipelines kept loaded (LRU, default 4)")
    p.add_argument("--models", default="", help="comma list of model ids served here (default: every model)")
    p.add_argument("--tags", default="", help="comma list of routing tags (e.g. gpu,a100)")
    add_model_path_arg(p)
    add_adapter_dir_arg(p)
    add_engine_arguments(p)
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics and /healthz over HTTP (0 = any)")
    p.add_argument("--grpc-tls-cert", default=None, metavar="PEM", help="serve gRPC over TLS with this certificate")
    p.add_argument("--grpc-tls-key", default=None, metavar="PEM", help="the certificate's private key")
    p.add_argument("--grpc-tls-ca", default=None, metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--drain-grace-s", type=float, default=30.0, help="on SIGTERM, seconds running jobs get to finish")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="heartbeat period of a silent Run stream (default 1)")
    p.add_argument("--redis-url", default=None,
                   help="also record jobs' events and outcomes in the gateways' Redis store (same URL as serve)")
    p.add_argument("--redis-namespace", default="omnirt", help="prefix of every Redis key (as on serve)")
    add_ha_arguments(p)
    p.add_argument("--job-retention-s", type=float, default=86400.0,
                   help="how long a job this worker finishes in Redis is kept (as on serve; default 86400)")
    add_tracing_args(p)
    # serving upstream OmniRT 0.1 gateways (omnirt.workers.compat)
    p.add_argument(ALLOW_PATH_FLAG, action="append", default=[], metavar="DIR",
                   help="a folder requests may name files in (config.model_path, config.output_dir, "
                        "inputs.image as a path, as upstream OmniRT 0.1 gateways send them); repeatable")
    p.add_argument(OUTPUT_DIR_FLAG, default=None, metavar="DIR",
                   help="also write every output file of a RunSync call here and return its path (Artifact.path)")
    p.add_argument(MAX_QUEUE_FLAG, type=int, default=0, metavar="N",
                   help="RunSync calls beyond --max-concurrency wait in a queue of N (default 0: refused)")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Everything one ``omnirt worker`` process is told, checked."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    worker_id: str = "worker"
    backend: str = "auto"
    max_concurrency: int = 1
    pipeline_cache_size: int = 4
    models: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    #: model id -> absolute weights folder
    model_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    #: --adapter-dir folders (absolute): where jobs' LoRA adapters may come from; empty = refused
    adapter_dirs: tuple[str, ...] = ()
    metrics_port: int | None = None
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None
    grpc_tls_ca: str | None = None
    drain_grace_s: float = 30.0
    heartbeat_s: float = 1.0
    #: redis://, rediss:// or redis+sentinel:// (``--redis-sentinel``/``--redis-master-name`` folded in)
    redis_url: str | None = None
    redis_namespace: str = "omnirt"
    #: WAIT for this many replicas after a terminal transition this worker records
    redis_min_replicas: int = 0
    redis_wait_timeout_s: float = 1.0
    job_retention_s: float = 86400.0
    otlp_endpoint: str | None = None
    otlp_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    log_format: str = "text"
    #: folders requests may name files in (--allow-path, real paths)
    allow_paths: tuple[str, ...] = ()
    #: where RunSync outputs are also written (--output-dir), or None
    output_dir: str | None = None
    #: RunSync calls allowed to wait beyond capacity (--max-queue)
    max_queue: int = 0
    #: seconds the stop sequence gives the gRPC server to end its calls after the drain
    server_stop_grace_s: float = 5.0
    #: batching and accelerator options (--batch-window-ms, --max-batch-size, --compile...)
    engine_options: EngineOptions = dataclasses.field(default_factory=EngineOptions)

    @property
    def job_capacity(self) -> int:
        """Jobs admitted at once (a batch counts as the jobs it holds)."""
        return self.engine_options.job_capacity(self.max_concurrency)

    @property
    def grpc_address(self) -> str:
        return format_address(self.host, self.port)

    def __post_init__(self) -> None:
        from omnirt.backends import BACKEND_NAMES

        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is out of range 0..65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port} is out of range 0..65535")
        if self.max_concurrency < 1:
            raise ConfigError("--max-concurrency must be at least 1")
        if self.pipeline_cache_size < 1:
            raise ConfigError("--pipeline-cache-size must be at least 1")
        if not self.job_retention_s > 0:
            raise ConfigError("--job-retention-s must be positive")
        if self.max_queue < 0:
            raise ConfigError(f"{MAX_QUEUE_FLAG} must be 0 or more")
        if self.drain_grace_s < 0:
            raise ConfigError("--drain-grace-s must not be negative")
        if self.heartbeat_s <= 0:
            raise ConfigError("--heartbeat-s must be positive")
        if not self.worker_id.strip():
            raise ConfigError("--worker-id must not be empty")
        if self.backend not in BACKEND_NAMES:
            raise ConfigError(f"--backend {self.backend!r} is unknown (one of: {', '.join(BACKEND_NAMES)})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerConfig:
        """The checked config of parsed flags; ``ConfigError`` names the first bad value."""
        from omnirt.contract import UnknownModel
        from omnirt.registry import get_model
        from omnirt.store.redis.options import store_settings
        from omnirt.telemetry.options import cli_options

        try:
            otlp_endpoint, otlp_headers = cli_options(args)
            redis = store_settings(args)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        models = _comma_list(args.models)
        try:
            for model in models:
                get_model(model)
        except UnknownModel as exc:
            raise ConfigError(f"--models: {exc.message}") from None
        model_paths = parse_model_paths(args.model_path)
        for folder in args.allow_path or ():
            if not os.path.isdir(folder):
                raise ConfigError(f"{ALLOW_PATH_FLAG} {folder!r} is not a folder")
        if args.output_dir:
            try:
                os.makedirs(args.output_dir, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{OUTPUT_DIR_FLAG} {args.output_dir!r}: {exc.strerror}") from None
        try:
            adapter_dirs = parse_adapter_dirs(args.adapter_dir)
            options = refuse_on_cpu(engine_options(args), args.backend)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(
            host=args.host,
            port=args.port,
            worker_id=args.worker_id,
            backend=args.backend,
            max_concurrency=args.max_concurrency,
            pipeline_cache_size=args.pipeline_cache_size,
            models=models,
            tags=_comma_list(args.tags),
            model_paths=model_paths,
            adapter_dirs=adapter_dirs,
            metrics_port=args.metrics_port,
            grpc_tls_cert=args.grpc_tls_cert,
            grpc_tls_key=args.grpc_tls_key,
            grpc_tls_ca=args.grpc_tls_ca,
            drain_grace_s=args.drain_grace_s,
            heartbeat_s=args.heartbeat_s,
            redis_url=redis["url"],
            redis_namespace=args.redis_namespace, job_retention_s=args.job_retention_s,
            redis_min_replicas=redis["min_replicas"], redis_wait_timeout_s=redis["wait_timeout_s"],
            otlp_endpoint=otlp_endpoint,
            otlp_headers=otlp_headers,
            log_format=args.log_format,
            allow_paths=tuple(os.path.realpath(folder) for folder in args.allow_path or ()),
            output_dir=os.path.realpath(args.output_dir) if args.output_dir else None,
            max_queue=args.max_queue,
            engine_options=options,
        )
