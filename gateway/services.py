"""Server processes the gateway starts for itself: an embedded redis-server (mosquitto later).

The demo and the tests need a Redis that nobody has to configure, so they start their own on
a free loopback port with a throw-away data directory. The same mechanics (find the binary,
pick a free port, write a config, spawn, wait until it answers, stop politely then firmly)
serve every such server, so they live in :class:`_ServerProcess`; a subclass only says how
to configure the server and how to tell that it is ready.

Everything here is synchronous (it is process management, done once at start-up); the
async context manager runs the blocking parts in a worker thread so an event loop is never
stalled while a server boots.

A server never outlives the process that started it, whichever way that process ends:

- a stop (:meth:`_ServerProcess.stop`, the context managers, the finalizer at exit);
- a cancelled start (:meth:`_ServerProcess.astart`): the start-up thread is told to give up,
  stops the server it was starting, and the cancellation goes on only once it has;
- SIGKILL or any other death of the starting process: the server is spawned with
  ``PR_SET_PDEATHSIG`` = SIGTERM, so the kernel stops it. That signal fires when the *thread*
  that forked the server ends, not the process; so every server is forked from one thread
  kept for the life of the process (:data:`_FORK_THREAD`), never from the short-lived worker
  thread that waits for it to answer.

:func:`embedded_redis` adds a per-data-dir lock (:class:`DataDirLock`): a second service on
the same data dir is refused before it touches the first one's AOF or url file.

The embedded Redis takes no client without a user and its secret (:class:`RedisServer`,
:func:`lab_redis_users`, docs/security.md): a local process that reaches its port must not be
able to open a breaker with one XADD (issue 14).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import logging
import os
import pwd
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from gateway.errors import GatewayError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "DataDirInUse",
    "DataDirLock",
    "MosquittoServer",
    "MqttAcl",
    "MqttTls",
    "RedisServer",
    "ServiceError",
    "ServiceNotInstalled",
    "ams_redis_users",
    "die_with_parent",
    "display_url",
    "embedded_redis",
    "free_port",
    "lab_redis_users",
    "participant_acl",
    "read_redis_secret",
    "redis_secret_path",
    "url_with_credentials",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class ServiceError(GatewayError):
    """An embedded server could not be started or stopped."""


class ServiceNotInstalled(ServiceError):
    """The server binary is not on PATH; the message says which package provides it."""


class DataDirInUse(ServiceError):
    """Another process holds the data dir's lock: a usage problem (exit code 2), not a fault."""

    def __init__(self, message: str, *, data_dir: Path, pid: int | None) -> None:
        super().__init__(message)
        self.data_dir = data_dir
        self.pid = pid


_T = TypeVar("_T")

_PopenFuture = concurrent.futures.Future[subprocess.Popen[bytes]]


class _ForkThread:
    """The one thread every server is forked from (PR_SET_PDEATHSIG follows the forking thread).

    A daemon thread, started on the first spawn and never ended: it lasts exactly as long
    as the process, so the kernel's "parent died" signal comes when the process dies. A
    worker thread of ``asyncio.to_thread`` would not do: it may end while the process goes
    on, and take the server with it. Its loop runs for the life of the process by design;
    each job is one Popen.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen[bytes]], _PopenFuture]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def popen(self, spawn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._lock:
            # not alive: never started, or we are a forked child that has no copy of it
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="server-fork", daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            return spawn()
        done: _PopenFuture = concurrent.futures.Future()
        self._jobs.put((spawn, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            spawn, done = self._jobs.get()
            try:
                done.set_result(spawn())
            except BaseException as exc:  # handed to the caller, which re-raises it
                done.set_exception(exc)


#: Process-wide by nature, as the process's children are (see :class:`_ForkThread`).
_FORK_THREAD = _ForkThread()

_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[[int, int, int, int, int], int] | None:
    """libc's prctl, looked up once in the parent (a forked child should only call it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    prctl: Callable[[int, int, int, int, int], int] = fn
    return prctl


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its forking thread ends.

    That thread must live as long as the process for this to mean "when we die": the main
    thread (an event loop's ``create_subprocess_exec`` under ``asyncio.run``) or the servers'
    fork thread here; never a worker thread. None where there is no prctl (not Linux).
    Runs in the child between fork and exec, so it does the least: one prctl and one
    getppid. The getppid check closes the race where the parent died before the prctl (the
    child would then wait for a signal that already had its chance).
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os._exit(1)

    return preexec


_die_with_parent = die_with_parent  # the name gateway.labcli imports


async def _in_thread_to_the_end(fn: Callable[[], _T], on_cancel: Callable[[], None] | None = None) -> _T:
    """``fn()`` in a worker thread, awaited to its end even when the caller is cancelled.

    :func:`asyncio.to_thread` gives up at a cancellation while the thread goes on, so a
    server being started would come up after its owner left and nobody would stop it. Here
    a cancellation calls ``on_cancel`` (which tells ``fn`` to give up) and is raised only
    once ``fn`` has returned; ``fn``'s own outcome is then dropped. ``fn`` is bounded by
    itself (start and stop timeouts), so is the wait.
    """
    fut = asyncio.get_running_loop().run_in_executor(None, fn)
    cancelled: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError as exc:
            if cancelled is None and on_cancel is not None:
                on_cancel()
            cancelled = exc
    if cancelled is not None:
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("dropped after a cancellation: %r", fut.exception())
        raise cancelled
    return fut.result()


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
        inherit_fds: Sequence[int] = (),
    ) -> None:
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._executable = executable
        # e.g. a DataDirLock's descriptor: the lock then lasts as long as the server too
        self._inherit_fds = tuple(inherit_fds)
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

    def start(self, abort: threading.Event | None = None) -> None:
        """Start the server and return once it answers; raise ServiceError if it does not.

        ``abort`` set meanwhile (from another thread) makes it stop the server it is starting
        and raise :class:`StartAborted`.
        """
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
                self._spawn(exe, data_dir, port, abort)
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

    def _spawn(self, exe: str, data_dir: Path, port: int, abort: threading.Event | None = None) -> None:
        if abort is not None and abort.is_set():
            raise StartAborted(f"{self.binary}: start-up abandoned before it began")
        cmd = self._command(exe, data_dir, port)
        log.debug("starting %s", " ".join(cmd))
        with open(self.log_file, "ab") as out:
            log_start = out.tell()
            out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            out.flush()
            preexec = die_with_parent()  # built here: the child should only call it

            def spawn() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    cmd,
                    cwd=data_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C meant for the gateway must not kill it first
                    pass_fds=self._inherit_fds,
                    preexec_fn=preexec,
                )

            # from the fork thread, so PR_SET_PDEATHSIG means "when this process dies"
            proc = _FORK_THREAD.popen(spawn)
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill_quietly, proc)
        try:
            self._await_ready(proc, port, log_start, abort)
        except BaseException:
            # whatever went wrong while waiting (abort, timeout, a bug), the process goes too
            if self._proc is proc:
                self._terminate(proc)
                self._proc = None
                self._finalizer.detach()
            raise

    def _await_ready(
        self, proc: subprocess.Popen[bytes], port: int, log_start: int, abort: threading.Event | None
    ) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if proc.poll() is not None:
                self._proc = None
                if self._finalizer is not None:
                    self._finalizer.detach()
                tail = self._log_tail(since=log_start)
                if self._port_in_use(tail):
                    raise _PortTaken
                raise ServiceError(
                    f"{self.binary} exited with code {proc.returncode} at start-up; "
                    f"log {self.log_file}:\n{tail}"
                )
            if self._ready():
                log.info(
                    "%s running on %s:%d (pid %d, data %s)", self.binary, self.host, port, proc.pid, self.data_dir
                )
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.binary} did not answer within {self.start_timeout_s:g} s; "
                    f"log {self.log_file}:\n{self._log_tail(since=log_start)}"
                )
            if abort is None:
                time.sleep(0.02)
            elif abort.wait(0.02):
                raise StartAborted(f"{self.binary}: start-up abandoned (pid {proc.pid} stopped)")

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

    async def astart(self) -> None:
        """:meth:`start` in a worker thread; cancelled, it stops what it was starting first.

        The cancellation reaches the caller only once the server is stopped again, so an
        owner cancelled at any point of start-up (a signal, a timeout) leaves no server.
        """
        abort = threading.Event()
        try:
            await _in_thread_to_the_end(functools.partial(self.start, abort), on_cancel=abort.set)
        except asyncio.CancelledError:
            # start() may have finished before it saw the abort
            await _in_thread_to_the_end(self.stop)
            raise

    async def __aenter__(self) -> Self:
        try:
            await self.astart()
        except BaseException:
            await _in_thread_to_the_end(self.close)  # no __aexit__ follows a failed __aenter__
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await _in_thread_to_the_end(self.close)


class StartAborted(ServiceError):
    """The start was abandoned on request (its owner was cancelled); the server is stopped."""


class _PortTaken(Exception):
    """Internal: the server exited because its port was taken meanwhile."""


#: What every client of ours sends on connecting (redis-py: AUTH; PING as
#: health check); granted to every user so a refused connection handshake never hides a
#: refused command.
_CONNECTION_RULES = "+ping +hello +echo +client|setname +client|getname +client|id"

#: A service user: everything on its own keys except what would let it change the server or
#: erase what others rely on. ``-@dangerous`` takes CONFIG, FLUSH*, DEBUG, ACL, SHUTDOWN,
#: KEYS, MONITOR, CLIENT and INFO; INFO comes back (the gateway checks persistence with
#: ``INFO persistence``), XGROUP DESTROY goes (it would silently drop the pending commands).
_SERVICE_RULES = (
    "+@all -@dangerous +info " + _CONNECTION_RULES + " -xgroup|destroy -config -flushall -flushdb -debug "
    "-acl -shutdown -monitor"
)

#: Read-only users: read commands on their keys, minus KEYS (it blocks the server on a large
#: key space) and minus every write; TIME (the bench reads the server clock).
_READ_RULES = "-@all +@read -keys +time " + _CONNECTION_RULES


def _keys(prefix: str | None, suffix: str = "*") -> str:
    """A key pattern under ``prefix`` (``None``: any key, as the tests' shared servers need)."""
    return "*" if prefix is None and suffix == "*" else f"{prefix or '*'}:{suffix}"


def lab_redis_users(prefix: str | None) -> dict[str, str]:
    """The ACL users of a gateway's Redis (name -> ACL rules, without the password).

    ``prefix`` is the lab's key prefix (``mgms:<lab>``, docs/redis-keys.md); ``None`` allows
    any key prefix (a shared test server). See docs/security.md for what each may do:

    - ``gateway``: the service; all it needs on ``P:*`` (state, commands, messaging), nothing
      that changes the server (CONFIG, ACL, SHUTDOWN, DEBUG), erases it (FLUSH*) or drops the
      command group (XGROUP DESTROY);
    - ``operator``: reads ``P:*``, appends to ``P:cmd:requests`` and pops its replies
      ``P:cmd:reply:*`` (BLPOP), nothing else;
    - ``viewer``: reads ``P:*``;
    - ``auditor``: reads the audit stream ``P:audit`` only.
    """
    everything = _keys(prefix)
    return {
        "gateway": f"resetkeys ~{everything} resetchannels &* {_SERVICE_RULES}",
        "operator": (
            f"resetkeys %R~{everything} %W~{_keys(prefix, 'cmd:requests')} %RW~{_keys(prefix, 'cmd:reply:*')} "
            f"resetchannels {_READ_RULES} +xadd +blpop"
        ),
        "viewer": f"resetkeys %R~{everything} resetchannels {_READ_RULES}",
        "auditor": f"resetkeys %R~{_keys(prefix, 'audit')} resetchannels {_READ_RULES}",
    }


def ams_redis_users(prefix: str | None) -> dict[str, str]:
    """The ACL users of an AMS's Redis: the ``ams`` worker (its prefix ``ams:<participant>``)
    and a ``viewer`` (``ams status``); as :func:`lab_redis_users`."""
    everything = _keys(prefix)
    return {
        "ams": f"resetkeys ~{everything} resetchannels &* {_SERVICE_RULES}",
        "viewer": f"resetkeys %R~{everything} resetchannels {_READ_RULES}",
    }


def redis_secret_path(secrets_dir: Path, user: str) -> Path:
    """Where the secret of ``user`` of an embedded Redis is kept (mode 0600)."""
    return secrets_dir / f"redis-{user}.secret"


def read_redis_secret(path: Path) -> str:
    """The secret in ``path`` (one line); ServiceError naming the file when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ServiceError(f"cannot read the Redis secret {path}: {exc.strerror}") from None
    if not text:
        raise ServiceError(f"the Redis secret file {path} is empty")
    return text


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte on (never readable by others)."""
    partial = path.with_name(path.name + ".new")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    partial.replace(path)


def display_url(url: str) -> str:
    """``url`` without its password, for logs and output (``redis://user@host:port/0``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@" if parts.username else ""
    netloc += f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def url_with_credentials(url: str, user: str, secret: str) -> str:
    """``url`` carrying ``user`` and ``secret`` (for a client; never print or log it)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{quote(user, safe='')}:{quote(secret, safe='')}@" + (f"[{host}]" if ":" in host else host)
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisServer(_ServerProcess):
    """An embedded ``redis-server`` with AOF persistence and ACL users, for the gateway, the
    AMS, the demo and the tests.

    AOF with ``appendfsync always`` (the default) means every write Redis acknowledged is on
    disk before the reply, so :meth:`restart` - even ``restart(hard=True)`` - brings back
    everything the gateway was told was stored. RDB snapshots are off (``save ""``): AOF is
    the single source of durability and there is no fork pause.

    Authentication: nobody can be ``default`` (see :meth:`_command` for why it is on with a
    secret nobody holds rather than off), and each user of ``users`` (name -> ACL rules, see
    :func:`lab_redis_users`; default: the lab users and the ``ams`` worker on any key) gets a
    secret generated at the first start (``secrets.token_urlsafe``), kept for restarts of this
    object and written to ``secrets_dir`` (default ``data_dir/secrets``, mode 0700) as
    ``redis-<user>.secret`` (mode 0600). The config file holds only their SHA-256. :attr:`url`
    carries no credential (show it, log it, write it down); :meth:`client_url` and
    :meth:`client` do (give them to a client, never print them). The first user is the
    service user, which the readiness probe authenticates as.
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
        users: Mapping[str, str] | None = None,
        secrets_dir: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        executable: str | None = None,
        inherit_fds: Sequence[int] = (),
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
            inherit_fds=inherit_fds,
        )
        self.appendfsync = appendfsync
        self.appendonly = appendonly
        self.extra_config = dict(extra_config or {})
        self.users: dict[str, str] = (
            dict(users) if users is not None else {**lab_redis_users(None), "ams": ams_redis_users(None)["ams"]}
        )
        if not self.users:
            raise ValueError("a RedisServer needs at least one user (default is off)")
        if "default" in self.users:
            raise ValueError("the default user stays off; give the users names")
        self._secrets_dir = Path(secrets_dir).absolute() if secrets_dir is not None else None
        self._secrets: dict[str, str] = {}

    @property
    def service_user(self) -> str:
        """The first user: the service itself (the gateway, the AMS worker)."""
        return next(iter(self.users))

    @property
    def url(self) -> str:
        """Where the server listens, without credentials: safe to print, log and write down."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def secrets_dir(self) -> Path:
        return self._secrets_dir if self._secrets_dir is not None else self.data_dir / "secrets"

    def secret(self, user: str | None = None) -> str:
        """The secret of ``user`` (default: the service user); generated at the first start."""
        name = user or self.service_user
        if name not in self.users:
            raise ServiceError(f"redis-server has no user {name!r} (users: {', '.join(self.users)})")
        if name not in self._secrets:
            raise ServiceError(f"{self.binary} has not been started yet: no secret for {name!r}")
        return self._secrets[name]

    def secret_file(self, user: str | None = None) -> Path:
        return redis_secret_path(self.secrets_dir, user or self.service_user)

    def client_url(self, user: str | None = None) -> str:
        """:attr:`url` with ``user``'s credentials (default the service user). Never print it."""
        name = user or self.service_user
        return url_with_credentials(self.url, name, self.secret(name))

    def client(self, user: str | None = None, **kwargs: Any) -> aioredis.Redis:
        """An asyncio client authenticated as ``user`` (``decode_responses=True`` by default)."""
        import redis.asyncio as aioredis

        kwargs.setdefault("decode_responses", True)
        return aioredis.Redis.from_url(self.client_url(user), **kwargs)

    def _ensure_secrets(self) -> None:
        """Generate the users' secrets once per object and write them 0600 (kept for restart)."""
        if set(self._secrets) != set(self.users):
            self._secrets = {name: secrets.token_urlsafe(32) for name in self.users}
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.chmod(0o700)
        for name, secret in self._secrets.items():
            _write_private(redis_secret_path(self.secrets_dir, name), secret + "\n")

    def _command(self, executable: str, data_dir: Path, port: int) -> list[str]:
        self._ensure_secrets()
        conf = data_dir / "redis.conf"
        settings = {
            "bind": self.host,
            "port": str(port),
            "dir": str(data_dir),
            "daemonize": "no",
            # loopback, and no client without a user and its secret (default is off below)
            "protected-mode": "yes",
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
            "save": '""',
            "logfile": '""',  # stdout, which goes to our log file
            "databases": "16",
            **self.extra_config,
        }
        # ``default`` is on with a secret nobody holds (made here, kept nowhere): no client can
        # be it - a connection without AUTH is refused with NOAUTH - but the AOF loader, which
        # runs as ``default``, may replay everything. With ``default off`` Redis up to 7.2
        # (and valkey) silently drops every MULTI/EXEC of the AOF at a restart (EXEC re-checks
        # the ACL: redis/redis#14541, fixed by #14545; valkey-io/valkey#3983): the store's
        # batches, i.e. acknowledged values (tests/store/test_outage.py found it).
        unknowable = hashlib.sha256(secrets.token_bytes(32)).hexdigest()
        users = [f"user default reset on #{unknowable} ~* &* +@all"] + [
            f"user {name} reset on #{hashlib.sha256(self._secrets[name].encode()).hexdigest()} {rules}"
            for name, rules in self.users.items()
        ]
        _write_private(
            conf,
            "# written by gateway.services.RedisServer (passwords only as SHA-256)\n"
            + "".join(f"{k} {v}\n" for k, v in settings.items())
            + "".join(f"{line}\n" for line in users),
        )
        return [executable, str(conf)]

    def _ready(self) -> bool:
        """Our redis-server (by pid) answers PING with +PONG, i.e. it has loaded its AOF.

        While it replays the AOF Redis answers -LOADING; the pid check makes sure we are not
        talking to another server that held the port first. It authenticates as the service
        user (nothing answers without).
        """
        if self._proc is None:
            return False
        user = self.service_user
        auth = _resp(b"AUTH", user.encode(), self._secrets[user].encode())
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.settimeout(1.0)
                s.sendall(auth + b"PING\r\nINFO server\r\n")
                data = b""
                while b"process_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        return False
                    data += chunk
                    if data.startswith(b"-") and data.endswith(b"\r\n"):
                        return False  # refused (another server on the port): no INFO follows
        except OSError:
            return False
        if not data.startswith(b"+OK\r\n+PONG"):
            return False
        for line in data.split(b"\r\n"):
            if line.startswith(b"process_id:"):
                return int(line.split(b":", 1)[1]) == self._proc.pid
        return False


def _resp(*parts: bytes) -> bytes:
    """One command as a RESP array (a secret may hold any character: no inline command)."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


@dataclass(frozen=True, slots=True)
class MqttAcl:
    """One ACL line of a user: ``access`` is read, write or readwrite (mosquitto's words)."""

    user: str
    access: str
    topic: str


def participant_acl(user: str, participant: str | None = None) -> list[MqttAcl]:
    """The two ACL lines of one messaging participant, following the topic layout.

    It may write only what it sends (``heila/v1/to/+/from/<itself>/#``) and read only what is
    addressed to it (``heila/v1/to/<itself>/#``); ``user`` is its broker user name, which is
    usually the participant's name.
    """
    from gateway.transport.base import inbox_filter, outbox_filter

    who = participant or user
    return [MqttAcl(user, "write", outbox_filter(who)), MqttAcl(user, "read", inbox_filter(who))]


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
        return [executable, "-c", str(self.write_config(data_dir, port))]

    def write_config(self, data_dir: Path, port: int) -> Path:
        """Write ``mosquitto.conf`` (with its ``passwords`` and ``acl`` files) into ``data_dir``.

        Public so ``mgms broker config`` writes a lab's broker with exactly the settings the
        demo and the tests run theirs with; returns the path of ``mosquitto.conf``.
        """
        data_dir = Path(data_dir).absolute()
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
        return conf


class DataDirLock:
    """An exclusive ``flock`` on ``<dir>/run.lock``, held for as long as its owner lives.

    The kernel drops a flock when the last descriptor of its open file goes, so no death of
    the owner (SIGKILL included) leaves a stale lock behind, and there is nothing to clean
    up. Given to a server through ``inherit_fds``, the lock lasts until that server is gone
    too: a new run cannot start a second redis-server on an AOF the old one still writes.
    The owner's pid and role are written into the file for the refusal message of the next
    one; the file itself stays (removing a lock file races with the next locker).
    """

    file_name = "run.lock"

    def __init__(self, directory: Path, *, who: str) -> None:
        self.directory = directory
        self.path = directory / self.file_name
        self.who = who
        self._fd: int | None = None

    def fileno(self) -> int:
        if self._fd is None:
            raise ServiceError(f"{self.path} is not held")
        return self._fd

    def acquire(self) -> None:
        """Take the lock at once or raise :class:`DataDirInUse` naming the holder's pid."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EACCES) else None
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise ServiceError(f"cannot lock {self.path}: {exc.strerror}") from exc
            raise self._in_use(holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.who}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @staticmethod
    def _holder(fd: int) -> tuple[int, str] | None:
        """The holder's "pid role" line; it writes it just after it locked, so wait a moment."""
        for _ in range(25):  # 0.5 s at most
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 200).decode("utf-8", errors="replace").strip()
            pid_text, _, role = text.partition(" ")
            if pid_text.isdigit():
                return int(pid_text), role or "?"
            time.sleep(0.02)
        return None

    def _in_use(self, holder: tuple[int, str] | None) -> DataDirInUse:
        where = self.directory
        if holder is None:
            return DataDirInUse(
                f"data dir {where} is in use by another process (its lock {self.path} is held); "
                "stop it first, or give this one another --data-dir",
                data_dir=where,
                pid=None,
            )
        pid, role = holder
        if _pid_alive(pid):
            what = f"{role} (pid {pid})"
        else:
            what = f"a server that {role} (pid {pid}, gone) started and that is still stopping"
        return DataDirInUse(
            f"data dir {where} is in use by {what}, whose embedded Redis keeps its data there: "
            "stop that one first, or give this one another --data-dir",
            data_dir=where,
            pid=pid,
        )

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.asynccontextmanager
async def embedded_redis(
    url: str | None, state_dir: Path, *, who: str, users: Mapping[str, str] | None = None
) -> AsyncIterator[str]:
    """The Redis URL to use: ``url`` if given, else one of our own started for the duration.

    Our own keeps its AOF under ``state_dir/redis`` so a restarted service finds its state
    (pending requests, outbox, inbox) again, and writes its URL - without credentials - to
    ``state_dir/redis.url`` so the CLI commands of the same service find it while it runs;
    they authenticate with the secret files in ``state_dir/secrets`` (one per user of
    ``users``, the first being the service; new secrets at every start, docs/security.md).
    The URL yielded carries the service user's credentials: hand it to a client, never log it.
    ``state_dir`` is locked first (:class:`DataDirLock`, :class:`DataDirInUse` if another
    service has it), before anything in it is touched. Cancelled at any point (a signal
    during start-up), it stops the server before the cancellation goes on.
    """
    if url is not None:
        yield url
        return
    with DataDirLock(state_dir, who=who) as lock:
        server = RedisServer(
            data_dir=state_dir / "redis",
            users=users,
            secrets_dir=state_dir / "secrets",
            inherit_fds=(lock.fileno(),),
        )
        marker = state_dir / "redis.url"
        try:
            await server.astart()
            # whole or not at all: a reader (`mgms command`) polling for it must not see it empty
            partial = marker.with_name(marker.name + ".new")
            partial.write_text(server.url + "\n")
            partial.replace(marker)
            logging.getLogger(who).info(
                "embedded redis-server at %s as user %s (data in %s, secrets in %s)",
                server.url,
                server.service_user,
                server.data_dir,
                server.secrets_dir,
            )
            yield server.client_url()
        finally:
            # ours to remove even when start-up failed: we hold the lock, so any marker is stale
            marker.unlink(missing_ok=True)
            await _in_thread_to_the_end(server.close)
