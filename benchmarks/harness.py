"""Helpers for the benchmark and soak drivers: child processes, wrk, omnirt bench, plain HTTP
calls, a private redis-server and a description of the machine. Blocking code (no reactor): the
drivers stand outside the processes they measure. Free ports and Redis commands come from the
same helpers the integration tests use (tests.support)."""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from omnirt.bench.sse import parse_events
from tests.support.procs import free_port, port_open
from tests.support.redis import RedisReplyError, redis_cli

ROOT = Path(__file__).resolve().parents[1]


class Children:
    """Every process a script starts, each in its own session (process group); ``kill_all`` ends
    them all (SIGTERM, then SIGKILL), bounded in time. Only these pids are ever signalled."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.stopped: set[int] = set()
        #: every (name, argv, extra environment) started, in order (for the report's "exact commands")
        self.commands: list[tuple[str, list[str], dict[str, str]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(ROOT), env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=True)
        finally:
            log.close()
        self.procs.append((name, proc))
        self.commands.append((name, list(argv), dict(env or {})))
        return proc

    def log(self, name: str) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the child's process group at once (a crash, not a shutdown)."""
        self.stopped.add(id(proc))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, proc: subprocess.Popen, term_wait: float = 5.0) -> None:
        self.stopped.add(id(proc))
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def stopped_early(self) -> list[str]:
        """Children that exited although the script never stopped them (crashed, killed from outside)."""
        out = []
        for name, proc in self.procs:
            proc.poll()
            if proc.returncode is not None and id(proc) not in self.stopped:
                out.append(f"{name} (pid {proc.pid}) exited with {proc.returncode}")
        return out

    def kill_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc, term_wait=3.0)


def wait_listening(children: Children, name: str, proc: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode} before listening:\n{children.log(name)[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{name} not listening on {port} after {timeout:.0f}s:\n{children.log(name)[-3000:]}")


# -- wrk -----------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip()).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict:
    """Requests/sec, latency percentiles (ms), and error counts from `wrk --latency` output."""
    found: dict = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}
    # wrk pads a one-letter unit ("1.07s ") to line up with "ms"/"us": allow trailing blanks
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.M):
        found[f"p{pct}"] = _ms(value)
    requests = re.search(r"(\d+) requests in", output)
    found["requests"] = int(requests.group(1)) if requests else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    found["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    found["socket_errors"] = sum(int(x) for x in sock.groups()) if sock else 0
    return found


def wrk_post(url: str, body: bytes, connections: int, seconds: float, lua_dir: Path,
             commands: list[list[str]] | None = None, timeout_s: int | None = None) -> dict:
    """POST ``body`` (JSON) to ``url`` with ``wrk -t1 -c<connections>`` for ``seconds`` (whole);
    ``timeout_s``: wrk's per-request timeout (its default, 2 s, counts slower answers as errors
    and leaves them out of the latencies)."""
    lua = Path(lua_dir) / "post.lua"
    lua.write_text('wrk.method = "POST"\n'
                   f"wrk.body = {json.dumps(body.decode())}\n"
                   'wrk.headers["Content-Type"] = "application/json"\n')
    seconds = max(1, round(seconds))
    argv = [shutil.which("wrk") or "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
            *(("--timeout", f"{timeout_s}s") if timeout_s else ()), "-s", str(lua), url]
    if commands is not None:
        commands.append(argv)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout).strip()[:500]}")
    return parse_wrk(out.stdout)


# -- omnirt bench --------------------------------------------------------------------------------

def omnirt_bench(url: str, *args: str, timeout: float = 120.0, notes: list[str] | None = None,
                 commands: list[list[str]] | None = None) -> dict | None:
    """``omnirt bench --url URL ARGS --json``; None (and a note) when it fails."""
    argv = [sys.executable, "-m", "omnirt", "bench", "--url", url, "--json", *args]
    if commands is not None:
        commands.append(argv)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT), timeout=timeout)
    except subprocess.TimeoutExpired:
        message = f"omnirt bench {' '.join(args)} did not finish in {timeout:.0f} s"
        if notes is None:
            raise RuntimeError(message) from None
        notes.append(message)
        return None
    if out.returncode not in (0, 1) or not out.stdout.strip():
        message = f"omnirt bench {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-1500:]}"
        if notes is None:
            raise RuntimeError(message)
        notes.append(message)
        return None
    return json.loads(out.stdout)


# -- plain HTTP ----------------------------------------------------------------------------------

def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        resp = conn.getresponse()
        data = resp.read()
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            parsed = {"_raw": data[:500].decode(errors="replace")}
        return resp.status, parsed
    finally:
        conn.close()


def sse_replay(port: int, path: str, timeout: float = 30.0) -> list[dict]:
    """Read an SSE stream that ends by itself (a terminal job's events) and return each event's
    JSON ``data``; bounded by ``timeout`` per read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"GET {path} answered {resp.status}")
        body = resp.read()
    finally:
        conn.close()
    return parse_events(body)


# -- a private redis-server ----------------------------------------------------------------------

class Redis:
    """A redis-server child on a free loopback port (never 6379), no persistence."""

    def __init__(self, children: Children, directory: Path):
        self.children = children
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        while self.port == 6379:
            self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [server, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
                "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]
        self.proc = self.children.start("redis", argv)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.command("PING", timeout=0.5) == "PONG":
                    return
            except (OSError, ConnectionError, RedisReplyError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}:\n{self.children.log('redis')[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not answering PING on {self.port} after {timeout:.0f}s")

    def command(self, *args, timeout: float = 5.0):
        """One command through redis-cli (bounded by ``timeout``)."""
        return redis_cli(self.port, *args, timeout=timeout)

    def commandstats(self) -> dict[str, int]:
        """``INFO commandstats`` as {command: calls} (commands run inside Lua scripts included)."""
        out: dict[str, int] = {}
        for line in self.command("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, rest = line[len("cmdstat_"):].split(":", 1)
                fields = dict(part.split("=", 1) for part in rest.split(","))
                out[name] = int(fields["calls"])
        return out


# -- the machine ---------------------------------------------------------------------------------

PACKAGES = ("twisted", "klein", "treq", "grpcio", "protobuf", "txredisapi", "prometheus-client",
            "torch", "diffusers", "transformers", "matplotlib")


def machine() -> dict:
    """Cores, memory, CPU model, OS, Python and the versions of the packages that matter here."""
    info: dict = {"cores": os.cpu_count(), "python": platform.python_version(),
                  "platform": platform.platform(terse=True), "kernel": platform.release()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        info["cpu_model"] = model.group(1).strip() if model else "?"
        mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)$", cpuinfo, re.M)
        info["cpu_mhz"] = float(mhz.group(1)) if mhz else None
    except OSError:
        info["cpu_model"] = "?"
    try:
        mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        info["memory_gib"] = round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None
    except OSError:
        info["memory_gib"] = None
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    info["packages"] = versions
    for tool, argv in (("wrk", ["wrk", "-v"]), ("redis-server", ["redis-server", "--version"])):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            info[tool] = (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            info[tool] = "not found"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=str(ROOT), timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=str(ROOT), timeout=10).stdout.strip()
        info["git"] = rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        info["git"] = "?"
    return info


# -- CPU used by other processes -----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int) -> float:
    """utime+stime+cutime+cstime of a (not yet reaped) process, in seconds; 0 when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return sum(int(x) for x in fields[11:15]) / _TICK


def _machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


class CpuMeter:
    """How much CPU the rest of the machine (other users' processes) took during a phase: the
    machine's busy time from /proc/stat less this script's own (itself, reaped children, and its
    live children read from /proc). Linux only; zeros elsewhere."""

    def __init__(self, children: Children):
        self.children = children

    def _mine_s(self) -> float:
        import resource

        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        live = sum(proc_cpu_s(p.pid) for _, p in self.children.procs if p.returncode is None)
        return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + live

    def snapshot(self) -> tuple[float, float, float, float]:
        busy, steal = _machine_cpu_s()
        return time.monotonic(), busy, steal, self._mine_s()

    def since(self, start: tuple[float, float, float, float]) -> dict:
        now = self.snapshot()
        wall = max(1e-6, now[0] - start[0])
        busy, steal, mine = now[1] - start[1], now[2] - start[2], now[3] - start[3]
        other = max(0.0, busy - mine)
        return {"wall_s": round(wall, 1), "busy_cores": round(busy / wall, 2), "mine_cores": round(mine / wall, 2),
                "other_cores": round(other / wall, 2), "steal_cores": round(steal / wall, 2)}


# -- Redis MONITOR ---------------------------------------------------------------------------------

class Monitor:
    """``redis-cli monitor`` read on a thread: every command the server runs, with its server
    timestamp and source (``lua`` for commands inside scripts, else the client's address).
    Bounded by ``max_lines``; ``stop()`` ends it."""

    def __init__(self, port: int, max_lines: int = 2_000_000):
        import threading

        from tests.support.redis import REDIS_CLI

        self.lines: list[tuple[float, str, str]] = []
        self.max_lines = max_lines
        self.proc = subprocess.Popen([REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), "monitor"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        if self.proc.stdout.readline().strip() != b"OK":
            self.stop()
            raise RuntimeError("MONITOR refused")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        pattern = re.compile(rb'^(\d+\.\d+) \[\d+ ([^\]]+)\] "([^"]*)"')
        try:
            while len(self.lines) < self.max_lines:
                line = self.proc.stdout.readline()
                if not line:
                    return
                found = pattern.match(line)
                if found:
                    self.lines.append((float(found.group(1)), found.group(2).decode(),
                                       found.group(3).decode(errors="replace").lower()))
        except (OSError, ValueError):
            return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        if getattr(self, "thread", None) is not None:
            self.thread.join(timeout=5)

    def between(self, start: float, end: float) -> list[tuple[float, str, str]]:
        return [entry for entry in list(self.lines) if start <= entry[0] <= end]
