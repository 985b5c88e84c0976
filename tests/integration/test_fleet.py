"""A fleet of real cpu-stub workers under a real supervisord: `omnirt serve --fleet`, crash restarts,
drained restarts under load, gateway restarts, the `omnirt fleet` CLI, and no process left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from omnirt.fleet import AsyncSupervisorClient, SupervisorControl, load_fleet, pid_alive, read_pidfile
from tests.support.http import json_call
from tests.support.procs import REPO_ROOT, free_port, omnirt_argv, start_omnirt

TERMINAL = ("succeeded", "failed", "cancelled")
SUPERVISORCTL = [sys.executable, "-m", "supervisor.supervisorctl"]


def stub_body(steps=4, delay_ms=10):
    config = {"width": 64, "height": 64, "num_inference_steps": steps, "stub_step_delay_ms": delay_ms}
    return {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub",
            "inputs": {"prompt": "a lighthouse"}, "config": config}


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


def _ours(pid: int) -> bool:
    """Is ``pid`` one of the processes a fleet test starts (guards against a recycled pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"omnirt" in cmdline or b"supervisor" in cmdline


class FleetCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 200
        self.addCleanup(self.pool.closeCachedConnections)
        self.seen_pids: set[int] = set()

    # -- the fleet ------------------------------------------------------------------------------

    def make_fleet(self, ids=("fa", "fb")) -> Path:
        """A fleet file of cpu-stub workers on free ports; everything it starts is killed at cleanup."""
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        # trial's folders are too deep for a unix socket path (108 bytes): a short folder of our own
        sockdir = tempfile.mkdtemp(prefix="ofl-")
        self.addCleanup(shutil.rmtree, sockdir, True)
        lines = [
            "[supervisord]",
            f'dir = "{folder / "state"}"',
            f'socket = "{sockdir}/s.sock"',
            "[defaults]",
            'backend = "cpu-stub"',
            "max_concurrency = 2",
            "drain_grace_s = 10",
        ]
        for wid in ids:
            lines += ["[[worker]]", f'id = "{wid}"', f"port = {free_port()}"]
        path = folder / "fleet.toml"
        path.write_text("\n".join(lines) + "\n")
        self.fleet = load_fleet(path, strict=False)
        self.control = SupervisorControl(self.fleet, timeout=30)
        self.addCleanup(self.reap)
        return path

    def reap(self):
        """Kill whatever the test left: supervisord first (so it restarts nothing), then the workers."""
        pids = set(self.seen_pids)
        try:
            pids |= {i["pid"] for i in SupervisorControl(self.fleet, timeout=2).infos().values() if i["pid"]}
        except Exception:  # noqa: BLE001 - nothing answers: fine
            pass
        sup = read_pidfile(self.fleet)
        order = ([sup] if sup else []) + sorted(pids - {sup})
        for pid in order:
            if pid_alive(pid) and _ours(pid):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in order):
            time.sleep(0.05)

    def fleet_pids(self) -> dict[str, int]:
        """worker id -> pid, from supervisor's getProcessInfo; also remembered for cleanup."""
        rpc = self.control.rpc()
        pids = {w.id: rpc.supervisor.getProcessInfo(w.program)["pid"] for w in self.fleet.workers}
        self.seen_pids |= {p for p in pids.values() if p}
        sup = read_pidfile(self.fleet)
        if sup:
            self.seen_pids.add(sup)
        return pids

    def run_cli(self, *args, timeout=90) -> subprocess.CompletedProcess:
        return subprocess.run(omnirt_argv(*args), capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))

    def cli_async(self, *args):
        """``omnirt ARGS`` without blocking the test's reactor; fires (out, err, code)."""
        return getProcessOutputAndValue(sys.executable, ["-m", "omnirt", *args], env=dict(os.environ),
                                        path=str(REPO_ROOT), reactor=reactor)

    # -- the gateway ----------------------------------------------------------------------------

    def start_gateway(self, fleet_path, *extra):
        port = free_port()
        args = ["serve", "--port", str(port), "--fleet", str(fleet_path), "--health-interval-s", "0.5",
                "--artifact-dir", str(Path(self.mktemp()).resolve()), *extra]
        proc = start_omnirt(self, args, port, name="gateway")
        self.base = f"http://127.0.0.1:{port}"
        return proc

    def jcall(self, method, path, payload=None):
        return json_call(self.pool, self.base, method, path, payload)

    @inlineCallbacks
    def wait_ready(self, timeout=30.0):
        """/readyz 200 with every fleet worker healthy (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            code, ready = yield self.jcall("GET", "/readyz")
            states = {w["worker_id"]: w["state"] for w in ready["workers"]}
            if code == 200 and set(states.values()) == {"healthy"}:
                return ready
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway not ready with every worker healthy: {code} {ready}")
            yield sleep(0.1)

    @inlineCallbacks
    def submit(self, n, **kw):
        ids = []
        for _ in range(n):
            code, job = yield self.jcall("POST", "/v1/jobs", stub_body(**kw))
            self.assertEqual(code, 202, job)
            ids.append(job["id"])
        return ids

    @inlineCallbacks
    def wait_terminal(self, job_ids, timeout=60.0):
        deadline = time.monotonic() + timeout
        records, pending = {}, set(job_ids)
        while pending and time.monotonic() < deadline:
            code, listing = yield self.jcall("GET", "/v1/jobs?limit=1000")
            for rec in listing["data"]:
                if rec["id"] in pending and rec["state"] in TERMINAL:
                    records[rec["id"]] = rec
                    pending.discard(rec["id"])
            if pending:
                yield sleep(0.1)
        self.assertEqual(pending, set(), "jobs not terminal in time")
        return records

    def assert_all_succeeded(self, records):
        bad = {j: (r["state"], r["error"]) for j, r in records.items() if r["state"] != "succeeded"}
        self.assertEqual(bad, {})

    def assert_gone(self, pids):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
        self.assertEqual([p for p in pids if pid_alive(p)], [], "processes left behind")


class ServeFleetTests(FleetCase):
    @inlineCallbacks
    def test_serve_fleet_crash_and_gateway_restart(self):
        """`serve --fleet` starts supervisord and both workers, /readyz lists both healthy and
        `supervisorctl -c conf status` works; SIGKILL of one worker: supervisord restarts it, the gateway
        marks it down then up, and every job submitted meanwhile succeeds; a gateway restart leaves the
        workers running (same pids); with --fleet-stop-on-exit the gateway's exit stops them all."""
        path = self.make_fleet()
        gateway = self.start_gateway(path)
        ready = yield self.wait_ready()
        self.assertEqual(ready["remote_worker_count"], 2)
        self.assertEqual(sorted(w["worker_id"] for w in ready["workers"]), ["fa", "fb"])
        self.assertTrue(ready["fleet"]["started"])
        # healthy may come before supervisord's startsecs have passed (STARTING -> RUNNING)
        self.assertLessEqual({w["supervisor_state"] for w in ready["fleet"]["workers"].values()},
                             {"STARTING", "RUNNING"})
        self.assertIn("supervisord started", gateway.log())

        self.control.wait_running(timeout=15)
        ctl = subprocess.run([*SUPERVISORCTL, "-c", str(self.fleet.conf_path), "status"], capture_output=True,
                             text=True, timeout=30)
        self.assertEqual(ctl.returncode, 0, ctl.stdout + ctl.stderr)
        for wid in ("fa", "fb"):
            self.assertRegex(ctl.stdout, rf"omnirt-worker-{wid}\s+RUNNING")

        before = self.fleet_pids()
        supervisord = read_pidfile(self.fleet)
        first = yield self.submit(10, steps=4, delay_ms=20)
        os.kill(before["fa"], signal.SIGKILL)
        meanwhile = yield self.submit(20, steps=4, delay_ms=20)
        seen, after = [], {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, ready = yield self.jcall("GET", "/readyz")
            seen.append(next(w["state"] for w in ready["workers"] if w["worker_id"] == "fa"))
            after = self.fleet_pids()
            restarted = after["fa"] not in (0, before["fa"])
            if restarted and seen[-1] == "healthy" and set(seen) - {"healthy"}:
                break
            yield sleep(0.05)
        self.assertTrue(set(seen) - {"healthy"}, f"the gateway never marked fa down: {seen}")
        self.assertEqual(seen[-1], "healthy", seen)
        self.assertNotIn(after["fa"], (0, before["fa"]))
        self.assertEqual(after["fb"], before["fb"])
        records = yield self.wait_terminal(first + meanwhile)
        self.assert_all_succeeded(records)

        # a gateway restart leaves the fleet (and its pids) alone, and adopts it
        pids = self.fleet_pids()
        gateway.signal(signal.SIGTERM)
        self.assertEqual(gateway.wait(30), 0, gateway.log()[-3000:])
        self.assertIn("leaving the fleet running", gateway.log())
        self.assertEqual(self.fleet_pids(), pids)
        self.assertTrue(all(pid_alive(p) for p in [supervisord, *pids.values()]))
        gateway = self.start_gateway(path, "--fleet-stop-on-exit")
        yield self.wait_ready()
        self.assertIn("supervisord adopted", gateway.log())
        self.assertEqual(self.fleet_pids(), pids)
        records = yield self.wait_terminal((yield self.submit(4)))
        self.assert_all_succeeded(records)

        gateway.signal(signal.SIGTERM)
        self.assertEqual(gateway.wait(60), 0, gateway.log()[-3000:])
        self.assertIn("stopping the fleet", gateway.log())
        self.assert_gone([supervisord, *pids.values()])

    @inlineCallbacks
    def test_drained_restarts_under_load(self):
        """`omnirt fleet restart <id>` and then `supervisorctl restart` of the other worker, during a stream
        of 100 jobs: each worker drains (TERM), comes back with a new pid, and all 100 jobs succeed;
        `omnirt fleet down` then leaves no process behind."""
        path = self.make_fleet()
        gateway = self.start_gateway(path)
        yield self.wait_ready()
        before = self.fleet_pids()
        supervisord = read_pidfile(self.fleet)
        jobs = yield self.submit(24, steps=8, delay_ms=40)
        restart = self.cli_async("fleet", "restart", str(path), "fa")
        while not restart.called:
            jobs += (yield self.submit(min(4, 100 - len(jobs)), steps=8, delay_ms=40))
            yield sleep(0.2)
        out, err, code = yield restart
        self.assertEqual(code, 0, (out + err).decode())
        self.assertIn(b"fa: ready again", out)
        ctl = self.cli_async_ctl("restart", "omnirt-worker-fb")
        while not ctl.called:
            jobs += (yield self.submit(min(4, 100 - len(jobs)), steps=8, delay_ms=40))
            yield sleep(0.2)
        out, err, code = yield ctl
        self.assertEqual(code, 0, (out + err).decode())
        if len(jobs) < 100:
            jobs += (yield self.submit(100 - len(jobs), steps=8, delay_ms=40))
        self.assertEqual(len(jobs), 100)
        all_records = yield self.wait_terminal(jobs, timeout=90)
        self.assert_all_succeeded(all_records)
        after = self.fleet_pids()
        self.assertNotEqual(after["fa"], before["fa"])
        self.assertNotEqual(after["fb"], before["fb"])
        waited = 0
        for wid in ("fa", "fb"):
            log = (self.fleet.log_dir / f"omnirt-worker-{wid}.log").read_text()
            self.assertIn("SIGTERM, draining", log)
            # a worker drained with jobs running waited for them (and they all succeeded, above); one
            # whose last jobs had ended before its SIGTERM arrived had nothing to wait for
            waited += bool(re.search(r"draining: waiting up to 10\.0s for [1-9]", log))
        self.assertGreaterEqual(waited, 1, "no worker was drained while it ran jobs")
        self.assertEqual({r["worker_id"] for r in all_records.values()}, {"fa", "fb"})

        gateway.signal(signal.SIGTERM)
        self.assertEqual(gateway.wait(30), 0)
        down = self.run_cli("fleet", "down", str(path))
        self.assertEqual(down.returncode, 0, down.stdout + down.stderr)
        self.assert_gone([supervisord, *before.values(), *after.values()])
        self.assertFalse(self.fleet.socket.exists())

    def cli_async_ctl(self, *args):
        return getProcessOutputAndValue(SUPERVISORCTL[0], [*SUPERVISORCTL[1:], "-c", str(self.fleet.conf_path), *args],
                                        env=dict(os.environ), reactor=reactor)


class FleetCliTests(FleetCase):
    @inlineCallbacks
    def test_up_status_logs_down(self):
        """`fleet up` starts everything and waits for RUNNING, a second `up` adopts it (same pids), `status`
        shows supervisor state and gRPC health side by side, `logs` tails a worker's log, the async XML-RPC
        client (the gateway's) reads the same state, `down` leaves no process behind."""
        path = self.make_fleet()
        up = self.run_cli("fleet", "up", str(path))
        self.assertEqual(up.returncode, 0, up.stdout + up.stderr)
        self.assertIn("supervisord started", up.stdout)
        pids = self.fleet_pids()
        supervisord = read_pidfile(self.fleet)
        again = self.run_cli("fleet", "up", str(path))
        self.assertEqual(again.returncode, 0, again.stdout + again.stderr)
        self.assertIn("supervisord adopted", again.stdout)
        self.assertEqual(self.fleet_pids(), pids)

        status = self.run_cli("fleet", "status", str(path), "--json")
        self.assertEqual(status.returncode, 0, status.stdout + status.stderr)
        rows = {r["id"]: r for r in json.loads(status.stdout)["workers"]}
        for wid in ("fa", "fb"):
            self.assertEqual((rows[wid]["supervisor"], rows[wid]["pid"], rows[wid]["health"], rows[wid]["capacity"]),
                             ("RUNNING", pids[wid], "ready", 2))
        table = self.run_cli("fleet", "status", str(path))
        self.assertRegex(table.stdout, r"fa\s+127\.0\.0\.1:\d+\s+RUNNING\s+\d+\s+ready")

        logs = self.run_cli("fleet", "logs", str(path), "fb", "-n", "5")
        self.assertEqual(logs.returncode, 0, logs.stderr)
        self.assertIn("omnirt worker fb listening on", logs.stdout)
        self.assertLessEqual(len(logs.stdout.splitlines()), 5)

        client = AsyncSupervisorClient(reactor, self.fleet.socket)
        self.addCleanup(client.close)
        infos = yield client.call("supervisor.getAllProcessInfo")
        self.assertEqual({i["name"]: i["pid"] for i in infos},
                         {f"omnirt-worker-{w}": p for w, p in pids.items()})
        with self.assertRaises(xmlrpc.client.Fault):
            yield client.call("supervisor.getProcessInfo", "omnirt-worker-nope")

        down = self.run_cli("fleet", "down", str(path))
        self.assertEqual(down.returncode, 0, down.stdout + down.stderr)
        self.assert_gone([supervisord, *pids.values()])
        self.assertFalse(self.fleet.pidfile.exists())
        status = self.run_cli("fleet", "status", str(path))
        self.assertEqual(status.returncode, 3)

    def test_invalid_fleet_rejected_with_every_problem(self):
        """An invalid fleet file is refused by `fleet up` and by `serve --fleet` (exit 2) with one line per
        problem (duplicate id and port, port in use, unknown backend, missing model folder, unknown key,
        bad type), and nothing is started."""
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        import socket

        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        taken = busy.getsockname()[1]
        port = free_port()
        sockdir = tempfile.mkdtemp(prefix="ofl-")
        self.addCleanup(shutil.rmtree, sockdir, True)
        path = folder / "bad.toml"
        path.write_text(f"""
            [supervisord]
            dir = "{folder / 'state'}"
            socket = "{sockdir}/s.sock"
            [[worker]]
            id = "a"
            port = {port}
            backend = "cpu"
            model_path = {{ "sdxl-base-1.0" = "weights/missing" }}
            [[worker]]
            id = "a"
            port = {port}
            [[worker]]
            id = "b"
            port = {taken}
            [[worker]]
            id = "c"
            port = {free_port()}
            backend = "quantum"
            gpus = 2
            [[worker]]
            id = "d"
            port = {free_port()}
            max_concurrency = "lots"
        """)
        expected = [
            f"model_path for sdxl-base-1.0: {folder}/weights/missing is not a directory",
            f"worker a: port {port} is also used by worker a",
            "duplicate worker id 'a'",
            f"worker b: port: port {taken} is already in use on 127.0.0.1",
            "worker #4 (c): unknown backend 'quantum'",
            "worker #4 (c): unknown key 'gpus'",
            "worker #5 (d): max_concurrency must be an integer",
        ]
        for argv in (["fleet", "up", str(path)], ["serve", "--port", str(free_port()), "--fleet", str(path)]):
            proc = self.run_cli(*argv)
            self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
            lines = proc.stderr.strip().splitlines()
            self.assertEqual(len(lines), len(expected), proc.stderr)
            for text in expected:
                self.assertEqual(sum(text in line for line in lines), 1, f"{text!r} in:\n{proc.stderr}")
            self.assertTrue(all(line.startswith(f"error: {path}: ") for line in lines), proc.stderr)
        self.assertFalse((folder / "state").exists())
        self.assertEqual(os.listdir(sockdir), [])
