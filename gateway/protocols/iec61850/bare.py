"""The floor of the 61850 report route: libiec61850's receive path driven by socket readiness.

Why: libiec61850's client receive thread runs ``while running: if (MmsConnection_tick())
Thread_sleep(10)``: a non-blocking read, and 10 ms of sleep whenever nothing was there
(``mms_client_connection.c``, ``connectionHandlingThread``). A report that arrives while it
sleeps waits for the end of the sleep, so the report callback of a bare connection lands
0-10 ms after the update depending on where the update falls in that 10 ms cycle, and a
floor measured that way depends on the bench's own rhythm (it came out slower than the
gateway route it bounds). :class:`ReportTicker` removes that sleep from the floor: a thread
blocked in ``select()`` on the connection's socket calls ``IedConnection_tick`` as soon as
bytes are there, so the report handler runs within the wake-up of one thread. That is as
tight as the library allows without patching it: the tick itself is libiec61850's code; the
library's own thread keeps running beside it (``IedConnection_tick`` and that thread share
the connection's tick mutex), and whichever is awake first handles the report.

The socket is not in libiec61850's API: it is found as this process's TCP socket whose peer
is the server's port (the connection must be the only one from this process to that port).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import socket
import threading
from typing import Any

__all__ = ["ReportTicker", "connection_socket_fd"]


@functools.cache
def _tick_fn() -> Any:
    import pyiec61850.pyiec61850 as swig  # libiec61850 is inside the wheel's extension module

    so = ctypes.CDLL(swig._pyiec61850.__file__)  # own handle: argtypes here leave native.lib's alone
    fn = so.IedConnection_tick
    fn.restype = ctypes.c_bool
    fn.argtypes = [ctypes.c_void_p]
    return fn


def connection_socket_fd(host: str, port: int) -> int:
    """The fd of this process's TCP socket connected to ``host:port`` (ValueError if not one)."""
    found: list[int] = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            dup = os.dup(fd)
        except OSError:
            continue
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        with s, contextlib.suppress(OSError):
            if s.type == socket.SOCK_STREAM and s.getpeername()[:2] == (host, port):
                found.append(fd)
    if len(found) != 1:
        raise ValueError(f"{len(found)} sockets of this process connected to {host}:{port}, need exactly one")
    return found[0]


class ReportTicker:
    """A thread that ticks a libiec61850 connection whenever its socket is readable.

    :meth:`stop` before the connection is closed or destroyed (the fd would be gone).
    """

    def __init__(self, con: int, host: str, port: int) -> None:
        self._con = ctypes.c_void_p(con)
        self._fd = connection_socket_fd(host, port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"61850-ticker-{port}", daemon=True)
        self.ticks = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        tick = _tick_fn()
        fd, con = self._fd, self._con
        while not self._stop.is_set():
            try:
                ready, _w, _x = select.select([fd], [], [], 0.05)  # bounded: stop is seen within 50 ms
            except (OSError, ValueError):
                return  # the library closed the socket
            if not ready:
                continue
            for _ in range(64):  # until the library reports it waits (nothing left to read)
                self.ticks += 1
                if tick(con):
                    break
