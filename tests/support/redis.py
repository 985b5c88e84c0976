"""Start a private redis-server on a free loopback port for integration tests (never the system one)."""

from __future__ import annotations

import datetime
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import quote

from tests.support.procs import Proc, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) from the server."""


def _read_reply(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        try:
            return data.decode()
        except UnicodeDecodeError:
            return data
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_read_reply(f) for _ in range(n)]
    raise ConnectionError(f"unexpected redis reply {line[:40]!r}")


def _encode(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RedisServer:
    """One redis-server child process (loopback only, data in ``directory``)."""

    def __init__(self, directory: Path, *, appendonly: bool = False, password: str | None = None,
                 tls: bool = False):
        self.directory = Path(directory).resolve()  # the child runs in the repo root
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
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
        return argv

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

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.tls:
            ctx = ssl.create_default_context(cafile=str(self.cert))
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
        return sock

    def command(self, *args, timeout: float = 5.0):
        """Run one command synchronously on a fresh connection (bounded by ``timeout``)."""
        with self._connect(timeout) as sock:
            f = sock.makefile("rb")
            if self.password is not None:
                sock.sendall(_encode("AUTH", self.password))
                _read_reply(f)
            sock.sendall(_encode(*args))
            return _read_reply(f)

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
