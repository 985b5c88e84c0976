"""Local worker fleets: a TOML fleet file -> a supervisord config, and supervisord control over XML-RPC.

A fleet file lists the ``omnirt worker`` processes of one host (see ``fleet/*.toml``)::

    [supervisord]
    dir = "/var/lib/omnirt/fleet"     # socket, pidfile, logs and the rendered conf live here
    [defaults]                        # any worker key but id/port/count/metrics_port
    backend = "cuda"
    [[worker]]
    id = "sdxl-{n}"                   # with count: one worker per device, n = 0..count-1
    count = 2                         # port/metrics_port are bases (+n); CUDA_VISIBLE_DEVICES=n
    port = 50061
    model_path = { "sdxl-base-1.0" = "/models/sdxl-base" }

Relative paths (``dir``, ``socket``, ``model_path`` values) are resolved against the folder of the
fleet file, never the current directory, so a fleet file means the same wherever it is used from.
``env`` and ``model_path`` tables merge key-wise over ``[defaults]``.

Transport: supervisord listens on a unix socket only (``[unix_http_server]``, chmod 0700, optional
``socket_owner`` -> chown): no TCP port and no credentials, file permissions are the access
control. The ``omnirt fleet`` CLI talks to it with blocking ``xmlrpc.client`` (``SupervisorControl``);
the gateway uses ``AsyncSupervisorClient`` (a Twisted ``Agent`` over a UNIX endpoint, payloads
encoded by ``xmlrpc.client.dumps``/``loads``), so the reactor never blocks. The few blocking steps
at gateway startup (writing the conf, spawning supervisord) run on the reactor's thread pool.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import math
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import xmlrpc.client
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer  # interfaces only: no reactor is imported
from zope.interface import implementer

__all__ = [
    "AsyncSupervisorClient",
    "Fleet",
    "FleetError",
    "FleetWatcher",
    "GatewayFleet",
    "SupervisorControl",
    "WorkerDef",
    "load_fleet",
    "parse_fleet",
    "render_conf",
]

PROGRAM_PREFIX = "omnirt-worker-"
CONF_NAME = "supervisord.conf"
SOCKET_NAME = "supervisor.sock"
#: sun_path is 108 bytes on Linux, including the terminating NUL
MAX_SOCKET_PATH = 107
#: supervisor process states in which the worker process is not there and will not come back by itself soon
DOWN_STATES = frozenset({"BACKOFF", "FATAL", "EXITED", "STOPPED", "UNKNOWN"})

TOP_KEYS = frozenset({"supervisord", "defaults", "worker"})
SUPERVISORD_KEYS = frozenset({
    "dir", "socket", "socket_owner", "logfile_maxbytes", "logfile_backups", "startsecs", "startretries",
    "stop_margin_s",
})
WORKER_KEYS = frozenset({
    "id", "port", "count", "host", "backend", "models", "tags", "env", "model_path", "max_concurrency",
    "pipeline_cache_size", "drain_grace_s", "metrics_port", "user", "args",
})
DEFAULTS_KEYS = WORKER_KEYS - {"id", "port", "count", "metrics_port"}

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIZE = re.compile(r"^[0-9]+(KB|MB|GB)?$")


class FleetError(Exception):
    """A fleet file (or the fleet's state) has problems; ``problems`` lists every one, one line each."""

    def __init__(self, problems: Iterable[str], source: Path | str | None = None):
        self.problems = list(problems)
        self.source = str(source) if source is not None else None
        super().__init__("; ".join(self.problems))

    def lines(self) -> list[str]:
        prefix = f"{self.source}: " if self.source else ""
        return [f"{prefix}{p}" for p in self.problems]


# -- the model ----------------------------------------------------------------------------------


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


# -- parsing and validation (every problem at once) ---------------------------------------------


def invoking_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _user_exists(name: str) -> bool:
    try:
        if name.isdigit():
            pwd.getpwuid(int(name))
        else:
            pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def default_state_dir(source: Path | None) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    name = source.stem if source is not None else "fleet"
    return Path(base) / "omnirt" / "fleet" / name


class _Problems:
    def __init__(self):
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}" if where else what)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _typename(v: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _check_value(key: str, value: Any, where: str, problems: _Problems) -> bool:
    """Type/range check of one worker (or defaults) key; False (and a problem) when it is wrong."""
    def bad(expected: str) -> bool:
        problems.add(where, f"{key} must be {expected} (got {_typename(value)} {value!r})")
        return False

    if key in ("id", "host", "backend", "user"):
        if not isinstance(value, str):
            return bad("a string")
        return True
    if key in ("port", "metrics_port"):
        if not _is_int(value):
            return bad("an integer")
        if not 1 <= value <= 65535:
            problems.add(where, f"{key} {value} is out of range 1..65535")
            return False
        return True
    if key in ("count", "max_concurrency", "pipeline_cache_size"):
        if not _is_int(value):
            return bad("an integer")
        if value < 1:
            problems.add(where, f"{key} must be at least 1 (got {value})")
            return False
        return True
    if key == "drain_grace_s":
        if not _is_num(value):
            return bad("a number of seconds")
        if value < 0:
            problems.add(where, f"drain_grace_s must not be negative (got {value})")
            return False
        return True
    if key in ("models", "tags", "args"):
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            return bad("a list of strings")
        return True
    if key in ("env", "model_path"):
        if not isinstance(value, dict):
            return bad("a table")
        ok = True
        for k, v in value.items():
            if key == "env":
                if not _ENV_KEY.match(k):
                    problems.add(where, f"env name {k!r} is not a valid environment variable name")
                    ok = False
                if not (isinstance(v, str) or _is_int(v)):
                    problems.add(where, f"env {k} must be a string (got {_typename(v)} {v!r})")
                    ok = False
                elif isinstance(v, str) and ("\n" in v or ('"' in v and "'" in v) or v[:1] in "'\"" and v
                                             or v[-1:] in "'\"" and v):
                    # supervisord's environment= grammar cannot carry these (it strips quotes at both ends)
                    problems.add(where, f"env {k} may not contain a newline or both kinds of quote, nor start "
                                        "or end with a quote")
                    ok = False
            elif not isinstance(v, str) or not v:
                problems.add(where, f"model_path {k!r} must be a folder path string (got {_typename(v)} {v!r})")
                ok = False
        return ok
    return True


def _expand(text: str, n: int | None) -> str:
    return text if n is None else text.replace("{n}", str(n))


def parse_fleet(
    data: dict[str, Any],
    *,
    source: Path | None = None,
    state_dir: Path | str | None = None,
    is_dir: Callable[[Path], bool] = Path.is_dir,
    user_exists: Callable[[str], bool] = _user_exists,
    default_user: str | None = None,
) -> Fleet:
    """Validate a parsed fleet file; raise ``FleetError`` listing every problem found.

    ``state_dir`` overrides ``[supervisord] dir``. Relative paths resolve against the fleet
    file's folder (the current directory when there is no ``source``).
    """
    fleet, problems = _parse(data, source=source, state_dir=state_dir, is_dir=is_dir, user_exists=user_exists,
                             default_user=default_user)
    if problems:
        raise FleetError(problems, source)
    return fleet


def _parse(data, *, source, state_dir, is_dir, user_exists, default_user) -> tuple[Fleet, list[str]]:
    """The fleet made of the entries that are valid, and every problem found."""
    from omnirt.backends import BACKEND_NAMES
    from omnirt.registry import MODELS

    problems = _Problems()
    base = source.resolve().parent if source is not None else Path.cwd()
    default_user = default_user or invoking_user()

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (base / path)

    for key in sorted(set(data) - TOP_KEYS):
        problems.add("", f"unknown top-level key {key!r} (known: {', '.join(sorted(TOP_KEYS))})")

    sup = data.get("supervisord", {})
    if not isinstance(sup, dict):
        problems.add("", "[supervisord] must be a table")
        sup = {}
    for key in sorted(set(sup) - SUPERVISORD_KEYS):
        problems.add("[supervisord]", f"unknown key {key!r} (known: {', '.join(sorted(SUPERVISORD_KEYS))})")
    fleet_kw: dict[str, Any] = {}
    for key in ("dir", "socket", "socket_owner"):
        if key in sup and (not isinstance(sup[key], str) or not sup[key]):
            problems.add("[supervisord]", f"{key} must be a non-empty string (got {_typename(sup[key])} {sup[key]!r})")
    if state_dir is not None:
        fleet_dir = Path(state_dir).expanduser().absolute()
    elif isinstance(sup.get("dir"), str) and sup["dir"]:
        fleet_dir = resolve(sup["dir"]).absolute()
    else:
        fleet_dir = default_state_dir(source)
    fleet_dir = Path(os.path.normpath(fleet_dir))
    sock = resolve(sup["socket"]) if isinstance(sup.get("socket"), str) and sup["socket"] else fleet_dir / SOCKET_NAME
    sock = Path(os.path.normpath(sock.absolute()))
    if len(str(sock).encode()) > MAX_SOCKET_PATH:
        problems.add("[supervisord]", f"socket path {str(sock)!r} is {len(str(sock).encode())} bytes, over the unix "
                                      f"socket limit of {MAX_SOCKET_PATH}: set a shorter dir or [supervisord] socket")
    owner = sup.get("socket_owner")
    if isinstance(owner, str) and owner:
        if not user_exists(owner.partition(":")[0]):
            problems.add("[supervisord]", f"socket_owner: unknown user {owner.partition(':')[0]!r}")
        fleet_kw["socket_owner"] = owner
    if "logfile_maxbytes" in sup:
        v = sup["logfile_maxbytes"]
        if _is_int(v) and v >= 0:
            fleet_kw["logfile_maxbytes"] = str(v)
        elif isinstance(v, str) and _SIZE.match(v):
            fleet_kw["logfile_maxbytes"] = v
        else:
            problems.add("[supervisord]", f"logfile_maxbytes must be bytes or a size like \"50MB\" (got {v!r})")
    for key, least in (("logfile_backups", 0), ("startsecs", 0), ("startretries", 0), ("stop_margin_s", 1)):
        if key in sup:
            v = sup[key]
            if not _is_int(v) or v < least:
                problems.add("[supervisord]", f"{key} must be an integer >= {least} (got {v!r})")
            else:
                fleet_kw[key] = v

    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.add("", "[defaults] must be a table")
        defaults = {}
    good_defaults: dict[str, Any] = {}
    for key, value in defaults.items():
        if key not in DEFAULTS_KEYS:
            problems.add("[defaults]", f"unknown key {key!r} (known: {', '.join(sorted(DEFAULTS_KEYS))})")
        elif _check_value(key, value, "[defaults]", problems):
            good_defaults[key] = value

    raw_workers = data.get("worker", [])
    if not isinstance(raw_workers, list) or not all(isinstance(w, dict) for w in raw_workers):
        problems.add("", "worker must be an array of tables ([[worker]])")
        raw_workers = []
    if not raw_workers:
        problems.add("", "no [[worker]] entries")

    workers: list[WorkerDef] = []
    checked_paths: set[tuple[str, Path]] = set()
    for index, raw in enumerate(raw_workers, start=1):
        label = raw.get("id") if isinstance(raw.get("id"), str) else None
        where = f"worker #{index}" + (f" ({label})" if label else "")
        ok = True
        for key in sorted(set(raw) - WORKER_KEYS):
            problems.add(where, f"unknown key {key!r} (known: {', '.join(sorted(WORKER_KEYS))})")
            ok = False
        good: dict[str, Any] = {}
        for key, value in raw.items():
            if key in WORKER_KEYS:
                if _check_value(key, value, where, problems):
                    good[key] = value
                else:
                    ok = False
        for key in ("id", "port"):
            if key not in raw:
                problems.add(where, f"missing required key {key!r}")
                ok = False
        # the checks below still run on the keys that are fine: every problem at once
        merged = {**good_defaults, **good}
        merged["env"] = {**good_defaults.get("env", {}), **good.get("env", {})}
        merged["model_path"] = {**good_defaults.get("model_path", {}), **good.get("model_path", {})}
        backend = merged.get("backend", "auto")
        if backend not in BACKEND_NAMES:
            problems.add(where, f"unknown backend {backend!r} (one of: {', '.join(BACKEND_NAMES)})")
            ok = False
        for model in merged.get("models", []):
            if model not in MODELS:
                problems.add(where, f"unknown model {model!r} in models (known: {', '.join(sorted(MODELS))})")
                ok = False
        for model in merged["model_path"]:
            if model not in MODELS:
                problems.add(where, f"model_path names unknown model {model!r} (known: {', '.join(sorted(MODELS))})")
                ok = False
        user = merged.get("user") or default_user
        if not user_exists(user):
            problems.add(where, f"unknown user {user!r}")
            ok = False
        for model, folder in merged["model_path"].items():
            if "{n}" not in folder:  # per-device folders are checked after expansion
                path = Path(os.path.normpath(resolve(folder).absolute()))
                checked_paths.add((model, path))
                if not is_dir(path):
                    problems.add(where, f"model_path for {model}: {path} is not a directory")
        count = merged.get("count")
        template = merged.get("id")
        if template is not None and count is None and "{n}" in template:
            problems.add(where, "id contains {n} but count is not set")
            ok = False
        if template is not None and count is not None and count > 1 and "{n}" not in template:
            problems.add(where, f"id {template!r} must contain {{n}} when count > 1")
            ok = False
        if not ok or template is None or "port" not in merged:
            continue
        for n in ([None] if count is None else range(count)):
            wid = _expand(template, n)
            wwhere = where if n is None else f"{where} n={n}"
            if not _ID.match(wid):
                problems.add(wwhere, f"worker id {wid!r} must be letters, digits, '_', '.', '-' (starting with a "
                                     "letter or digit)")
                continue
            port = merged["port"] + (n or 0)
            metrics_port = merged.get("metrics_port")
            if metrics_port is not None:
                metrics_port += n or 0
            if port > 65535 or (metrics_port is not None and metrics_port > 65535):
                problems.add(wwhere, f"port {port} (or metrics_port) is out of range after count expansion")
                continue
            env = {k: _expand(str(v), n) for k, v in merged["env"].items()}
            if n is not None:
                if backend in ("cuda", "auto"):
                    env.setdefault("CUDA_VISIBLE_DEVICES", str(n))
                if backend in ("ascend", "auto"):
                    env.setdefault("ASCEND_RT_VISIBLE_DEVICES", str(n))
            model_path: dict[str, str] = {}
            for model, folder in merged["model_path"].items():
                path = Path(os.path.normpath(resolve(_expand(folder, n)).absolute()))
                if (model, path) not in checked_paths:
                    checked_paths.add((model, path))
                    if not is_dir(path):
                        problems.add(where, f"model_path for {model}: {path} is not a directory")
                model_path[model] = str(path)
            workers.append(WorkerDef(
                id=wid,
                port=port,
                user=user,
                host=merged.get("host", "127.0.0.1"),
                backend=backend,
                models=tuple(dict.fromkeys(merged.get("models", []))),
                tags=tuple(dict.fromkeys(_expand(t, n) for t in merged.get("tags", []))),
                env=env,
                model_path=model_path,
                max_concurrency=merged.get("max_concurrency", 1),
                pipeline_cache_size=merged.get("pipeline_cache_size", 4),
                drain_grace_s=float(merged.get("drain_grace_s", 30.0)),
                metrics_port=metrics_port,
                args=tuple(_expand(a, n) for a in merged.get("args", [])),
            ))

    seen_ids: dict[str, int] = {}
    seen_ports: dict[int, str] = {}
    for w in workers:
        seen_ids[w.id] = seen_ids.get(w.id, 0) + 1
        for kind, port in (("port", w.port), ("metrics_port", w.metrics_port)):
            if port is None:
                continue
            if port in seen_ports:
                problems.add(f"worker {w.id}", f"{kind} {port} is also used by {seen_ports[port]}")
            else:
                seen_ports[port] = f"worker {w.id}" + (" (metrics)" if kind == "metrics_port" else "")
    for wid, n in seen_ids.items():
        if n > 1:
            problems.add("", f"duplicate worker id {wid!r} ({n} workers)")
    fleet = Fleet(dir=fleet_dir, workers=workers, socket=sock, source=source.resolve() if source else None,
                  **fleet_kw)
    return fleet, problems.items


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now (None when it can)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host or "0.0.0.0").version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT does not count (grpc sets it too)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                return f"port {port} is already in use on {host}"
            return f"cannot bind {host}:{port}: {exc.strerror or exc}"
    return None


def port_problems(fleet: Fleet, check: Callable[[str, int], str | None] = port_problem,
                  skip: Iterable[int] = ()) -> list[str]:
    problems = []
    skipped = set(skip)
    seen: set[int] = set()
    for w in fleet.workers:
        for kind, port in (("port", w.port), ("metrics_port", w.metrics_port)):
            if port is not None and port not in skipped and port not in seen:
                seen.add(port)
                why = check(w.host, port)
                if why:
                    problems.append(f"worker {w.id}: {kind}: {why}")
    return problems


def load_fleet(path: str | Path, *, state_dir: str | Path | None = None, strict: bool = True) -> Fleet:
    """Read and validate a fleet file; ``FleetError`` lists every problem.

    ``strict`` also checks the host: model folders exist and ports are free (unless this fleet's
    supervisord already runs: then its own workers hold them). Lenient loading (for down, status,
    logs) checks only the file itself.
    """
    source = Path(path)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FleetError([f"cannot read the fleet file: {exc.strerror or exc}"], source) from None
    except UnicodeDecodeError as exc:
        raise FleetError([f"not UTF-8 text: {exc}"], source) from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetError([f"not valid TOML: {exc}"], source) from None
    if not isinstance(data, dict):
        raise FleetError(["not a TOML table"], source)
    fleet, problems = _parse(data, source=source, state_dir=state_dir,
                             is_dir=Path.is_dir if strict else (lambda _p: True),
                             user_exists=_user_exists, default_user=None)
    if strict and fleet.workers and not _owner_running(fleet):
        # the valid entries' ports are checked even when other entries have problems (every problem at once)
        problems.extend(port_problems(fleet, skip=_reported_ports(problems)))
    if problems:
        raise FleetError(problems, source)
    return fleet


def _reported_ports(problems: list[str]) -> set[int]:
    return {int(m) for p in problems for m in re.findall(r"port (\d+) is also used", p)}


def _owner_running(fleet: Fleet) -> bool:
    try:
        return SupervisorControl(fleet, timeout=2.0).running()
    except FleetError:
        return True  # something else answers there: the port check would only add noise


# -- rendering ----------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    """A supervisord config value: supervisor expands %(name)s in values, so '%' is written '%%'."""
    return str(value).replace("%", "%%")


def _env_value(value: str) -> str:
    quote = "'" if '"' in value else '"'
    return f"{quote}{value}{quote}"


def _needs_pythonpath() -> str | None:
    """The folder holding the omnirt package when it is not installed (run from a source tree)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        distribution("omnirt")
        return None
    except PackageNotFoundError:
        return str(Path(__file__).resolve().parent.parent)


def render_conf(fleet: Fleet, python: str | None = None) -> str:
    """The complete supervisord.conf for ``fleet`` (deterministic: same fleet, same text)."""
    python = python or sys.executable
    d = fleet.dir
    src = f" from {fleet.source}" if fleet.source else ""
    lines = [
        f"; rendered by `omnirt fleet render`{src}; edit the fleet file, not this file,",
        "; then `omnirt fleet up FILE` (or restart omnirt-fleet.service) applies the change.",
        f"; operators: supervisorctl -c {_esc(fleet.conf_path)} status",
        "",
        "[unix_http_server]",
        f"file={_esc(fleet.socket)}",
        "chmod=0700",
    ]
    if fleet.socket_owner:
        lines.append(f"chown={_esc(fleet.socket_owner)}")
    lines += [
        "",
        "[supervisord]",
        f"logfile={_esc(fleet.logfile)}",
        f"logfile_maxbytes={fleet.logfile_maxbytes}",
        f"logfile_backups={fleet.logfile_backups}",
        "loglevel=info",
        f"pidfile={_esc(fleet.pidfile)}",
        "nodaemon=false",
        f"directory={_esc(d)}",
        f"childlogdir={_esc(fleet.log_dir)}",
        f"identifier={_esc(fleet.identifier)}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_esc(fleet.socket)}",
    ]
    pythonpath = _needs_pythonpath()
    for w in fleet.workers:
        env = {"PYTHONUNBUFFERED": "1", "OMNIRT_FLEET_WORKER": w.id}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        env.update(w.env)
        lines += [
            "",
            f"[program:{w.program}]",
            f"command={_esc(shlex.join(w.argv(python)))}",
            f"directory={_esc(d)}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={fleet.startsecs}",
            f"startretries={fleet.startretries}",
            "stopsignal=TERM",
            f"stopwaitsecs={fleet.stopwaitsecs(w)}",
            "stopasgroup=true",
            "killasgroup=true",
            f"user={_esc(w.user)}",
            "redirect_stderr=true",
            f"stdout_logfile={_esc(fleet.worker_log(w))}",
            f"stdout_logfile_maxbytes={fleet.logfile_maxbytes}",
            f"stdout_logfile_backups={fleet.logfile_backups}",
            "environment=" + ",".join(f"{k}={_esc(_env_value(v))}" for k, v in env.items()),
        ]
    return "\n".join(lines) + "\n"


def write_conf(fleet: Fleet, python: str | None = None) -> bool:
    """Write the rendered conf (atomically, only when it changed); True when the file changed."""
    text = render_conf(fleet, python)
    fleet.dir.mkdir(parents=True, exist_ok=True)
    fleet.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        if fleet.conf_path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    tmp = fleet.conf_path.with_name(f".{CONF_NAME}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, fleet.conf_path)
    return True


# -- processes ----------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a live process (a zombie nobody reaped counts as gone)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def read_pidfile(fleet: Fleet) -> int | None:
    try:
        return int(fleet.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def describe_state(info: dict[str, Any]) -> str:
    """One line of supervisor's view of a process, e.g. ``BACKOFF: Exited too quickly ...``."""
    state = info.get("statename", "UNKNOWN")
    detail = info.get("spawnerr") or ""
    if state == "EXITED" and not detail:
        detail = f"exit status {info.get('exitstatus')}"
    elif state in ("RUNNING", "STOPPED", "STARTING", "STOPPING") and not detail:
        detail = info.get("description") or ""
    return f"{state}: {detail}" if detail else state


# -- blocking control (the CLI; the gateway only from its thread pool) -------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float):
        super().__init__()
        self._path = path
        self._timeout = timeout

    def make_connection(self, host):
        return _UnixHTTPConnection(self._path, self._timeout)


class SupervisorControl:
    """Blocking supervisord control for one fleet (xmlrpc.client over its unix socket)."""

    def __init__(self, fleet: Fleet, *, timeout: float = 10.0, python: str | None = None,
                 out: Callable[[str], None] | None = None):
        self.fleet = fleet
        self.timeout = timeout
        self.python = python or sys.executable
        self.out = out or (lambda _line: None)

    def rpc(self, timeout: float | None = None) -> Any:
        transport = _UnixTransport(str(self.fleet.socket), timeout or self.timeout)
        return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=transport, allow_none=True)

    # -- finding supervisord --------------------------------------------------------------------

    def identification(self) -> str | None:
        """The identifier of the supervisord on the fleet's socket; None when nothing answers."""
        if not self.fleet.socket.exists():
            return None
        try:
            return self.rpc(self.timeout).supervisor.getIdentification()
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except (OSError, xmlrpc.client.Error, http.client.HTTPException) as exc:
            raise FleetError([f"supervisord socket {self.fleet.socket} does not answer: {exc}"],
                             self.fleet.source) from None

    def running(self) -> bool:
        """Is this fleet's supervisord up? A different supervisord on the socket is an error."""
        ident = self.identification()
        if ident is None:
            return False
        if ident != self.fleet.identifier:
            raise FleetError([f"the supervisord on {self.fleet.socket} is not this fleet's "
                              f"(identifier {ident!r}, expected {self.fleet.identifier!r})"], self.fleet.source)
        return True

    def supervisord_pid(self) -> int | None:
        try:
            return int(self.rpc().supervisor.getPID())
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            return read_pidfile(self.fleet)

    # -- starting ---------------------------------------------------------------------------------

    def ensure_started(self, *, update: bool = True, start_stopped: bool = False) -> str:
        """Render the conf; adopt a running supervisord (applying fleet file changes) or start one.

        ``start_stopped``: also start adopted programs that are STOPPED/EXITED/FATAL (``fleet up``
        does; the gateway takes the fleet as it finds it). Returns "started" or "adopted"; does not
        wait for the workers.
        """
        try:
            changed = write_conf(self.fleet, self.python)
        except PermissionError as exc:
            if not self.running():
                raise FleetError([f"cannot write {self.fleet.conf_path}: {exc.strerror}"], self.fleet.source) from None
            self.out(f"fleet: cannot rewrite {self.fleet.conf_path} ({exc.strerror}); using the running supervisord "
                     "as it is")
            return "adopted"
        if self.running():
            if changed and update:
                for line in self.apply_update():
                    self.out(f"fleet: {line}")
            if start_stopped:
                self.start_stopped()
            return "adopted"
        self.start_daemon()
        return "started"

    def start_daemon(self, wait_s: float = 15.0) -> None:
        """Spawn supervisord for the rendered conf (it daemonizes) and wait until its socket answers."""
        pid = read_pidfile(self.fleet)
        if pid is not None and pid_alive(pid) and not self.fleet.socket.exists():
            raise FleetError([f"supervisord pid {pid} from {self.fleet.pidfile} is alive but its socket "
                              f"{self.fleet.socket} is gone: stop it first"], self.fleet.source)
        argv = [self.python, "-m", "supervisor.supervisord", "-c", str(self.fleet.conf_path)]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise FleetError(["supervisord did not daemonize within 30 s"], self.fleet.source) from None
        if proc.returncode != 0:
            text = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
            raise FleetError([f"supervisord failed to start (exit {proc.returncode}): "
                              f"{text[-1] if text else 'no output'}"], self.fleet.source)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.running():
                return
            time.sleep(0.05)
        raise FleetError([f"supervisord started but {self.fleet.socket} did not answer within {wait_s:g}s "
                          f"(see {self.fleet.logfile})"], self.fleet.source)

    def apply_update(self) -> list[str]:
        """``supervisorctl update``: reread the conf, add/replace/remove programs that changed."""
        rpc = self.rpc(self.stop_timeout())
        (added, changed, removed), = rpc.supervisor.reloadConfig()
        done = []
        for name in removed + changed:
            try:
                rpc.supervisor.stopProcessGroup(name, True)
            except xmlrpc.client.Fault:
                pass
            rpc.supervisor.removeProcessGroup(name)
            if name in removed:
                done.append(f"removed {name}")
        for name in changed + added:
            rpc.supervisor.addProcessGroup(name)
            done.append(f"{'updated' if name in changed else 'added'} {name}")
        return done

    def start_stopped(self) -> None:
        """Start fleet programs that are stopped/exited/fatal (an adopted fleet should be whole)."""
        rpc = self.rpc()
        for wid, info in self.infos().items():
            if info["statename"] in ("STOPPED", "EXITED", "FATAL"):
                try:
                    rpc.supervisor.startProcess(self.fleet.worker(wid).program, False)
                except xmlrpc.client.Fault as exc:
                    self.out(f"fleet: cannot start {wid}: {exc.faultString}")

    def stop_timeout(self) -> float:
        """How long stopping the whole fleet may take: the longest stopwaitsecs plus a margin."""
        return max((self.fleet.stopwaitsecs(w) for w in self.fleet.workers), default=30) + 15.0

    # -- looking ----------------------------------------------------------------------------------

    def infos(self) -> dict[str, dict[str, Any]]:
        """worker id -> supervisor's process info, for this fleet's programs that supervisord knows."""
        programs = self.fleet.by_program()
        result = {}
        for info in self.rpc().supervisor.getAllProcessInfo():
            worker = programs.get(info["name"])
            if worker is not None:
                result[worker.id] = info
        return result

    def wait_running(self, ids: Iterable[str] | None = None, timeout: float = 60.0) -> dict[str, dict]:
        """Wait until every worker is RUNNING; FleetError at once for FATAL, or at the deadline."""
        wanted = list(ids) if ids is not None else [w.id for w in self.fleet.workers]
        deadline = time.monotonic() + timeout
        while True:
            infos = self.infos()
            missing = [wid for wid in wanted if wid not in infos]
            if missing:
                raise FleetError([f"supervisord has no program for worker {wid} (stale conf?)" for wid in missing],
                                 self.fleet.source)
            fatal = [wid for wid in wanted if infos[wid]["statename"] == "FATAL"]
            if fatal:
                raise FleetError([f"worker {wid} is {describe_state(infos[wid])}; last log lines: "
                                  f"{' | '.join(self.tail(wid, 3))}" for wid in fatal], self.fleet.source)
            if all(infos[wid]["statename"] == "RUNNING" for wid in wanted):
                return infos
            if time.monotonic() >= deadline:
                late = [f"worker {wid} is {describe_state(infos[wid])} after {timeout:g}s"
                        for wid in wanted if infos[wid]["statename"] != "RUNNING"]
                raise FleetError(late, self.fleet.source)
            time.sleep(0.2)

    def tail(self, worker_id: str, lines: int = 50) -> list[str]:
        return tail_file(self.fleet.worker_log(self.fleet.worker(worker_id)), lines)

    # -- changing ---------------------------------------------------------------------------------

    def restart(self, worker_id: str, *, health_timeout: float = 60.0) -> dict[str, Any]:
        """TERM -> the worker drains (supervisord waits up to stopwaitsecs) -> start -> wait until ready."""
        worker = self.fleet.worker(worker_id)
        rpc = self.rpc(self.fleet.stopwaitsecs(worker) + self.fleet.startsecs + 15.0)
        info = rpc.supervisor.getProcessInfo(worker.program)
        if info["statename"] in ("RUNNING", "STARTING", "BACKOFF"):
            rpc.supervisor.stopProcess(worker.program, True)
        try:
            rpc.supervisor.startProcess(worker.program, True)
        except xmlrpc.client.Fault as exc:
            raise FleetError([f"worker {worker_id} did not start again: {exc.faultString}; last log lines: "
                              f"{' | '.join(self.tail(worker_id, 3))}"], self.fleet.source) from None
        deadline = time.monotonic() + health_timeout
        last = ""
        while time.monotonic() < deadline:
            health, error = probe_health(worker.address, 1.0)
            if health is not None and health.ok and health.state == "ready":
                return rpc.supervisor.getProcessInfo(worker.program)
            last = error or (health.state if health else "")
            time.sleep(0.1)
        raise FleetError([f"worker {worker_id} restarted but is not ready after {health_timeout:g}s ({last})"],
                         self.fleet.source)

    def shutdown(self, timeout: float | None = None) -> list[int]:
        """Stop every program (each drains) and supervisord; wait until no process is left.

        Returns the pids that were stopped. Processes still alive at the deadline are killed.
        """
        timeout = timeout if timeout is not None else self.stop_timeout()
        pids = [self.supervisord_pid() or 0]
        try:
            pids += [info["pid"] for info in self.infos().values() if info.get("pid")]
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            pass
        pids = [p for p in pids if p > 0]
        try:
            self.rpc().supervisor.shutdown()
        except (OSError, xmlrpc.client.Error, http.client.HTTPException) as exc:
            self.out(f"fleet: supervisord shutdown call failed ({exc}); stopping its processes by signal")
            for pid in pids:
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.1)
        left = [p for p in pids if pid_alive(p)]
        for pid in left:
            self.out(f"fleet: pid {pid} still alive after {timeout:g}s: SIGKILL")
            _signal(pid, signal.SIGKILL)
        return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def tail_file(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a (possibly large) log file, reading at most ~1 MB."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max(64 * 1024, lines * 400)) if lines < 2500 else max(0, size - 1024 * 1024))
            data = f.read()
    except OSError:
        return []
    text = data.decode(errors="replace").splitlines()
    return text[-lines:] if lines > 0 else []


def probe_health(address: str, timeout: float = 1.0):
    """One blocking gRPC Health call: (WorkerHealth, "") or (None, why)."""
    import grpc

    from omnirt.workers import wire
    from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
    from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = pb_grpc.WorkerStub(channel).Health(pb.HealthRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return None, (code.name.lower() if code else "error")
    return wire.health_from_pb(reply), ""


# -- the gateway's side (Twisted, never blocking) -----------------------------------------------


class AsyncSupervisorClient:
    """supervisord XML-RPC from Twisted: ``Agent`` over a UNIX endpoint, xmlrpc.client for the payload."""

    def __init__(self, reactor, socket_path: str | Path, *, timeout: float = 10.0):
        from twisted.web.client import Agent, HTTPConnectionPool

        self.reactor = reactor
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._agent = Agent.usingEndpointFactory(reactor, _UnixEndpointFactory(reactor, self.socket_path),
                                                 pool=self._pool)

    def call(self, method: str, *params: Any, timeout: float | None = None):
        """A Deferred firing with the result; ``xmlrpc.client.Fault`` for a supervisor fault."""
        from twisted.internet.defer import Deferred

        d = Deferred.fromCoroutine(self._call(method, params))
        d.addTimeout(timeout or self.timeout, self.reactor)
        return d

    async def _call(self, method: str, params: tuple) -> Any:
        from twisted.web.client import readBody
        from twisted.web.http_headers import Headers

        body = xmlrpc.client.dumps(params, method, allow_none=True).encode()
        response = await self._agent.request(
            b"POST", b"http://localhost/RPC2", Headers({b"Content-Type": [b"text/xml"]}), _BytesProducer(body)
        )
        data = await readBody(response)
        if response.code != 200:
            raise OSError(f"supervisord answered HTTP {response.code}")
        (result,), _ = xmlrpc.client.loads(data)
        return result

    def close(self):
        return self._pool.closeCachedConnections()


@implementer(IAgentEndpointFactory)
class _UnixEndpointFactory:
    def __init__(self, reactor, path: str):
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri):  # noqa: N802 - Twisted interface
        from twisted.internet.endpoints import UNIXClientEndpoint

        return UNIXClientEndpoint(self._reactor, self._path, timeout=5)


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):  # noqa: N802 - Twisted interface
        from twisted.internet.defer import succeed

        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self):  # noqa: N802
        pass

    def resumeProducing(self):  # noqa: N802
        pass

    def stopProducing(self):  # noqa: N802
        pass



class FleetWatcher:
    """Polls supervisord (every ``interval_s``) and tells the worker pool what it sees.

    Not RUNNING -> ``WorkerEntry.external_reason`` says supervisor's state and reason (shown in
    /readyz); BACKOFF/FATAL/EXITED/STOPPED (or a new pid: the process was restarted) -> the worker
    is taken out of rotation at once (``mark_failed``) until its own health probe succeeds again,
    so ``omnirt_worker_up`` drops to 0 without waiting for failed probes.
    """

    def __init__(self, clock, client, pool, fleet: Fleet, *, interval_s: float = 2.0):
        self.clock = clock
        self.client = client
        self.pool = pool
        self.fleet = fleet
        self.interval_s = interval_s
        #: worker id -> last info seen (statename, pid, description, ...)
        self.infos: dict[str, dict[str, Any]] = {}
        self.error = ""
        self.polls = 0
        self._loop = None
        self._polling = False

    def start(self):
        from twisted.internet.task import LoopingCall
        from twisted.python import log

        self._loop = LoopingCall(self.poll)
        self._loop.clock = self.clock
        d = self._loop.start(self.interval_s, now=True)
        d.addErrback(log.err, "fleet watcher stopped")
        return d

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def poll(self):
        from twisted.internet.defer import Deferred, succeed

        if self._polling:
            return succeed(None)
        self._polling = True
        d = Deferred.fromCoroutine(self._poll())

        def done(result):
            self._polling = False
            return result

        return d.addBoth(done)

    async def _poll(self) -> None:
        try:
            infos = await self.client.call("supervisor.getAllProcessInfo")
        except Exception as exc:  # noqa: BLE001 - any failure means "supervisord unreachable"
            self.error = f"supervisord unreachable at {self.fleet.socket}: {str(exc) or type(exc).__name__}"
            return
        self.error = ""
        self.polls += 1
        programs = self.fleet.by_program()
        seen = {}
        for info in infos:
            worker = programs.get(info.get("name"))
            if worker is not None:
                seen[worker.id] = info
        for worker in self.fleet.workers:
            self.observe(worker.id, seen.get(worker.id))

    def observe(self, worker_id: str, info: dict[str, Any] | None) -> None:
        entry = self.pool.get(worker_id)
        previous = self.infos.get(worker_id)
        if info is None:
            info = {"name": PROGRAM_PREFIX + worker_id, "statename": "UNKNOWN", "pid": 0,
                    "spawnerr": "supervisord has no such program (run omnirt fleet up to apply the fleet file)"}
        self.infos[worker_id] = info
        if entry is None:
            return
        state = info.get("statename", "UNKNOWN")
        if state == "RUNNING":
            entry.external_reason = ""
        else:
            entry.external_reason = f"supervisor: {describe_state(info)}"
        # a new process under the same program (killed and restarted between two polls)
        restarted = bool(previous and previous.get("pid") and info.get("pid") and previous["pid"] != info["pid"])
        if state in DOWN_STATES or restarted:
            self.pool.mark_failed(worker_id, entry.external_reason or f"supervisor: restarted (pid {info.get('pid')})")


class GatewayFleet:
    """What ``omnirt serve --fleet`` adds to the gateway: start or adopt supervisord, register the
    fleet's workers, watch supervisor states, readiness facts, and the exit policy."""

    def __init__(self, fleet: Fleet, reactor, *, stop_on_exit: bool = False, poll_interval_s: float = 2.0,
                 worker_idle_timeout_s: float = 10.0, control: SupervisorControl | None = None, client=None):
        self.fleet = fleet
        self.reactor = reactor
        self.stop_on_exit = stop_on_exit
        self.poll_interval_s = poll_interval_s
        self.worker_idle_timeout_s = worker_idle_timeout_s
        self.control = control or SupervisorControl(fleet, out=lambda line: print(line, flush=True))
        self.client = client or AsyncSupervisorClient(reactor, fleet.socket)
        self.watcher: FleetWatcher | None = None
        self.how = ""
        #: every fleet worker was healthy once (or supervisord gave up on it): /readyz may turn ok
        self.started = False

    async def start(self) -> list:
        """Ensure supervisord runs for the fleet (off the reactor thread); the workers' connections.

        Fleet workers are registered whether or not they are up yet: the pool's health loop finds them.
        """
        from twisted.internet.threads import deferToThreadPool

        from omnirt.workers.grpc import GrpcWorkerConnection

        self.how = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.control.ensure_started)
        print(f"omnirt serve: fleet {self.fleet.conf_path}: supervisord {self.how} "
              f"({len(self.fleet.workers)} workers)", flush=True)
        return [
            GrpcWorkerConnection(w.id, w.address, models=w.models, tags=w.tags, capacity=w.max_concurrency,
                                 idle_timeout_s=self.worker_idle_timeout_s)
            for w in self.fleet.workers
        ]

    def watch(self, pool) -> None:
        self.watcher = FleetWatcher(self.reactor, self.client, pool, self.fleet, interval_s=self.poll_interval_s)
        self.watcher.start()

    def _update_started(self) -> list[str]:
        """Latch ``started``; the ids still awaited."""
        if self.started or self.watcher is None:
            return []
        waiting = []
        for w in self.fleet.workers:
            entry = self.watcher.pool.get(w.id)
            sup_state = self.watcher.infos.get(w.id, {}).get("statename", "")
            if entry is not None and entry.state == "healthy":
                continue
            if sup_state in ("FATAL", "STOPPED", "EXITED"):
                continue  # supervisord gave up on it (or an operator stopped it): do not wait forever
            waiting.append(w.id)
        if not waiting:
            self.started = True
        return waiting

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        waiting = self._update_started()
        watcher = self.watcher
        body: dict[str, Any] = {
            "conf": str(self.fleet.conf_path),
            "supervisord": watcher.error if watcher and watcher.error else "running",
            "started": self.started,
            "workers": {
                w.id: {
                    "program": w.program,
                    "address": w.address,
                    "supervisor_state": (watcher.infos.get(w.id, {}).get("statename", "") if watcher else ""),
                    "pid": (watcher.infos.get(w.id, {}).get("pid", 0) if watcher else 0),
                    "detail": describe_state(watcher.infos[w.id]) if watcher and w.id in watcher.infos else "",
                }
                for w in self.fleet.workers
            },
        }
        if not self.started:
            return False, {"fleet": body, "reason": f"fleet starting: waiting for {', '.join(waiting)}"}
        return True, {"fleet": body}

    async def stop(self) -> None:
        """Stop watching; with ``stop_on_exit`` also stop the fleet (workers drain) and supervisord."""
        from twisted.internet.task import deferLater

        if self.watcher is not None:
            self.watcher.stop()
        if self.stop_on_exit:
            print(f"omnirt serve: stopping the fleet ({self.fleet.conf_path})", flush=True)
            pids = []
            try:
                pids.append(int(await self.client.call("supervisor.getPID")))
                infos = await self.client.call("supervisor.getAllProcessInfo")
                pids += [i["pid"] for i in infos if i.get("pid") and i.get("name") in self.fleet.by_program()]
                await self.client.call("supervisor.shutdown")
            except Exception as exc:  # noqa: BLE001
                print(f"omnirt serve: could not stop the fleet: {exc}", file=sys.stderr, flush=True)
            limit = self.control.stop_timeout()
            waited = 0.0
            while waited < limit and any(pid_alive(p) for p in pids):
                await deferLater(self.reactor, 0.1, lambda: None)
                waited += 0.1
        else:
            print(f"omnirt serve: leaving the fleet running (supervisorctl -c {self.fleet.conf_path} status)",
                  flush=True)
        await self.client.close()
