"""Fleet files (parsing, validation, count expansion), the rendered supervisord.conf, the gateway's
supervisor watcher (fake XML-RPC client, fake clock), and the systemd units."""

from __future__ import annotations

import configparser
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from supervisor.datatypes import dict_of_key_value_pairs
from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from omnirt.fleet import (
    MAX_SOCKET_PATH,
    FleetError,
    FleetWatcher,
    GatewayFleet,
    load_fleet,
    parse_fleet,
    render_conf,
    write_conf,
)
from tests.support.fakes import ControlledWorker
from tests.unit.gateway_harness import Harness

REPO = Path(__file__).resolve().parents[2]
#: trial's temp folders are too deep for a unix socket path (108 bytes): tests name a short one
SHORT_SOCKET = "/tmp/omnirt-fleet-unit/s.sock"

ISSUE_SHAPE = """
[supervisord]
dir = "/var/lib/omnirt/fleet"
[defaults]
backend = "cuda"
max_concurrency = 1
[[worker]]
id = "sdxl-a"
port = 50061
models = ["sdxl-base-1.0", "sdxl-refiner-1.0"]
tags = ["gpu0"]
env = { CUDA_VISIBLE_DEVICES = "0" }
model_path = { "sdxl-base-1.0" = "/models/sdxl-base" }
"""


def parse(text: str, **kw):
    import tomllib

    kw.setdefault("is_dir", lambda _p: True)
    kw.setdefault("user_exists", lambda u: u in ("root", "omnirt"))
    kw.setdefault("default_user", "root")
    return parse_fleet(tomllib.loads(text), **kw)


def problems_of(text: str, **kw) -> list[str]:
    try:
        parse(text, **kw)
    except FleetError as exc:
        return exc.problems
    raise AssertionError("no FleetError")


class ParseTests(SynchronousTestCase):
    def test_issue_shape(self):
        """The fleet file shape of the issue parses: defaults apply, env and model_path carry over."""
        fleet = parse(ISSUE_SHAPE)
        self.assertEqual(fleet.dir, Path("/var/lib/omnirt/fleet"))
        self.assertEqual(fleet.socket, Path("/var/lib/omnirt/fleet/supervisor.sock"))
        (w,) = fleet.workers
        self.assertEqual((w.id, w.port, w.host, w.backend, w.max_concurrency, w.user),
                         ("sdxl-a", 50061, "127.0.0.1", "cuda", 1, "root"))
        self.assertEqual(w.models, ("sdxl-base-1.0", "sdxl-refiner-1.0"))
        self.assertEqual(w.tags, ("gpu0",))
        self.assertEqual(w.env, {"CUDA_VISIBLE_DEVICES": "0"})
        self.assertEqual(w.model_path, {"sdxl-base-1.0": "/models/sdxl-base"})
        self.assertEqual(w.address, "127.0.0.1:50061")
        self.assertEqual(w.program, "omnirt-worker-sdxl-a")

    def test_count_expands_over_devices(self):
        """count=N gives N workers: {n} in id/tags/env, port and metrics_port are bases + n, and
        CUDA_VISIBLE_DEVICES = n unless env sets it."""
        fleet = parse("""
            [defaults]
            backend = "cuda"
            user = "omnirt"
            [[worker]]
            id = "sdxl-{n}"
            count = 3
            port = 50061
            metrics_port = 9400
            tags = ["gpu", "gpu{n}"]
            drain_grace_s = 45
            [[worker]]
            id = "pinned-{n}"
            count = 2
            port = 50071
            env = { CUDA_VISIBLE_DEVICES = "{n},7", EXTRA = "x{n}" }
        """)
        ids = [w.id for w in fleet.workers]
        self.assertEqual(ids, ["sdxl-0", "sdxl-1", "sdxl-2", "pinned-0", "pinned-1"])
        self.assertEqual([w.port for w in fleet.workers], [50061, 50062, 50063, 50071, 50072])
        self.assertEqual([w.metrics_port for w in fleet.workers[:3]], [9400, 9401, 9402])
        self.assertEqual([w.env["CUDA_VISIBLE_DEVICES"] for w in fleet.workers], ["0", "1", "2", "0,7", "1,7"])
        self.assertEqual(fleet.workers[4].env["EXTRA"], "x1")
        self.assertEqual(fleet.workers[1].tags, ("gpu", "gpu1"))
        self.assertEqual({w.user for w in fleet.workers}, {"omnirt"})
        self.assertEqual(fleet.workers[0].drain_grace_s, 45.0)
        self.assertEqual(fleet.stopwaitsecs(fleet.workers[0]), 55)

    def test_count_on_cpu_sets_no_device(self):
        """A cpu-stub worker with count gets no device variable; ascend gets ASCEND_RT_VISIBLE_DEVICES."""
        fleet = parse("""
            [[worker]]
            id = "s{n}"
            count = 2
            port = 1000
            backend = "cpu-stub"
            [[worker]]
            id = "npu{n}"
            count = 1
            port = 2000
            backend = "ascend"
        """)
        self.assertEqual(fleet.workers[0].env, {})
        self.assertEqual(fleet.workers[2].env, {"ASCEND_RT_VISIBLE_DEVICES": "0"})

    def test_every_problem_listed(self):
        """A file with many mistakes reports every one of them, one line each, in one go."""
        problems = problems_of("""
            colour = "blue"
            [supervisord]
            dir = "/tmp/x"
            logfile_backups = -1
            nonsense = 1
            [defaults]
            backend = "cuda"
            shoe_size = 42
            [[worker]]
            id = "a"
            port = 50061
            model_path = { "sdxl-base-1.0" = "/nowhere/sdxl" }
            [[worker]]
            id = "a"
            port = 50061
            [[worker]]
            id = "b"
            port = "fifty"
            models = "sdxl-base-1.0"
            [[worker]]
            id = "c"
            port = 50070
            backend = "tpu"
            [[worker]]
            id = "d"
            port = 70000
            max_concurrency = 0
            [[worker]]
            port = 50080
            colour = "red"
            [[worker]]
            id = "e-{n}"
            port = 50090
            [[worker]]
            id = "f"
            count = 2
            port = 50100
            [[worker]]
            id = "g"
            port = 50110
            user = "nobody-here"
            models = ["sdxl-xl-9000"]
        """, is_dir=lambda p: not str(p).startswith("/nowhere"))
        expected = [
            "unknown top-level key 'colour'",
            "[supervisord]: unknown key 'nonsense'",
            "[supervisord]: logfile_backups must be at least 0 (got -1)",
            "[defaults]: unknown key 'shoe_size'",
            "model_path for sdxl-base-1.0: /nowhere/sdxl is not a directory",
            "worker a: port 50061 is also used by worker a",
            "duplicate worker id 'a'",
            "worker #3 (b): port must be an integer (got a string 'fifty')",
            "worker #3 (b): models must be a list of strings",
            "worker #4 (c): unknown backend 'tpu'",
            "worker #5 (d): port 70000 is out of range 1..65535",
            "worker #5 (d): max_concurrency must be at least 1",
            "worker #6: unknown key 'colour'",
            "worker #6: missing required key 'id'",
            "worker #7 (e-{n}): id contains {n} but count is not set",
            "worker #8 (f): id 'f' must contain {n} when count > 1",
            "worker #9 (g): unknown user 'nobody-here'",
            "worker #9 (g): unknown model 'sdxl-xl-9000'",
        ]
        for text in expected:
            self.assertTrue(any(text in p for p in problems), f"{text!r} not in:\n" + "\n".join(problems))
        self.assertEqual(len(problems), len(expected), "\n".join(problems))
        self.assertTrue(all("\n" not in p for p in problems))

    def test_every_value_problem_listed_with_the_offending_value(self):
        """Wrong types and ranges in every section are each one line naming the key and the value
        given; no coercion (a boolean is not a port, a string is not a number), and the valid keys
        of the same entry are still checked (the unknown backend of a worker with a bad port)."""
        problems = problems_of("""
            [supervisord]
            logfile_maxbytes = "5XB"
            startsecs = 1.5
            stop_margin_s = 0
            socket = ""
            [defaults]
            drain_grace_s = -1
            pipeline_cache_size = true
            [[worker]]
            id = "a"
            port = true
            metrics_port = 0
            backend = "tpu"
            env = { "1BAD" = "x", GOOD = "y", LIST = [1] }
            model_path = { "sdxl-base-1.0" = "" }
            tags = ["t", 3]
        """)
        expected = [
            '[supervisord]: logfile_maxbytes must be bytes or a size like "50MB" (got a string \'5XB\')',
            "[supervisord]: startsecs must be an integer >= 0 (got a number 1.5)",
            "[supervisord]: stop_margin_s must be at least 1 (got 0)",
            "[supervisord]: socket must be a non-empty string (got a string '')",
            "[defaults]: drain_grace_s must be at least 0 (got -1)",
            "[defaults]: pipeline_cache_size must be an integer (got a boolean True)",
            "worker #1 (a): port must be an integer (got a boolean True)",
            "worker #1 (a): metrics_port 0 is out of range 1..65535",
            "worker #1 (a): unknown backend 'tpu' (one of: auto, cuda, ascend, cpu, cpu-stub)",
            "worker #1 (a): env name '1BAD' is not a valid environment variable name",
            "worker #1 (a): env LIST must be a string (got a list [1])",
            "worker #1 (a): model_path 'sdxl-base-1.0' must be a folder path string (got a string '')",
            "worker #1 (a): tags must be a list of strings (got a list ['t', 3])",
        ]
        self.assertEqual(sorted(problems), sorted(expected), "\n".join(problems))

    def test_cli_prints_every_problem_on_its_own_line(self):
        """`omnirt fleet check` on a bad file exits 2 and prints one `error:` line per problem,
        each naming the file, and no traceback."""
        path = Path(self.mktemp() + ".toml").absolute()
        path.write_text('colour = 1\n[[worker]]\nid = "a"\nport = "x"\nmax_concurrency = 0\n')
        proc = subprocess.run([sys.executable, "-m", "omnirt", "fleet", "check", str(path)], capture_output=True,
                              text=True, timeout=60, cwd=REPO)
        lines = proc.stderr.strip().splitlines()
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertEqual(len(lines), 3, proc.stderr)
        self.assertTrue(all(line.startswith(f"error: {path}: ") for line in lines), proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_empty_and_wrong_shapes(self):
        """No workers, or `worker` not an array of tables, is a problem (not a crash)."""
        self.assertIn("no [[worker]] entries", problems_of(""))
        self.assertEqual(problems_of("worker = 3"), ["worker must be an array of tables ([[worker]]) (got an integer 3)"])

    def test_socket_path_too_long(self):
        """A state dir whose socket path would exceed the unix socket limit is reported."""
        long_dir = "/tmp/" + "d" * MAX_SOCKET_PATH
        problems = problems_of(f'[supervisord]\ndir = "{long_dir}"\n[[worker]]\nid = "a"\nport = 1\n')
        self.assertEqual(len(problems), 1)
        self.assertIn("over the unix socket limit", problems[0])

    def test_env_with_both_quotes_rejected(self):
        """supervisord cannot express an env value with both quote kinds: reported, not mis-rendered."""
        problems = problems_of("""[[worker]]\nid = "a"\nport = 1\n"""
                               """env = { X = "it's \\"q\\" ok", Y = "'edge", Z = "ok 'fine'!" }\n""")
        self.assertEqual(len(problems), 2, problems)
        self.assertIn("env X may not contain", problems[0])
        self.assertIn("env Y may not contain", problems[1])


class LoadTests(SynchronousTestCase):
    def write(self, text: str, name="fleet.toml") -> Path:
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        path = folder / name
        path.write_text(text)
        return path

    def test_relative_paths_resolve_against_the_fleet_file(self):
        """dir and model_path are resolved against the fleet file's folder, not the cwd."""
        path = self.write(f'[supervisord]\ndir = "state"\nsocket = "{SHORT_SOCKET}"\n[[worker]]\nid = "a"\n'
                          'port = 1\nbackend = "cpu"\nmodel_path = { "sdxl-base-1.0" = "weights/base" }\n')
        (path.parent / "weights" / "base").mkdir(parents=True)
        fleet = load_fleet(path, strict=False)
        self.assertEqual(fleet.dir, path.parent.resolve() / "state")
        self.assertEqual(fleet.workers[0].model_path["sdxl-base-1.0"], str(path.parent.resolve() / "weights/base"))
        self.assertEqual(fleet.source, path.resolve())

    def test_state_dir_override(self):
        """-o/--dir replaces [supervisord] dir (and the socket moves with it)."""
        path = self.write('[supervisord]\ndir = "state"\n[[worker]]\nid = "a"\nport = 1\n')
        other = Path(tempfile.mkdtemp(prefix="ofl"))
        self.addCleanup(shutil.rmtree, other, True)
        fleet = load_fleet(path, state_dir=other, strict=False)
        self.assertEqual((fleet.dir, fleet.socket), (other, other / "supervisor.sock"))

    def test_bad_toml_is_one_problem(self):
        """A TOML syntax error is reported as one problem naming the file."""
        path = self.write('[[worker]\nid = "a"\n')
        with self.assertRaises(FleetError) as cm:
            load_fleet(path)
        self.assertEqual(len(cm.exception.problems), 1)
        self.assertIn("not valid TOML", cm.exception.problems[0])
        self.assertTrue(cm.exception.lines()[0].startswith(str(path)))

    def test_port_in_use_listed_with_the_other_problems(self):
        """A port already bound on 127.0.0.1 is a problem, listed next to the file's other problems."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            path = self.write(f'[supervisord]\ndir = "s"\nsocket = "{SHORT_SOCKET}"\n[[worker]]\nid = "a"\n'
                              f'port = {port}\n'
                              f'[[worker]]\nid = "b"\nport = 1\nbackend = "nope"\n')
            with self.assertRaises(FleetError) as cm:
                load_fleet(path)
        problems = cm.exception.problems
        self.assertEqual(len(problems), 2, problems)
        self.assertTrue(any(f"port {port} is already in use on 127.0.0.1" in p for p in problems), problems)
        self.assertTrue(any("unknown backend 'nope'" in p for p in problems), problems)

    def test_examples_parse(self):
        """The example fleet files in fleet/ are valid (host-independent checks)."""
        stub = load_fleet(REPO / "fleet" / "cpu-stub.toml", strict=False)
        self.assertEqual([w.backend for w in stub.workers], ["cpu-stub", "cpu-stub"])
        self.assertEqual(stub.dir, REPO / ".omnirt" / "fleet" / "cpu-stub")
        tiny = load_fleet(REPO / "fleet" / "tiny-cpu.toml", strict=False)
        self.assertEqual([w.id for w in tiny.workers], ["tiny-0", "tiny-1"])
        self.assertEqual(tiny.workers[0].model_path["sdxl-base-1.0"], str(REPO / ".omnirt/tiny/sdxl-base-1.0"))
        self.assertNotIn("CUDA_VISIBLE_DEVICES", tiny.workers[1].env)
        gpu = parse((REPO / "fleet" / "example-gpu.toml").read_text())
        self.assertEqual([(w.id, w.port, w.metrics_port, w.env["CUDA_VISIBLE_DEVICES"], w.user) for w in gpu.workers],
                         [("sdxl-0", 50061, 9461, "0", "omnirt"), ("sdxl-1", 50062, 9462, "1", "omnirt")])
        self.assertEqual(gpu.socket_owner, "omnirt")


class RenderTests(SynchronousTestCase):
    def fleet(self):
        folder = Path(self.mktemp()).resolve()
        return parse(f"""
            [supervisord]
            dir = "{folder}"
            socket = "{SHORT_SOCKET}"
            logfile_backups = 3
            [defaults]
            backend = "cpu-stub"
            drain_grace_s = 12.5
            [[worker]]
            id = "w{{n}}"
            count = 2
            port = 50200
            metrics_port = 9300
            models = ["sdxl-base-1.0"]
            tags = ["t{{n}}"]
            env = {{ GREETING = "50% off, \\"today\\" only", PLAIN = "a b" }}
            model_path = {{ "sdxl-base-1.0" = "/m/base" }}
        """)

    def conf(self, fleet):
        parser = configparser.RawConfigParser(strict=True)
        parser.read_string(render_conf(fleet))
        return parser

    def test_supervisord_sections(self):
        """unix socket (0700) in the fleet dir, pidfile/logfile there, rpcinterface, supervisorctl serverurl."""
        fleet = self.fleet()
        conf = self.conf(fleet)
        d = str(fleet.dir)
        self.assertEqual(conf["unix_http_server"]["file"], SHORT_SOCKET)
        self.assertEqual(conf["unix_http_server"]["chmod"], "0700")
        self.assertEqual(conf["supervisord"]["pidfile"], f"{d}/supervisord.pid")
        self.assertEqual(conf["supervisord"]["logfile"], f"{d}/supervisord.log")
        self.assertEqual(conf["supervisord"]["nodaemon"], "false")
        self.assertEqual(conf["supervisord"]["identifier"], f"omnirt-fleet:{d}/supervisord.conf")
        self.assertEqual(conf["rpcinterface:supervisor"]["supervisor.rpcinterface_factory"],
                         "supervisor.rpcinterface:make_main_rpcinterface")
        self.assertEqual(conf["supervisorctl"]["serverurl"], f"unix://{SHORT_SOCKET}")
        self.assertNotIn("inet_http_server", conf)

    def test_program_sections(self):
        """One [program:omnirt-worker-<id>] per worker: this python's `-m omnirt worker` with the worker's
        flags, autorestart, startsecs, TERM with stopwaitsecs above the drain grace, rotated logs, user."""
        fleet = self.fleet()
        conf = self.conf(fleet)
        programs = [s for s in conf.sections() if s.startswith("program:")]
        self.assertEqual(programs, ["program:omnirt-worker-w0", "program:omnirt-worker-w1"])
        p = conf["program:omnirt-worker-w1"]
        argv = shlex.split(p["command"].replace("%%", "%"))
        self.assertEqual(argv[:4], [sys.executable, "-m", "omnirt", "worker"])
        self.assertTrue(Path(argv[0]).is_absolute())
        flags = dict(zip(argv[4::2], argv[5::2], strict=False))
        self.assertEqual(flags["--port"], "50201")
        self.assertEqual(flags["--worker-id"], "w1")
        self.assertEqual(flags["--backend"], "cpu-stub")
        self.assertEqual(flags["--host"], "127.0.0.1")
        self.assertEqual(flags["--models"], "sdxl-base-1.0")
        self.assertEqual(flags["--tags"], "t1")
        self.assertEqual(flags["--model-path"], "sdxl-base-1.0=/m/base")
        self.assertEqual(flags["--metrics-port"], "9301")
        self.assertEqual(flags["--drain-grace-s"], "12.5")
        self.assertEqual(flags["--max-concurrency"], "1")
        self.assertEqual(p["autostart"], "true")
        self.assertEqual(p["autorestart"], "true")
        self.assertEqual(p["startsecs"], "2")
        self.assertEqual(p["stopsignal"], "TERM")
        self.assertEqual(int(p["stopwaitsecs"]), 13 + 10)
        self.assertGreater(int(p["stopwaitsecs"]), 12.5)
        self.assertEqual(p["user"], "root")
        self.assertEqual(p["stdout_logfile"], f"{fleet.dir}/logs/omnirt-worker-w1.log")
        self.assertEqual(p["stdout_logfile_maxbytes"], "50MB")
        self.assertEqual(p["stdout_logfile_backups"], "3")
        self.assertEqual(p["redirect_stderr"], "true")

    def test_environment_round_trips_through_supervisor(self):
        """The environment line parses with supervisor's own parser back to the fleet's env (+ PYTHONUNBUFFERED),
        with '%' escaped against supervisor's %(name)s expansion."""
        fleet = self.fleet()
        raw = self.conf(fleet)["program:omnirt-worker-w0"]["environment"]
        env = dict_of_key_value_pairs(raw.replace("%%", "%"))
        self.assertEqual(env["PYTHONUNBUFFERED"], "1")
        self.assertEqual(env["GREETING"], '50% off, "today" only')
        self.assertEqual(env["PLAIN"], "a b")
        self.assertEqual(env["OMNIRT_FLEET_WORKER"], "w0")

    def test_supervisor_accepts_the_conf(self):
        """supervisord's own config loader reads the rendered file: both programs, commands, env, stop settings."""
        from supervisor.options import ServerOptions

        fleet = self.fleet()
        write_conf(fleet)
        options = ServerOptions()
        options.realize(args=["-c", str(fleet.conf_path)])
        groups = {g.name: g for g in options.process_group_configs}
        self.assertEqual(sorted(groups), ["omnirt-worker-w0", "omnirt-worker-w1"])
        proc = groups["omnirt-worker-w0"].process_configs[0]
        self.assertEqual(proc.environment["GREETING"], '50% off, "today" only')
        self.assertEqual(proc.stopsignal, 15)
        self.assertEqual(proc.stopwaitsecs, 23)
        self.assertTrue(proc.autorestart)
        self.assertEqual(shlex.split(proc.command)[0], sys.executable)
        self.assertEqual(options.server_configs[0]["file"], str(fleet.socket))
        self.assertEqual(options.server_configs[0]["chmod"], 0o700)

    def test_render_is_stable_and_written_once(self):
        """Rendering is deterministic; write_conf rewrites the file only when the text changes."""
        fleet = self.fleet()
        self.assertEqual(render_conf(fleet), render_conf(fleet))
        self.assertTrue(write_conf(fleet))
        self.assertFalse(write_conf(fleet))
        self.assertTrue((fleet.dir / "logs").is_dir())


# -- the gateway side ---------------------------------------------------------------------------


class FakeSupervisor:
    """A recording stand-in for AsyncSupervisorClient (the real one is exercised in the integration tests)."""

    def __init__(self, infos):
        self.infos = infos
        self.calls = []
        self.down = False

    def call(self, method, *params, timeout=None):
        self.calls.append(method)
        if self.down:
            return fail(ConnectionRefusedError("no supervisord"))
        if method == "supervisor.getAllProcessInfo":
            return succeed([dict(i) for i in self.infos])
        return succeed(True)

    def close(self):
        return succeed(None)


def info(name, state, pid=100, spawnerr="", exitstatus=0, description=""):
    return {"name": f"omnirt-worker-{name}", "group": f"omnirt-worker-{name}", "statename": state, "pid": pid,
            "spawnerr": spawnerr, "exitstatus": exitstatus, "description": description}


class WatcherTests(TestCase):
    def setUp(self):
        self.fleet = parse('[[worker]]\nid = "a"\nport = 1\n[[worker]]\nid = "b"\nport = 2\n')
        self.h = Harness(self, [ControlledWorker("a"), ControlledWorker("b")])
        self.sup = FakeSupervisor([info("a", "RUNNING", 11), info("b", "RUNNING", 12)])
        self.gf = GatewayFleet(self.fleet, self.h.clock, client=self.sup, control=object(), poll_interval_s=2.0)
        self.h.api.readiness = self.gf.readiness

    @inlineCallbacks
    def start(self):
        yield self.h.start()
        self.gf.watch(self.h.pool)
        self.addCleanup(self.gf.watcher.stop)

    def states(self, ready):
        return {w["worker_id"]: (w["state"], w["last_error"]) for w in ready["workers"]}

    @inlineCallbacks
    def test_backoff_shows_in_readyz_and_metrics(self):
        """A worker supervisord reports in BACKOFF leaves rotation at once: /readyz shows supervisor's
        reason for it, omnirt_worker_up is 0; RUNNING again and a good probe bring it back."""
        yield self.start()
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 200, ready)
        self.assertEqual(self.states(ready), {"a": ("healthy", ""), "b": ("healthy", "")})
        self.sup.infos[1] = info("b", "BACKOFF", 0, spawnerr="Exited too quickly (process log may have details)")
        self.h.clock.advance(2.0)
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 200)  # a is still serving
        state, reason = self.states(ready)["b"]
        self.assertNotEqual(state, "healthy")
        self.assertEqual(reason, "supervisor: BACKOFF: Exited too quickly (process log may have details)")
        self.assertEqual(ready["fleet"]["workers"]["b"]["supervisor_state"], "BACKOFF")
        resp, metrics = yield self.h.request("GET", "/metrics")
        self.assertIn(b'omnirt_worker_up{worker_id="b"} 0.0', metrics)
        self.assertIn(b'omnirt_worker_up{worker_id="a"} 1.0', metrics)
        self.sup.infos[1] = info("b", "RUNNING", 13)
        self.h.clock.advance(2.0)  # watcher clears the reason; the health loop (same tick) probes ok
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(self.states(ready)["b"], ("healthy", ""))
        resp, metrics = yield self.h.request("GET", "/metrics")
        self.assertIn(b'omnirt_worker_up{worker_id="b"} 1.0', metrics)

    @inlineCallbacks
    def test_fatal_and_exited_reasons(self):
        """FATAL and EXITED carry supervisor's reason (spawn error, exit status) into last_error."""
        yield self.start()
        self.sup.infos[0] = info("a", "FATAL", 0, spawnerr="Exited too quickly")
        self.sup.infos[1] = info("b", "EXITED", 0, exitstatus=2)
        self.h.clock.advance(2.0)
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(self.states(ready)["a"][1], "supervisor: FATAL: Exited too quickly")
        self.assertEqual(self.states(ready)["b"][1], "supervisor: EXITED: exit status 2")

    @inlineCallbacks
    def test_new_pid_takes_worker_out_until_probed(self):
        """A new pid under the same program (restarted between polls) marks the worker suspect once."""
        yield self.start()
        self.sup.infos[0] = info("a", "STARTING", 99)
        self.h.pool.stop()  # no probe in between: observe the watcher alone
        yield self.gf.watcher.poll()
        self.assertEqual(self.h.pool.get("a").state, "suspect")
        self.assertEqual(self.h.pool.get("a").external_reason, "supervisor: STARTING")
        self.assertEqual(self.h.pool.get("b").state, "healthy")

    @inlineCallbacks
    def test_supervisord_unreachable_leaves_workers_alone(self):
        """If supervisord does not answer, the workers keep the state their own probes give them and
        /readyz says supervisord is unreachable."""
        yield self.start()
        self.sup.down = True
        self.h.clock.advance(2.0)
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 200)
        self.assertEqual(self.states(ready), {"a": ("healthy", ""), "b": ("healthy", "")})
        self.assertIn("supervisord unreachable", ready["fleet"]["supervisord"])

    @inlineCallbacks
    def test_readiness_waits_for_every_fleet_worker_once(self):
        """/readyz stays 503 until every fleet worker has been healthy once (or supervisord gave up on it)."""
        self.h.worker("b").healthy = False
        self.sup.infos[1] = info("b", "STARTING", 12)
        yield self.start()
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 503)
        self.assertIn("fleet starting: waiting for b", ready["reason"])
        self.h.worker("b").healthy = True
        self.h.clock.advance(2.0)
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 200, ready)
        self.assertTrue(ready["fleet"]["started"])
        # later outages of one worker do not make the gateway unready while another serves
        self.h.worker("b").healthy = False
        self.sup.infos[1] = info("b", "BACKOFF", 0)
        self.h.clock.advance(2.0)
        code, _, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_fatal_worker_does_not_block_startup(self):
        """A worker supervisord gave up on (FATAL) does not keep the gateway unready forever."""
        self.h.worker("b").healthy = False
        self.sup.infos[1] = info("b", "FATAL", 0, spawnerr="Exited too quickly")
        yield self.start()
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 200, ready)

    def test_watcher_polls_on_its_clock(self):
        """The watcher polls getAllProcessInfo every interval on the clock it was given, one poll at a time."""
        from twisted.internet.task import Clock

        from omnirt.workers.pool import WorkerPool

        clock = Clock()
        pool = WorkerPool(clock, [ControlledWorker("a"), ControlledWorker("b")])
        watcher = FleetWatcher(clock, self.sup, pool, self.fleet, interval_s=2.0)
        watcher.start()
        self.addCleanup(watcher.stop)
        clock.advance(2.0)
        clock.advance(2.0)
        self.assertEqual(self.sup.calls, ["supervisor.getAllProcessInfo"] * 3)
        self.assertEqual(watcher.infos["a"]["pid"], 11)


# -- systemd units ------------------------------------------------------------------------------

UNITS = ("omnirt-gateway.service", "omnirt-worker@.service", "omnirt-fleet.service")


class SystemdUnitTests(SynchronousTestCase):
    def unit(self, name):
        parser = configparser.RawConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read_string((REPO / "etc" / "systemd" / name).read_text())
        return parser

    def test_units_parse_with_required_keys(self):
        """Each unit parses and has what the issue asks: start command, restart policy, TERM with a stop
        timeout above the drain grace, and (gateway, worker) the hardening options."""
        for name in UNITS:
            u = self.unit(name)
            self.assertEqual({"Unit", "Service", "Install"} - set(u.sections()), set(), name)
            s = u["Service"]
            self.assertIn("ExecStart", s, name)
            self.assertEqual(s["Restart"], "on-failure", name)
            self.assertEqual(s["KillSignal"], "SIGTERM", name)
            self.assertEqual(s["KillMode"], "mixed", name)
            self.assertGreater(int(s["TimeoutStopSec"]), 30, name)  # default --drain-grace-s / shutdown grace
            self.assertEqual(u["Install"]["WantedBy"], "multi-user.target", name)
        for name in ("omnirt-gateway.service", "omnirt-worker@.service"):
            s = self.unit(name)["Service"]
            self.assertEqual(s["NoNewPrivileges"], "yes", name)
            self.assertEqual(s["ProtectSystem"], "strict", name)
            self.assertEqual(s["PrivateTmp"], "yes", name)
            self.assertIn("/var/lib/omnirt", s["ReadWritePaths"], name)
        gateway = self.unit("omnirt-gateway.service")["Service"]
        self.assertIn("serve", gateway["ExecStart"])
        self.assertIn("--fleet", gateway["ExecStart"])
        self.assertIn("/readyz", gateway["ExecStartPost"])
        worker = self.unit("omnirt-worker@.service")["Service"]
        self.assertEqual(worker["EnvironmentFile"], "/etc/omnirt/worker-%i.env")
        self.assertIn("--worker-id %i", worker["ExecStart"])
        fleet = self.unit("omnirt-fleet.service")["Service"]
        self.assertIn("fleet render", fleet["ExecStartPre"])
        self.assertIn("supervisord -n -c", fleet["ExecStart"])
        self.assertGreater(int(fleet["TimeoutStopSec"]), 70)  # example-gpu: drain 60 + margin 10

    def test_systemd_analyze_verify(self):
        """`systemd-analyze verify` accepts the units without a warning (paths pointed at this venv)."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise self.skipTest("systemd-analyze is not installed (the parser test above still ran)")
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        venv = str(Path(sys.executable).parent.parent)
        for name in UNITS:
            text = (REPO / "etc" / "systemd" / name).read_text().replace("/opt/omnirt/.venv", venv)
            (folder / name).write_text(text)
        shutil.copy(folder / "omnirt-worker@.service", folder / "omnirt-worker@sdxl-0.service")
        names = [str(folder / n) for n in ("omnirt-gateway.service", "omnirt-fleet.service",
                                           "omnirt-worker@sdxl-0.service")]
        proc = subprocess.run([tool, "verify", *names], capture_output=True, text=True, timeout=60)
        output = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                           if "Failed to connect to bus" not in line)
        self.assertEqual((proc.returncode, output), (0, ""))
