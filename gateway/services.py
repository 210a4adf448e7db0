"""Server processes the gateway starts for itself: an embedded redis-server (mosquitto later).

The demo and the tests need a Redis that nobody has to configure, so they start their own on
a free loopback port with a throw-away data directory. The same mechanics (find the binary,
pick a free port, write a config, spawn, wait until it answers, stop politely then firmly)
serve every such server, so they live in :class:`_ServerProcess`; a subclass only says how
to configure the server and how to tell that it is ready.

Everything here is synchronous (it is process management, done once at start-up); the
async context manager runs the blocking parts in a worker thread so an event loop is never
stalled while a server boots.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from gateway.errors import GatewayError

__all__ = [
    "MosquittoServer",
    "MqttAcl",
    "MqttTls",
    "RedisServer",
    "ServiceError",
    "ServiceNotInstalled",
    "embedded_redis",
    "free_port",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class ServiceError(GatewayError):
    """An embedded server could not be started or stopped."""


class ServiceNotInstalled(ServiceError):
    """The server binary is not on PATH; the message says which package provides it."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it back, close).

    Another process may take it before the caller binds it; callers retry on collision.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    """Finalizer: a server must not outlive a test process that forgot to stop it."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _pid_listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` has a listening TCP socket on ``port``; None if /proc is absent."""
    inodes: set[str] = set()
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        found_table = True
        for row in rows:
            cols = row.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; column 9 is the inode
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not found_table:
        return None
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


class _ServerProcess(abc.ABC):
    """A server process on a loopback port with its own data directory and log file.

    Subclasses provide the binary name, the Debian package that ships it, the command line
    (usually a config file written into the data directory) and a readiness probe.
    """

    #: Executable looked up with :func:`shutil.which`.
    binary: str = ""
    #: Debian package to suggest when the binary is missing.
    package: str = ""
    #: How often a port collision at start-up is retried with a new port.
    port_attempts: int = 5

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        host: str = LOOPBACK,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        executable: str | None = None,
    ) -> None:
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._executable = executable
        self._fixed_port = port
        self._port: int | None = port
        # Absolute once, here: the server runs with its cwd set to the data dir, where a
        # relative config path would be looked up again (and a later chdir must not move it).
        self._given_dir = Path(data_dir).absolute() if data_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], _ServerProcess] | None = None

    # -- what a subclass says -------------------------------------------------------------

    @abc.abstractmethod
    def _command(self, executable: str, data_dir: Path, port: int) -> list[str]:
        """The command line; may write a config file into ``data_dir`` first."""

    def _ready(self) -> bool:
        """True once *our* process listens on the port (not whoever else may hold it).

        A bare TCP connect could reach another server that already had the port, while ours
        is about to fail with "address in use"; so look the listening socket up in /proc and
        check that our process owns it. Without /proc, fall back to a connect.
        """
        if self._proc is None:
            return False
        owned = _pid_listens_on(self._proc.pid, self.port)
        if owned is not None:
            return owned
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    @staticmethod
    def _port_in_use(log_text: str) -> bool:
        return "Address already in use" in log_text

    # -- state ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServiceError(f"{self.binary} has not been started yet")
        return self._port

    @property
    def data_dir(self) -> Path:
        """Where the server keeps its data, config and log (kept across :meth:`restart`)."""
        if self._given_dir is not None:
            return self._given_dir
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"mgms-{self.binary}-")
        return Path(self._tmp.name)

    @property
    def log_file(self) -> Path:
        return self.data_dir / f"{self.binary}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _find_executable(self) -> str:
        # Debian puts some daemons (mosquitto) in /usr/sbin, which a user's PATH may lack
        exe = (
            self._executable
            or shutil.which(self.binary)
            or shutil.which(self.binary, path="/usr/sbin:/sbin")
        )
        if exe is None:
            raise ServiceNotInstalled(
                f"{self.binary} not found on PATH; install it with "
                f"`apt-get install {self.package}` (or point the config at an existing server)"
            )
        return exe

    def _log_tail(self, lines: int = 20, since: int = 0) -> str:
        """The end of the log, from byte ``since`` on (the log is appended to across runs)."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(since)
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and return once it answers; raise ServiceError if it does not."""
        if self.running:
            return
        exe = self._find_executable()
        data_dir = self.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port is not None else self.port_attempts
        for attempt in range(1, attempts + 1):
            # On restart the port stays the same so clients reconnect to the same url.
            port = self._port if self._port is not None else free_port(self.host)
            self._port = port
            try:
                self._spawn(exe, data_dir, port)
                return
            except _PortTaken:
                log.info("%s: port %d taken (%d/%d)", self.binary, port, attempt, attempts)
                if self._fixed_port is None:
                    self._port = None
        what = (
            f"port {self._fixed_port} is already in use"
            if self._fixed_port is not None
            else f"no free port after {attempts} attempts"
        )
        raise ServiceError(f"{self.binary}: {what}; log {self.log_file}:\n{self._log_tail()}")

    def _spawn(self, exe: str, data_dir: Path, port: int) -> None:
        cmd = self._command(exe, data_dir, port)
        log.debug("starting %s", " ".join(cmd))
        with open(self.log_file, "ab") as out:
            log_start = out.tell()
            out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=data_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the gateway must not kill it first
            )
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill_quietly, proc)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if proc.poll() is not None:
                self._proc = None
                self._finalizer.detach()
                tail = self._log_tail(since=log_start)
                if self._port_in_use(tail):
                    raise _PortTaken
                raise ServiceError(
                    f"{self.binary} exited with code {proc.returncode} at start-up; "
                    f"log {self.log_file}:\n{tail}"
                )
            if self._ready():
                log.info("%s running on %s:%d (pid %d, data %s)", self.binary, self.host, port, proc.pid, data_dir)
                return
            if time.monotonic() > deadline:
                self._terminate(proc)
                self._proc = None
                raise ServiceError(
                    f"{self.binary} did not answer within {self.start_timeout_s:g} s; "
                    f"log {self.log_file}:\n{self._log_tail(since=log_start)}"
                )
            time.sleep(0.02)

    def _terminate(self, proc: subprocess.Popen[bytes], *, hard: bool = False) -> None:
        if proc.poll() is None:
            if hard:
                proc.kill()
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", self.binary, proc.pid)
                proc.kill()
                proc.wait(timeout=self.stop_timeout_s)

    def stop(self, *, hard: bool = False) -> None:
        """Stop the server; keep the data directory (see :meth:`close`).

        ``hard=True`` sends SIGKILL at once, which is how tests simulate a crash: only what
        the server had made durable survives.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._terminate(proc, hard=hard)
        if self._finalizer is not None:
            self._finalizer.detach()
        log.info("%s on port %s stopped (code %s)", self.binary, self._port, proc.returncode)

    def restart(self, *, hard: bool = False) -> None:
        """Stop and start again on the same port with the same data directory."""
        self.stop(hard=hard)
        # The old socket may linger a moment; a few quick retries on the same port.
        for _ in range(self.port_attempts):
            try:
                self._spawn(self._find_executable(), self.data_dir, self.port)
                return
            except _PortTaken:
                time.sleep(0.2)
        raise ServiceError(f"{self.binary}: port {self.port} stayed busy; cannot restart")

    def close(self) -> None:
        """Stop the server and remove the data directory if it was a temporary one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)


class _PortTaken(Exception):
    """Internal: the server exited because its port was taken meanwhile."""


class RedisServer(_ServerProcess):
    """An embedded ``redis-server`` with AOF persistence, for the demo and the tests.

    AOF with ``appendfsync always`` (the default) means every write Redis acknowledged is on
    disk before the reply, so :meth:`restart` - even ``restart(hard=True)`` - brings back
    everything the gateway was told was stored. RDB snapshots are off (``save ""``): AOF is
    the single source of durability and there is no fork pause.
    """

    binary = "redis-server"
    package = "redis-server"

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        host: str = LOOPBACK,
        appendfsync: str = "always",
        appendonly: bool = True,
        extra_config: dict[str, str] | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        executable: str | None = None,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        super().__init__(
            data_dir=data_dir,
            port=port,
            host=host,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
            executable=executable,
        )
        self.appendfsync = appendfsync
        self.appendonly = appendonly
        self.extra_config = dict(extra_config or {})

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self, executable: str, data_dir: Path, port: int) -> list[str]:
        conf = data_dir / "redis.conf"
        settings = {
            "bind": self.host,
            "port": str(port),
            "dir": str(data_dir),
            "daemonize": "no",
            # loopback only, no password: protected mode would only get in the way
            "protected-mode": "no",
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
            "save": '""',
            "logfile": '""',  # stdout, which goes to our log file
            "databases": "16",
            **self.extra_config,
        }
        conf.write_text(
            "# written by gateway.services.RedisServer\n"
            + "".join(f"{k} {v}\n" for k, v in settings.items()),
            encoding="utf-8",
        )
        return [executable, str(conf)]

    def _ready(self) -> bool:
        """Our redis-server (by pid) answers PING with +PONG, i.e. it has loaded its AOF.

        While it replays the AOF Redis answers -LOADING; the pid check makes sure we are not
        talking to another server that held the port first.
        """
        if self._proc is None:
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.settimeout(1.0)
                s.sendall(b"PING\r\nINFO server\r\n")
                data = b""
                while b"process_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        return False
                    data += chunk
        except OSError:
            return False
        if not data.startswith(b"+PONG"):
            return False
        for line in data.split(b"\r\n"):
            if line.startswith(b"process_id:"):
                return int(line.split(b":", 1)[1]) == self._proc.pid
        return False


@dataclass(frozen=True, slots=True)
class MqttAcl:
    """One ACL line of a user: ``access`` is read, write or readwrite (mosquitto's words)."""

    user: str
    access: str
    topic: str


@dataclass(frozen=True, slots=True)
class MqttTls:
    """Broker TLS: its certificate and key, and the CA clients' certificates must come from.

    ``require_certificate`` makes the broker demand a client certificate (mutual TLS);
    with ``use_identity_as_username`` the certificate's CN is the user for the ACLs.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    require_certificate: bool = False
    use_identity_as_username: bool = False


class MosquittoServer(_ServerProcess):
    """An embedded ``mosquitto`` for the demo and the tests: TLS, users and ACLs, persistence.

    Persistence is on so QoS 1/2 sessions of clients with ``clean_start=False`` survive a
    :meth:`restart` (mosquitto saves its database on a clean stop and every
    ``autosave_interval_s``). With ``autosave_changes`` it saves after that many changes
    instead: 1 makes a ``kill -9`` lose (almost) nothing - sessions, subscriptions and queued
    messages are on disk right after each change, at the cost of a write per message (right
    for tests and the demo; a production broker weighs this itself). Without ``users`` the
    broker is anonymous (loopback only).
    """

    binary = "mosquitto"
    package = "mosquitto"

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        host: str = LOOPBACK,
        tls: MqttTls | None = None,
        users: dict[str, str] | None = None,
        acl: list[MqttAcl] | None = None,
        autosave_interval_s: int = 1,
        autosave_changes: int | None = None,
        max_queued_messages: int = 100_000,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        executable: str | None = None,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            port=port,
            host=host,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
            executable=executable,
        )
        self.tls = tls
        self.users = dict(users or {})
        self.acl = list(acl or [])
        self.autosave_interval_s = autosave_interval_s
        self.autosave_changes = autosave_changes
        self.max_queued_messages = max_queued_messages

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def _password_file(self, data_dir: Path) -> Path:
        """mosquitto wants hashed passwords: let its own tool hash them."""
        path = data_dir / "passwords"
        path.write_text("", encoding="utf-8")
        path.chmod(0o600)
        tool = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/sbin:/sbin")
        if tool is None:
            raise ServiceNotInstalled("mosquitto_passwd not found; install it with `apt-get install mosquitto`")
        for user, password in self.users.items():
            subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=10)
        return path

    def _command(self, executable: str, data_dir: Path, port: int) -> list[str]:
        lines = [
            "# written by gateway.services.MosquittoServer",
            "per_listener_settings false",
            # started as root, mosquitto would switch to user "mosquitto" and then fail to
            # read its own 0600 files in our data dir: stay whoever started it
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"listener {port} {self.host}",
            "persistence true",
            f"persistence_location {data_dir}/",
            *(
                [f"autosave_interval {self.autosave_interval_s}"]
                if self.autosave_changes is None
                else ["autosave_on_changes true", f"autosave_interval {self.autosave_changes}"]
            ),
            f"max_queued_messages {self.max_queued_messages}",
            # Nagle off: back-to-back messages must not wait for a delayed ACK (~40 ms)
            "set_tcp_nodelay true",
            "max_inflight_messages 100",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if self.users or (self.tls is not None and self.tls.use_identity_as_username):
            lines.append("allow_anonymous false")
            if self.users:
                lines.append(f"password_file {self._password_file(data_dir)}")
        else:
            lines.append("allow_anonymous true")
        if self.acl:
            acl_file = data_dir / "acl"
            by_user: dict[str, list[MqttAcl]] = {}
            for rule in self.acl:
                by_user.setdefault(rule.user, []).append(rule)
            acl_file.write_text(
                "".join(
                    f"user {u}\n" + "".join(f"topic {r.access} {r.topic}\n" for r in rules) + "\n"
                    for u, rules in by_user.items()
                ),
                encoding="utf-8",
            )
            lines.append(f"acl_file {acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                "tls_version tlsv1.2",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
                f"use_identity_as_username {'true' if self.tls.use_identity_as_username else 'false'}",
            ]
        conf = data_dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return [executable, "-c", str(conf)]


@contextlib.asynccontextmanager
async def embedded_redis(url: str | None, state_dir: Path, *, who: str) -> AsyncIterator[str]:
    """The Redis URL to use: ``url`` if given, else one of our own started for the duration.

    Our own keeps its AOF under ``state_dir/redis`` so a restarted service finds its state
    (pending requests, outbox, inbox) again, and writes its URL to ``state_dir/redis.url`` so
    the CLI commands of the same service find it while it runs.
    """
    if url is not None:
        yield url
        return
    server = await asyncio.to_thread(_start_embedded_redis, state_dir)
    logging.getLogger(who).info("embedded redis-server at %s (data in %s)", server.url, state_dir / "redis")
    try:
        yield server.url
    finally:
        await asyncio.to_thread(_stop_embedded_redis, server, state_dir)


def _start_embedded_redis(state_dir: Path) -> RedisServer:
    state_dir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(data_dir=state_dir / "redis")
    server.start()
    (state_dir / "redis.url").write_text(server.url + "\n")
    return server


def _stop_embedded_redis(server: RedisServer, state_dir: Path) -> None:
    (state_dir / "redis.url").unlink(missing_ok=True)
    server.close()
