"""What a topology run is: its sizes, the topologies, and the run's shared state."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from benchmarks.harness import (
    Children,
    CpuMeter,
    Redis,
)

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
#: the entry point; phases that must run in a fresh process re-run it with --phase
SCRIPT = ROOT / "scripts" / "bench-topologies"

#: the parts of a run, in order (--only picks some)
PARTS = ("topologies", "failover", "fanout", "tiny", "upstream")
CONNECTIONS = 32
TERMINAL = ("succeeded", "failed", "cancelled")
#: commands a Redis client sends itself; everything else in commandstats ran inside a Lua script
CLIENT_COMMANDS = {"evalsha", "eval", "xread", "ping", "client|setname", "client|list", "select", "auth",
                   "script|load", "hgetall", "hget", "set", "get", "del", "expire", "pexpire", "exists",
                   "xrange", "xadd", "zrange", "zrevrange", "zadd", "publish", "subscribe"}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each measurement does (full run vs --quick)."""

    budget_s: float
    wrk_warm_s: int
    wrk_s: int
    ceiling_c1_s: int
    async_total: int
    async_limit_s: float
    async1_total: int
    cancel_total: int
    redis_idle_s: float
    redis_jobs: int
    quiet_wait_s: float
    failover_tries: int
    sse_subscribers: int
    sse_rounds: int
    tiny_runs: int
    ceiling_again: bool


FULL = Sizes(budget_s=480, wrk_warm_s=2, wrk_s=6, ceiling_c1_s=3, async_total=1000, async_limit_s=30,
             async1_total=100, cancel_total=20, redis_idle_s=2.0, redis_jobs=30, quiet_wait_s=90, failover_tries=3, sse_subscribers=500,
             sse_rounds=3, tiny_runs=10, ceiling_again=True)
QUICK = Sizes(budget_s=250, wrk_warm_s=1, wrk_s=2, ceiling_c1_s=2, async_total=150, async_limit_s=10,
              async1_total=30, cancel_total=5, redis_idle_s=1.0, redis_jobs=10, quiet_wait_s=30, failover_tries=3, sse_subscribers=500,
              sse_rounds=1, tiny_runs=5, ceiling_again=False)


@dataclasses.dataclass(frozen=True)
class Topology:
    key: str
    label: str
    workers: int
    redis: bool


TOPOLOGIES = (
    Topology("single", "single process", 0, False),
    Topology("gw-1w", "gateway + 1 worker", 1, False),
    Topology("gw-2w", "gateway + 2 workers", 2, False),
    Topology("single-redis", "single process, Redis", 0, True),
    Topology("gw-1w-redis", "gateway + 1 worker, Redis", 1, True),
    Topology("gw-2w-redis", "gateway + 2 workers, Redis", 2, True),
)


def say(text: str) -> None:
    print(f"bench-topologies: {text}", file=sys.stderr, flush=True)


class Run:
    """Shared state of one benchmark run: children, temp dir, notes, the commands used, the clock."""

    def __init__(self, sizes: Sizes, tmp: Path):
        self.sizes = sizes
        self.tmp = tmp
        self.children = Children(tmp)
        self.notes: list[str] = []
        self.tool_commands: list[list[str]] = []
        self.begun = time.monotonic()
        self.redis: Redis | None = None
        self.meter = CpuMeter(self.children)
        #: phase -> CPU taken by other processes on this machine meanwhile
        self.cpu: dict[str, dict] = {}

    def phase(self, name: str):
        """``with run.phase(name):`` records the machine's CPU use by others during it."""
        run = self

        class _Phase:
            def __enter__(self):
                self.start = run.meter.snapshot()

            def __exit__(self, *exc):
                run.cpu[name] = run.meter.since(self.start)
                return False

        return _Phase()

    def left(self) -> float:
        return self.sizes.budget_s - (time.monotonic() - self.begun)

    def py(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "omnirt", *args]
