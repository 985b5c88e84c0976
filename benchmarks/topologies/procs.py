"""Starting a topology's processes, waiting for them, and checking their logs when they stop."""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import subprocess
import time

from benchmarks.harness import (
    free_port,
    http_json,
    wait_listening,
)
from benchmarks.topologies.config import Run


@dataclasses.dataclass
class Proc:
    name: str
    port: int
    argv: list[str]
    proc: subprocess.Popen
    worker_id: str = ""


@dataclasses.dataclass
class Started:
    key: str
    gateway: Proc
    workers: list[Proc]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    @property
    def port(self) -> int:
        return self.gateway.port

    def all(self) -> list[Proc]:
        return [self.gateway, *self.workers]


def start_worker(run: Run, name: str, worker_id: str, backend: str, *, redis_ns: str | None = None,
                 model_paths: dict[str, str] | None = None, port: int | None = None,
                 env: dict[str, str] | None = None) -> Proc:
    port = port or free_port()
    argv = run.py("worker", "--host", "127.0.0.1", "--port", str(port), "--worker-id", worker_id,
                  "--backend", backend)
    if redis_ns is not None:
        assert run.redis is not None
        argv += ["--redis-url", run.redis.url, "--redis-namespace", redis_ns]
    for model, folder in (model_paths or {}).items():
        argv += ["--model-path", f"{model}={folder}"]
    return Proc(name, port, argv, run.children.start(name, argv, env), worker_id)


def start_topology(run: Run, key: str, workers: int, redis: bool, *, backend: str = "cpu-stub",
                   model_paths: dict[str, str] | None = None, gateway_extra: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> Started:
    namespace = f"bench-{key}" if redis else None
    started_workers = [start_worker(run, f"{key}-w{i + 1}", f"w{i + 1}", backend, redis_ns=namespace,
                                    model_paths=model_paths, env=env) for i in range(workers)]
    for w in started_workers:
        wait_listening(run.children, w.name, w.proc, w.port)
    port = free_port()
    argv = run.py("serve", "--host", "127.0.0.1", "--port", str(port), "--backend", backend,
                  "--artifact-dir", str(run.tmp / f"artifacts-{key}"), *gateway_extra)
    for w in started_workers:
        argv += ["--remote-worker", f"{w.worker_id}=127.0.0.1:{w.port}"]
    if namespace is not None:
        assert run.redis is not None
        argv += ["--redis-url", run.redis.url, "--redis-namespace", namespace]
    if not started_workers:
        for model, folder in (model_paths or {}).items():
            argv += ["--model-path", f"{model}={folder}"]
    name = f"{key}-gateway"
    gateway = Proc(name, port, argv, run.children.start(name, argv, env))
    wait_listening(run.children, name, gateway.proc, port)
    wait_ready(run, gateway, len(started_workers))
    return Started(key, gateway, started_workers)


def wait_ready(run: Run, gateway: Proc, workers: int, timeout: float = 30.0) -> float:
    """Wait for /readyz ok with every remote worker healthy; seconds waited."""
    begun = time.monotonic()
    body: dict = {}
    while time.monotonic() - begun < timeout:
        try:
            status, body = http_json(gateway.port, "GET", "/readyz", timeout=5)
        except (OSError, http.client.HTTPException):
            status = 0
        healthy = [w for w in body.get("workers", []) if w.get("state") == "healthy"]
        if status == 200 and len(healthy) >= workers:
            return time.monotonic() - begun
        if gateway.proc.poll() is not None:
            raise RuntimeError(f"{gateway.name} exited {gateway.proc.returncode}:\n"
                               f"{run.children.log(gateway.name)[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{gateway.name} not ready after {timeout:.0f}s: {json.dumps(body)[:800]}")


PROBLEM_MARKERS = ("Traceback", "Unhandled", "CRITICAL", " ERROR ", "[ERROR]", "Error:")


def stop_and_check(run: Run, started: Started, expected: str = "") -> None:
    """Stop a topology (gateway first) and note any error lines its processes logged."""
    for p in started.all():
        run.children.stop(p.proc)
    for p in started.all():
        check_log(run, p.name, expected)


EXCEPTION_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception|Unavailable|Failure|Lost|Done)\w*)(: .*)?$")


def check_log(run: Run, name: str, expected: str = "") -> None:
    """Note error lines in a child's log, with the exceptions they name (counted)."""
    text = run.children.log(name)
    lines = [line for line in text.splitlines() if any(m in line for m in PROBLEM_MARKERS)]
    if not lines:
        return
    exceptions: dict[str, int] = {}
    for line in text.splitlines():
        found = EXCEPTION_LINE.match(line)
        if found:
            key = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line.strip())[:200]
            exceptions[key] = exceptions.get(key, 0) + 1
    named = "; ".join(f"{k} (x{n})" for k, n in sorted(exceptions.items(), key=lambda kv: -kv[1])[:4])
    run.notes.append(f"{name} logged {len(lines)} error line(s){expected}: first `{lines[0].strip()[:160]}`"
                     + (f"; exceptions: {named}" if named else ""))
