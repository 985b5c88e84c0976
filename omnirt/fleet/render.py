"""supervisord.conf for a fleet: rendered deterministically, written only when it changed."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from omnirt.fleet.model import CONF_NAME, Fleet

__all__ = ["render_conf", "write_conf"]


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
        return str(Path(__file__).resolve().parents[2])


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
