"""The gateway's fleet (``omnirt serve --fleet``): start or adopt supervisord, register the
fleet's workers, watch supervisor's process states, readiness facts and the exit policy."""

from __future__ import annotations

import sys
from typing import Any

from omnirt.fleet.client import AsyncSupervisorClient
from omnirt.fleet.control import SupervisorControl, describe_state, pid_alive
from omnirt.fleet.model import DOWN_STATES, PROGRAM_PREFIX, Fleet

__all__ = ["FleetWatcher", "GatewayFleet"]


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
