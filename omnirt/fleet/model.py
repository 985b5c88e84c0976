"""The validated fleet: its workers (``WorkerDef``), where supervisord keeps its state (``Fleet``),
and ``FleetError`` (every problem, one line each)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CONF_NAME", "DOWN_STATES", "MAX_SOCKET_PATH", "PROGRAM_PREFIX", "SOCKET_NAME", "Fleet", "FleetError",
           "WorkerDef"]

PROGRAM_PREFIX = "omnirt-worker-"
CONF_NAME = "supervisord.conf"
SOCKET_NAME = "supervisor.sock"
#: sun_path is 108 bytes on Linux, including the terminating NUL
MAX_SOCKET_PATH = 107
#: supervisor process states in which the worker process is not there and will not come back by itself soon
DOWN_STATES = frozenset({"BACKOFF", "FATAL", "EXITED", "STOPPED", "UNKNOWN"})


class FleetError(Exception):
    """A fleet file (or the fleet's state) has problems; ``problems`` lists every one, one line each."""

    def __init__(self, problems: Iterable[str], source: Path | str | None = None):
        self.problems = list(problems)
        self.source = str(source) if source is not None else None
        super().__init__("; ".join(self.problems))

    def lines(self) -> list[str]:
        prefix = f"{self.source}: " if self.source else ""
        return [f"{prefix}{p}" for p in self.problems]


@dataclasses.dataclass(frozen=True)
class WorkerDef:
    """One ``omnirt worker`` process of the fleet (after ``count`` expansion and defaults)."""

    id: str
    port: int
    user: str
    host: str = "127.0.0.1"
    backend: str = "auto"
    models: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    model_path: dict[str, str] = dataclasses.field(default_factory=dict)
    max_concurrency: int = 1
    pipeline_cache_size: int = 4
    drain_grace_s: float = 30.0
    metrics_port: int | None = None
    args: tuple[str, ...] = ()

    @property
    def program(self) -> str:
        return PROGRAM_PREFIX + self.id

    @property
    def connect_host(self) -> str:
        """Where the gateway on this host reaches the worker (a wildcard bind is reached on loopback)."""
        if self.host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host

    @property
    def address(self) -> str:
        host = self.connect_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def argv(self, python: str) -> list[str]:
        argv = [python, "-m", "omnirt", "worker", "--host", self.host, "--port", str(self.port),
                "--worker-id", self.id, "--backend", self.backend,
                "--max-concurrency", str(self.max_concurrency),
                "--pipeline-cache-size", str(self.pipeline_cache_size),
                "--drain-grace-s", f"{self.drain_grace_s:g}"]
        if self.models:
            argv += ["--models", ",".join(self.models)]
        if self.tags:
            argv += ["--tags", ",".join(self.tags)]
        for model, folder in self.model_path.items():
            argv += ["--model-path", f"{model}={folder}"]
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port)]
        return argv + list(self.args)


@dataclasses.dataclass
class Fleet:
    """A validated fleet: its workers and where supervisord keeps its state."""

    dir: Path
    workers: list[WorkerDef]
    socket: Path
    source: Path | None = None
    socket_owner: str | None = None
    logfile_maxbytes: str = "50MB"
    logfile_backups: int = 5
    startsecs: int = 2
    startretries: int = 3
    stop_margin_s: int = 10

    @property
    def conf_path(self) -> Path:
        return self.dir / CONF_NAME

    @property
    def pidfile(self) -> Path:
        return self.dir / "supervisord.pid"

    @property
    def logfile(self) -> Path:
        return self.dir / "supervisord.log"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def identifier(self) -> str:
        """supervisord's ``identifier``: tells our supervisord from another one on the same socket."""
        return f"omnirt-fleet:{self.conf_path}"

    def worker_log(self, worker: WorkerDef) -> Path:
        return self.log_dir / f"{worker.program}.log"

    def stopwaitsecs(self, worker: WorkerDef) -> int:
        """Seconds supervisord waits after TERM before KILL: the drain grace plus the worker's own stop."""
        return int(math.ceil(worker.drain_grace_s)) + self.stop_margin_s

    def worker(self, worker_id: str) -> WorkerDef:
        for w in self.workers:
            if w.id == worker_id:
                return w
        raise KeyError(worker_id)

    def by_program(self) -> dict[str, WorkerDef]:
        return {w.program: w for w in self.workers}
