"""Blocking control of a fleet's supervisord (the ``omnirt fleet`` CLI; the gateway only from its
thread pool): XML-RPC through supervisor's own ``SupervisorTransport`` over the unix socket."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport, UnixStreamHTTPConnection

from omnirt.fleet.model import Fleet, FleetError
from omnirt.fleet.render import write_conf

__all__ = ["SupervisorControl", "describe_state", "pid_alive", "probe_health", "read_pidfile", "tail_file"]


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


class _TimedUnixConnection(UnixStreamHTTPConnection):
    """supervisor's unix-socket HTTP connection, with a deadline on connect and on every read."""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socketfile)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def supervisor_transport(socket_path: str | Path, timeout: float) -> SupervisorTransport:
    """``SupervisorTransport`` (what supervisorctl uses) for ``unix://socket_path``, each
    connection bounded by ``timeout`` seconds."""
    transport = SupervisorTransport(serverurl=f"unix://{socket_path}")

    def connection() -> UnixStreamHTTPConnection:
        conn = _TimedUnixConnection("localhost", timeout=timeout)
        conn.socketfile = str(socket_path)
        return conn

    transport._get_connection = connection
    return transport


class SupervisorControl:
    """Blocking supervisord control for one fleet (xmlrpc.client over its unix socket)."""

    def __init__(self, fleet: Fleet, *, timeout: float = 10.0, python: str | None = None,
                 out: Callable[[str], None] | None = None):
        self.fleet = fleet
        self.timeout = timeout
        self.python = python or sys.executable
        self.out = out or (lambda _line: None)

    def rpc(self, timeout: float | None = None) -> Any:
        transport = supervisor_transport(self.fleet.socket, timeout or self.timeout)
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

    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            reply = pb_grpc.WorkerStub(channel).Health(pb.HealthRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return None, (code.name.lower() if code else "error")
    return wire.health_from_pb(reply), ""
