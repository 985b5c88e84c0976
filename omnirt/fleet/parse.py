"""Fleet file -> ``Fleet``: the sections' values checked by the pydantic models of ``schema``,
then what needs several keys or the host (known backends and models, users, folders, ``{n}``
expansion, duplicate ids and ports, free ports); every problem is reported at once."""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import socket
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omnirt.fleet.model import MAX_SOCKET_PATH, SOCKET_NAME, Fleet, FleetError, WorkerDef
from omnirt.fleet.schema import DefaultsSection, FleetFile, SupervisordSection, WorkerSection, check

__all__ = ["default_state_dir", "invoking_user", "load_fleet", "parse_fleet", "port_problem", "port_problems"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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

    def extend(self, where: str, whats: Iterable[str]) -> None:
        for what in whats:
            self.add(where, what)


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
    problems = _Problems()
    top, found = check(FleetFile, data, unknown="unknown top-level key")
    problems.extend("", found)
    sup, found = check(SupervisordSection, top.get("supervisord", {}))
    problems.extend("[supervisord]", found)
    defaults, found = check(DefaultsSection, top.get("defaults", {}))
    problems.extend("[defaults]", found)
    if "worker" in data and "worker" not in top:
        raw_workers: list[dict[str, Any]] = []
    else:
        raw_workers = top.get("worker", [])
        if not raw_workers:
            problems.add("", "no [[worker]] entries")

    base = source.resolve().parent if source is not None else Path.cwd()

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (base / path)

    fleet_kw: dict[str, Any] = {k: sup[k] for k in ("logfile_backups", "startsecs", "startretries", "stop_margin_s")
                                if k in sup}
    if "logfile_maxbytes" in sup:
        fleet_kw["logfile_maxbytes"] = str(sup["logfile_maxbytes"])
    if state_dir is not None:
        fleet_dir = Path(state_dir).expanduser().absolute()
    elif "dir" in sup:
        fleet_dir = resolve(sup["dir"]).absolute()
    else:
        fleet_dir = default_state_dir(source)
    fleet_dir = Path(os.path.normpath(fleet_dir))
    sock = resolve(sup["socket"]) if "socket" in sup else fleet_dir / SOCKET_NAME
    sock = Path(os.path.normpath(sock.absolute()))
    if len(str(sock).encode()) > MAX_SOCKET_PATH:
        problems.add("[supervisord]", f"socket path {str(sock)!r} is {len(str(sock).encode())} bytes, over the unix "
                                      f"socket limit of {MAX_SOCKET_PATH}: set a shorter dir or [supervisord] socket")
    owner = sup.get("socket_owner")
    if owner:
        if not user_exists(owner.partition(":")[0]):
            problems.add("[supervisord]", f"socket_owner: unknown user {owner.partition(':')[0]!r}")
        fleet_kw["socket_owner"] = owner

    workers: list[WorkerDef] = []
    checked_paths: set[tuple[str, Path]] = set()
    for index, raw in enumerate(raw_workers, start=1):
        label = raw.get("id") if isinstance(raw.get("id"), str) else None
        where = f"worker #{index}" + (f" ({label})" if label else "")
        workers += _workers(raw, where, defaults, problems, resolve=resolve, is_dir=is_dir,
                            user_exists=user_exists, default_user=default_user or invoking_user(),
                            checked_paths=checked_paths)

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


def _workers(raw: dict[str, Any], where: str, defaults: dict[str, Any], problems: _Problems, *, resolve,
             is_dir, user_exists, default_user: str, checked_paths: set[tuple[str, Path]]) -> list[WorkerDef]:
    """The workers one ``[[worker]]`` entry makes (``count`` of them), or none when it has problems;
    the checks still run on the keys that are fine: every problem at once."""
    from omnirt.backends import BACKEND_NAMES
    from omnirt.registry import MODELS

    good, found = check(WorkerSection, raw)
    problems.extend(where, found)
    ok = not found
    for key in ("id", "port"):
        if key not in raw:
            problems.add(where, f"missing required key {key!r}")
            ok = False
    merged = {**defaults, **good}
    merged["env"] = {**defaults.get("env", {}), **good.get("env", {})}
    merged["model_path"] = {**defaults.get("model_path", {}), **good.get("model_path", {})}
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

    def folder_of(model: str, folder: str) -> Path:
        path = Path(os.path.normpath(resolve(folder).absolute()))
        if (model, path) not in checked_paths:
            checked_paths.add((model, path))
            if not is_dir(path):
                problems.add(where, f"model_path for {model}: {path} is not a directory")
        return path

    for model, folder in merged["model_path"].items():
        if "{n}" not in folder:  # per-device folders are checked after expansion
            folder_of(model, folder)
    count = merged.get("count")
    template = merged.get("id")
    if template is not None and count is None and "{n}" in template:
        problems.add(where, "id contains {n} but count is not set")
        ok = False
    if template is not None and count is not None and count > 1 and "{n}" not in template:
        problems.add(where, f"id {template!r} must contain {{n}} when count > 1")
        ok = False
    if not ok or template is None or "port" not in merged:
        return []
    out = []
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
        model_path = {model: str(folder_of(model, _expand(folder, n))) for model, folder in merged["model_path"].items()}
        out.append(WorkerDef(
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
    return out


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
    from omnirt.fleet.control import SupervisorControl

    try:
        return SupervisorControl(fleet, timeout=2.0).running()
    except FleetError:
        return True  # something else answers there: the port check would only add noise
