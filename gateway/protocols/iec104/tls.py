"""TLS toward an IEC 104 device (IEC 62351-3 style) for the c104 client, through OpenSSL.

Why not ``c104.TransportSecurity``: measured with c104 2.2.1 (the newest release), its
client cannot complete any TLS handshake against a server that presents a certificate. The
bundled mbedtls 3.6 (3.6.3 or later) refuses to verify a server certificate when no host
name was set (``MBEDTLS_ERR_SSL_CERTIFICATE_VERIFICATION_WITHOUT_HOSTNAME``, -0x5D80), the
bundled lib60870 never sets one, and c104 has no setting for it. Every combination fails
the same way (``validate`` on or off, TLS 1.2 or 1.3, RSA or EC keys, with or without a
client certificate), c104 client against c104 server included; lib60870 also prints
"TLS: handshake failed" on stdout for each attempt.

So the adapter keeps c104 for IEC 104 and does TLS with Python's ``ssl``: a
:class:`TlsBridge` listens on 127.0.0.1 (free port) inside the gateway process; the c104
client connects there in plain IEC 104, and each such connection gets its own TLS
connection to the device. Bytes are relayed unchanged in the callback they arrive in (no
batching), with flow control passed through, so the 104 k/w windows still bound what is in
flight. A failed handshake closes the c104 side at once, which c104 sees as a failed
connect; the TLS reason is kept in :attr:`TlsBridge.last_error` for the link-down message.

The plain hop never leaves the process: the listener accepts a connection only when its
other end is a socket of this same process (checked in ``/proc``), so another local user
cannot borrow the gateway's client certificate through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from pathlib import Path

from gateway.config import Device, no_pass_phrase, pem_pair_problem
from gateway.errors import ConfigError, ConfigIssue

__all__ = ["TlsBridge", "client_tls_context"]

log = logging.getLogger(__name__)


def _readable(device: Device, key: str, path: str) -> None:
    """Raise a ConfigError naming the config key and the file when ``path`` cannot be read.

    Done before ``ssl`` sees the file: its FileNotFoundError does not say which file it was.
    """
    try:
        with Path(path).open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        issue = ConfigIssue(path, f"devices.{device.name}.tls.{key}", f"cannot read ({exc.strerror})")
        raise ConfigError([issue]) from exc


def client_tls_context(device: Device) -> ssl.SSLContext:
    """The gateway's TLS client context for ``device`` (which must have ``tls.enabled``).

    TLS 1.2 is the floor (IEC 62351-3); OpenSSL negotiates 1.3 when the device offers it.
    Every file is read here, so a missing, unreadable or non-PEM file is a ConfigError naming
    the key and the file when the adapter starts, not a failed handshake later.
    """
    tls = device.tls
    if not tls.enabled:
        raise ValueError(f"{device.name}: TLS is not enabled")
    for key, path in tls.files():
        _readable(device, key, path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.verify:
        if tls.ca_file is None:
            raise ConfigError(
                [ConfigIssue("<lab config>", f"devices.{device.name}.tls.ca_file", "needed when verify is on")]
            )
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except ssl.SSLError as exc:
            reason = f"not a PEM CA certificate ({exc.reason or exc})"
            raise ConfigError([ConfigIssue(tls.ca_file, f"devices.{device.name}.tls.ca_file", reason)]) from exc
        ctx.check_hostname = tls.check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning("%s: TLS without verifying the device certificate (tls.verify is off)", device.name)
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file, password=no_pass_phrase)
        except ssl.SSLError as exc:
            reason = pem_pair_problem(tls.cert_file, tls.key_file, exc)
            raise ConfigError([ConfigIssue(tls.cert_file, f"devices.{device.name}.tls.cert_file", reason)]) from exc
    return ctx


#: why a TLS link ended when the device closed it before sending a single octet
TLS_CLOSED_AT_ONCE = "TLS: closed by the device before any data (did it refuse our certificate?)"


def _tls_failure(exc: BaseException) -> str:
    """A short operator-facing reason for a failed TLS connect."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: device certificate refused: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        # e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED, SSLV3_ALERT_BAD_CERTIFICATE: the device refused us
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "TLS: connection reset during the handshake (did the device refuse our certificate?)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"TCP connect for TLS failed: {exc.strerror}"
    return f"TLS connect failed: {exc!r}"


def _own_socket(listen_port: int, peer_port: int) -> bool | None:
    """Whether the loopback connection from ``peer_port`` to ``listen_port`` is this process's.

    Looks the client end up in /proc/self/net/tcp and its inode among this process's file
    descriptors. None when /proc cannot tell (not Linux).
    """
    want_local = f"0100007F:{peer_port:04X}"
    want_remote = f"0100007F:{listen_port:04X}"
    try:
        lines = Path("/proc/self/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    inode = None
    for line in lines:
        fields = line.split()
        if len(fields) > 9 and fields[1] == want_local and fields[2] == want_remote:
            inode = fields[9]
            break
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return True
    return False


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection; writes what it receives to the other side."""

    def __init__(self, bridge: TlsBridge, label: str) -> None:
        self.bridge = bridge
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.pending: list[bytes] = []  # received before the other side was connected
        self.closed = False
        self.closed_by_us = False
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.bridge._transports.add(transport)

    def link(self, other: _Pipe) -> None:
        self.other = other
        if self.pending and other.transport is not None:
            other.transport.write(b"".join(self.pending))
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        return None  # close this side; connection_lost closes the other

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.label == "device" and not self.received and not self.closed_by_us:
            # TLS 1.3: our handshake ends before the device has checked our certificate. A
            # device that refuses it closes at once; Python's ssl server (the simulator) even
            # closes without sending the alert, so often there is no reason to give.
            self.bridge.failures += 1
            self.bridge.last_error = (
                _tls_failure(exc)
                if exc is not None
                else TLS_CLOSED_AT_ONCE
            )
            log.warning("%s: %s", self.bridge.device.name, self.bridge.last_error)
        if self.transport is not None:
            self.bridge._transports.discard(self.transport)
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.closed_by_us = True
            other.transport.close()  # flushes what was relayed, then closes

    # flow control: a slow reader on one side pauses reading on the other
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class TlsBridge:
    """Loopback listener that carries c104's plain IEC 104 to the device over TLS.

    :meth:`open` binds synchronously (the c104 connection needs the port when it is built)
    and accepts on the running loop; :meth:`aclose` stops listening and closes every relayed
    connection.
    """

    def __init__(self, device: Device, context: ssl.SSLContext, loop: asyncio.AbstractEventLoop) -> None:
        self.device = device
        self._ctx = context
        self._loop = loop
        self._sock: socket.socket | None = None
        self._transports: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_unchecked = False
        #: Why the last TLS connect failed; cleared by :meth:`take_error`.
        self.last_error: str | None = None
        self.connects = 0
        self.failures = 0
        self.refused_foreign = 0

    def open(self) -> tuple[str, int]:
        """Start listening on 127.0.0.1; return the (host, port) c104 should connect to."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(4)
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return "127.0.0.1", int(sock.getsockname()[1])

    def take_error(self) -> str | None:
        err, self.last_error = self.last_error, None
        return err

    def close(self) -> None:
        """Stop listening and abort every relayed connection (callable without awaiting)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in self._tasks:
            task.cancel()
        for tr in list(self._transports):
            protocol = tr.get_protocol()
            if isinstance(protocol, _Pipe):
                protocol.closed_by_us = True
            tr.abort()

    async def aclose(self) -> None:
        self.close()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await asyncio.sleep(0)  # let connection_lost of the aborted transports run

    def _accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s: TLS bridge accept failed: %s", self.device.name, exc)
                return
            listen_port = int(sock.getsockname()[1])
            mine = _own_socket(listen_port, int(peer[1]))
            if mine is False:
                self.refused_foreign += 1
                log.warning("%s: TLS bridge refused a local connection not made by this process", self.device.name)
                conn.close()
                continue
            if mine is None and not self._warned_unchecked:
                self._warned_unchecked = True
                log.warning("%s: cannot check who connects to the TLS bridge (no /proc)", self.device.name)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._relay(conn), name=f"iec104-tls:{self.device.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _relay(self, conn: socket.socket) -> None:
        dev = self.device
        plain = _Pipe(self, "c104")
        try:
            await self._loop.connect_accepted_socket(lambda: plain, conn)
        except OSError:
            conn.close()
            return
        secure = _Pipe(self, "device")
        try:
            async with asyncio.timeout(float(dev.timers.t0_s)):
                await self._loop.create_connection(
                    lambda: secure,
                    dev.host,
                    dev.port,
                    ssl=self._ctx,
                    server_hostname=dev.host,
                    ssl_handshake_timeout=float(dev.timers.t0_s),
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self.failures += 1
            self.last_error = _tls_failure(exc)
            log.warning("%s: TLS to %s:%d: %s", dev.name, dev.host, dev.port, self.last_error)
            if plain.transport is not None:
                plain.transport.abort()
            return
        except asyncio.CancelledError:
            if plain.transport is not None:
                plain.transport.abort()
            raise
        self.connects += 1
        if secure.transport is not None:
            tls_obj = secure.transport.get_extra_info("ssl_object")
            if tls_obj is not None:
                log.info("%s: TLS up to %s:%d (%s, %s)", dev.name, dev.host, dev.port, tls_obj.version(),
                         tls_obj.cipher()[0] if tls_obj.cipher() else "?")
        if plain.closed:  # c104 gave up while the handshake ran
            if secure.transport is not None:
                secure.closed_by_us = True
                secure.transport.close()
            return
        secure.link(plain)
        plain.link(secure)
