"""Start real ``omnirt`` processes (and redis-server) on free loopback ports for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Proc:
    """A child process whose output goes to a log file; ``stop`` kills it for good."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=str(REPO_ROOT),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_until(self, check: Callable[[], bool], timeout: float = 60.0, what: str = "ready") -> None:
        """Poll ``check`` (bounded) until true; fail with the process log if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.argv[:3]} exited {self.popen.returncode} before {what}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.argv[:3]} not {what} after {timeout}s:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()


def omnirt_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "omnirt", *args]


def start_omnirt(testcase, args: list[str], port: int, *, env: dict[str, str] | None = None,
                 timeout: float = 60.0, name: str = "omnirt") -> Proc:
    """Start ``omnirt ARGS`` and wait until it listens on ``port``; killed at test cleanup."""
    log_dir = Path(testcase.mktemp())
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc(omnirt_argv(*args), log_dir / f"{name}.log", env=env)
    testcase.addCleanup(proc.stop)
    proc.wait_until(lambda: port_open(port), timeout=timeout, what=f"listening on {port}")
    return proc
