"""Start a private redis-server on a free loopback port for integration tests (never the system one)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from tests.support.procs import Proc, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) from the server."""


def redis_cli(port: int, *args, password: str | None = None, cacert: Path | None = None,
              timeout: float = 5.0, host: str = "127.0.0.1", user: str | None = None):
    """Run one command through ``redis-cli`` (RESP2, JSON output) on ``host``:``port`` and return
    the reply as Python (str, int, None, lists); an error reply raises RedisReplyError, a server
    that does not answer raises ConnectionError. Bounded by ``timeout``."""
    argv = [REDIS_CLI, "-h", host, "-p", str(port), "-2", "--json"]
    if cacert is not None:
        argv += ["--tls", "--cacert", str(cacert)]
    if user is not None:
        argv += ["--user", user]
    env = dict(os.environ)
    env.pop("REDISCLI_AUTH", None)
    if password is not None:
        env["REDISCLI_AUTH"] = password  # not on the command line
    try:
        done = subprocess.run([*argv, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
    except subprocess.TimeoutExpired:
        raise ConnectionError(f"redis on {port}: no reply in {timeout}s") from None
    out = done.stdout.rstrip("\n")
    if done.returncode != 0 or out.startswith("Could not connect"):
        raise ConnectionError(f"redis on {port}: {(done.stderr or out).strip()[:200]}")
    if out.startswith("error:"):
        raise RedisReplyError(json.loads(out[len("error:"):]))
    try:
        return json.loads(out)
    except ValueError:
        return out  # INFO / CLIENT LIST print their text as it is


class RedisServer:
    """One redis-server child process (loopback only, data in ``directory``)."""

    def __init__(self, directory: Path, *, appendonly: bool = False, password: str | None = None,
                 tls: bool = False, extra_args: list[str] | None = None):
        self.directory = Path(directory).resolve()  # the child runs in the repo root
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.extra_args = list(extra_args or [])
        self.port = 0
        self.proc: Proc | None = None
        self._starts = 0
        if tls:
            self.cert, self.key = _self_signed_cert(self.directory)

    # -- lifecycle ---------------------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                "--protected-mode", "no", "--daemonize", "no", "--loglevel", "notice"]
        if self.tls:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                     "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.cert),
                     "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv + self.extra_args

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart on the same port and data directory) and wait until PING answers."""
        if self.port == 0:
            self.port = free_port()
        self._starts += 1
        self.proc = Proc(self.argv(), self.directory / f"redis-{self._starts}.log")
        self.proc.wait_until(self.pingable, timeout=timeout, what=f"answering PING on {self.port}")

    def stop(self) -> None:
        """SIGKILL (no shutdown save: what survives is what AOF already wrote)."""
        if self.proc is not None:
            self.proc.signal(signal.SIGCONT)  # a stopped process still dies, but be explicit
            self.proc.stop()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGCONT)

    # -- client side -------------------------------------------------------------------------

    def url(self, *, db: int | None = None, password: str | None = None) -> str:
        password = self.password if password is None else password
        auth = f":{quote(password, safe='')}@" if password else ""
        scheme = "rediss" if self.tls else "redis"
        path = f"/{db}" if db is not None else ""
        query = f"?ssl_ca_certs={quote(str(self.cert))}" if self.tls else ""
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{auth}{host}:{self.port}{path}{query}"

    def command(self, *args, timeout: float = 5.0):
        """Run one command synchronously through ``redis-cli`` (bounded by ``timeout``)."""
        return redis_cli(self.port, *args, password=self.password, cacert=self.cert if self.tls else None,
                         timeout=timeout)

    def pingable(self) -> bool:
        try:
            return self.command("PING", timeout=0.5) == "PONG"
        except (OSError, ConnectionError, RedisReplyError):
            return False

    def clients(self) -> list[dict[str, str]]:
        """``CLIENT LIST`` parsed into one dict per connection."""
        out = []
        for line in self.command("CLIENT", "LIST").splitlines():
            fields = dict(part.split("=", 1) for part in line.split(" ") if "=" in part)
            out.append(fields)
        return out

    def wait_for_aof_fsync(self, seconds: float = 1.5) -> None:
        """``appendfsync everysec``: give the once-a-second fsync time to run."""
        time.sleep(seconds)


def start_redis(testcase, **kw) -> RedisServer:
    """A fresh redis-server in the test's temp dir, SIGKILLed (and SIGCONTed first) at cleanup."""
    server = RedisServer(Path(testcase.mktemp()), **kw)
    testcase.addCleanup(server.stop)
    server.start()
    return server


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` / 127.0.0.1 (it is also its own CA)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "redis.crt"
    key_path = directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption())
    )
    return cert_path, key_path


class SentinelTopology:
    """A primary, ``replicas`` replicas and ``sentinels`` ``redis-server --sentinel`` processes on
    free loopback ports, tuned for fast failovers on loopback (down-after 1 s, failover
    timeout 3 s). ``master_port()`` asks the Sentinels; ``kill_master()`` SIGKILLs the current
    master; ``restart_as_replica(server)`` brings a killed node back replicating the new one."""

    master_name = "omnirt"

    def __init__(self, directory: Path, *, replicas: int = 1, sentinels: int = 3, password: str | None = None,
                 sentinel_password: str | None = None, tls: bool = False,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000, appendonly: bool = True):
        self.directory = Path(directory).resolve()
        self.password = password
        #: the Sentinels' own requirepass (and the one they use with each other)
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        # a full resync (a node back as a replica) starts at once instead of after 5 s
        extra = ["--repl-diskless-sync-delay", "0"]
        self.tls = tls
        self.cert = self.key = None
        if tls:  # one certificate (localhost, 127.0.0.1) for every node and Sentinel
            self.directory.mkdir(parents=True, exist_ok=True)
            self.cert, self.key = _self_signed_cert(self.directory)
            extra += ["--tls-replication", "yes"]
        self.primary = RedisServer(self.directory / "primary", appendonly=appendonly, password=password,
                                   extra_args=extra, tls=tls)
        self.replicas = [RedisServer(self.directory / f"replica{i}", appendonly=appendonly, password=password,
                                     extra_args=extra, tls=tls) for i in range(replicas)]
        for node in self.nodes if tls else ():
            node.cert, node.key = self.cert, self.key
        self.sentinel_ports: list[int] = []
        self.sentinel_procs: list[Proc] = []
        self._n_sentinels = sentinels

    @property
    def nodes(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    def start(self, timeout: float = 15.0) -> None:
        self.primary.start()
        for replica in self.replicas:
            self._start_replica(replica, self.primary.port)
        self.wait_replicas_online(self.primary, len(self.replicas), timeout=timeout)
        for i in range(self._n_sentinels):
            port = free_port()
            conf = self.directory / f"sentinel{i}.conf"
            lines = [f"port {0 if self.tls else port}", "bind 127.0.0.1", "protected-mode no", f"dir {self.directory}",
                     f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary.port} 2",
                     f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                     f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                     f"sentinel parallel-syncs {self.master_name} 1"]
            if self.password:
                lines.append(f"sentinel auth-pass {self.master_name} \"{self.password}\"")
            if self.tls:
                lines += [f"tls-port {port}", f"tls-cert-file {self.cert}", f"tls-key-file {self.key}",
                          f"tls-ca-cert-file {self.cert}", "tls-replication yes", "tls-auth-clients no"]
            if self.sentinel_password:
                lines += [f"requirepass \"{self.sentinel_password}\"",
                          f"sentinel sentinel-pass \"{self.sentinel_password}\""]
            conf.write_text("\n".join(lines) + "\n")
            proc = Proc([REDIS_SERVER, str(conf), "--sentinel"], self.directory / f"sentinel{i}.log")
            self.sentinel_procs.append(proc)
            self.sentinel_ports.append(port)
        for port, proc in zip(self.sentinel_ports, self.sentinel_procs, strict=True):
            proc.wait_until(lambda p=port: self._sentinel_knows_all(p), timeout=timeout,
                            what=f"Sentinel on {port} seeing the replicas and the other Sentinels")

    def _start_replica(self, server: RedisServer, master_port: int) -> None:
        extra = ["--replicaof", "127.0.0.1", str(master_port)]
        if self.password:
            extra += ["--masterauth", self.password]
        if server.port == 0:
            server.port = free_port()
        server._starts += 1
        server.proc = Proc(server.argv() + extra, server.directory / f"redis-{server._starts}.log")
        server.proc.wait_until(server.pingable, timeout=10.0, what=f"answering PING on {server.port}")

    def _sentinel_knows_all(self, port: int) -> bool:
        try:
            replicas = self.sentinel_command(port, "SENTINEL", "REPLICAS", self.master_name)
            sentinels = self.sentinel_command(port, "SENTINEL", "SENTINELS", self.master_name)
        except (ConnectionError, RedisReplyError):
            return False
        return len(replicas) >= len(self.replicas) and len(sentinels) >= self._n_sentinels - 1

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            proc.stop()
        for node in self.nodes:
            node.stop()

    # -- Sentinel's view ---------------------------------------------------------------------

    def sentinel_command(self, port: int, *args, timeout: float = 1.0):
        """One command to the Sentinel on ``port`` (with its password)."""
        return redis_cli(port, *args, password=self.sentinel_password, timeout=timeout, cacert=self.cert)

    def url(self, *, db: int | None = None) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        path = f"/{db}" if db is not None else ""
        params = []
        if self.sentinel_password:
            params.append(f"sentinel_password={quote(self.sentinel_password, safe='')}")
        if self.tls:
            params.append(f"ssl_ca_certs={quote(str(self.cert))}")
        query = f"?{'&'.join(params)}" if params else ""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{auth}{hosts}/{self.master_name}{path}{query}"

    def master_port(self) -> int | None:
        """The master port the Sentinels agree on (a majority), or None."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                addr = self.sentinel_command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            except (ConnectionError, RedisReplyError):
                continue
            if addr:
                votes[int(addr[1])] = votes.get(int(addr[1]), 0) + 1
        best = max(votes.items(), key=lambda kv: kv[1], default=(None, 0))
        return best[0] if best[1] * 2 > len(self.sentinel_ports) else None

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def master(self) -> RedisServer:
        port = self.master_port()
        assert port is not None, "the Sentinels agree on no master"
        return self.node(port)

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master; returns it (to restart later)."""
        old = self.master()
        old.stop()
        return old

    def wait_new_master(self, old_port: int, timeout: float = 20.0) -> RedisServer:
        """Until the Sentinels agree on a master other than ``old_port`` that says it is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.master_port()
            if port is not None and port != old_port:
                node = self.node(port)
                try:
                    if node.command("ROLE", timeout=1.0)[0] == "master":
                        return node
                except (ConnectionError, RedisReplyError):
                    pass
            time.sleep(0.05)
        raise AssertionError(f"no failover away from {old_port} within {timeout}s")

    def restart_as_replica(self, server: RedisServer, timeout: float = 15.0) -> None:
        """Start a killed node again as a replica of the current master (its AOF is replaced by a
        full sync), and wait until the master counts it online."""
        master = self.master()
        self._start_replica(server, master.port)
        deadline = time.monotonic() + timeout
        while True:  # Sentinel may reconfigure meanwhile: follow whatever master it names
            current = self.master_port()
            try:
                if current is not None:
                    self.wait_replicas_online(self.node(current), len(self.replicas), timeout=0.5)
                    return
            except AssertionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{server.port} not an online replica within {timeout}s")
            time.sleep(0.05)

    @staticmethod
    def wait_replicas_online(master: RedisServer, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = master.command("INFO", "replication", timeout=1.0)
            except (ConnectionError, RedisReplyError):
                info = ""
            online = sum(1 for line in str(info).splitlines()
                         if line.startswith("slave") and "state=online" in line)
            if online >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{count} replica(s) of {master.port} not online within {timeout}s")


def start_sentinel_topology(testcase, **kw) -> SentinelTopology:
    """A fresh primary + replica(s) + Sentinels in the test's temp dir, all SIGKILLed at cleanup."""
    topo = SentinelTopology(Path(testcase.mktemp()), **kw)
    testcase.addCleanup(topo.stop)
    topo.start()
    return topo
