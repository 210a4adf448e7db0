"""SIGINT and SIGTERM over a service's whole life, start-up included.

A service (``mgms run``, ``ams run``) starts things before it runs: an embedded
redis-server, transports, adapters. A handler installed only once it runs leaves the
start-up to the default dispositions: SIGTERM then ends the process on the spot and
nothing it started is stopped. :class:`StopSignals` is entered first, before anything is
started, and covers both phases:

- **starting** (until :meth:`StopSignals.started`): the first signal cancels the task that
  entered. The start-up is abandoned at its current ``await`` and every context manager on
  the way out stops what it had started (``embedded_redis`` waits for a server it was
  starting and stops it). The cancellation ends at the ``with`` block: the service returns
  normally, as after a stop.
- **running**: a signal sets :attr:`StopSignals.stop`, and the service shuts down in order
  (commands under way finish, links close, buffers flush).

Only the first signal of the start-up cancels: a second one while the first is being
handled must not cut the clean-up short (which is what would leak the server).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import TracebackType
from typing import Self

__all__ = ["StopSignals"]

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """``with StopSignals() as signals:`` at the top of a service's main coroutine.

    :attr:`received` is the first signal seen (None if none), so a caller can tell a stop it
    was asked for from one it was not.
    """

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.received: signal.Signals | None = None
        self._task: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting = True
        self._cancelled = False

    def started(self) -> None:
        """The start-up is over: from now on a signal sets :attr:`stop` and nothing else."""
        self._starting = False

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.received is None:
            self.received = sig
        log.info("%s received%s", sig.name, " during start-up: abandoning it" if self._starting else ": stopping")
        self.stop.set()
        if self._starting and not self._cancelled and self._task is not None:
            self._cancelled = True
            self._task.cancel(f"{sig.name} during start-up")

    def __enter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for sig in _SIGNALS:
            self._loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._loop is not None:
            for sig in _SIGNALS:
                self._loop.remove_signal_handler(sig)
        if self._cancelled and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            assert self._task is not None
            if self._task.uncancel() == 0:
                log.info("start-up abandoned on %s; everything it started is stopped", self.received_name)
                return True  # our own cancellation, done with: the service stops normally
        return False

    @property
    def received_name(self) -> str:
        return self.received.name if self.received is not None else "no signal"
