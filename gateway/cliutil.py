"""What the three console scripts (``mgms``, ``ams``, ``iedsim``) share at the edge.

Kept apart from :mod:`gateway.cli` so ``ams`` and ``iedsim`` need not import the gateway's
command line to behave like it: a reader closing the pipe (``mgms watch | head``) ends the
command quietly, ``--version`` reads the same everywhere, and an unknown name is answered
with the closest known one.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import os
import select
import sys
from collections.abc import Callable, Iterable
from typing import ParamSpec

from gateway import __version__

__all__ = ["EXIT_BROKEN_PIPE", "add_version", "configure_logging", "did_you_mean", "quiet_on_broken_pipe"]

P = ParamSpec("P")

#: what a shell reports for a tool that SIGPIPE ended (128 + 13): ``set -o pipefail`` scripts
#: see the same code from these commands as from ``grep`` or ``cat``
EXIT_BROKEN_PIPE = 141


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: the program name and the installed package version."""
    parser.add_argument("--version", action="version", version=f"{parser.prog} {__version__}")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe or socket whose reading end is closed (poll says POLLERR)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def quiet_on_broken_pipe(main: Callable[P, int]) -> Callable[P, int]:
    """Wrap a console entry point so a closed stdout ends it with 141, not a traceback.

    ``mgms check-config ... | head -1`` closes the pipe while the command still writes; Python
    then raises BrokenPipeError at the next write or at the final flush (an "Exception
    ignored" message and exit 120). The flush is done here, inside the guard, and stdout is
    pointed at /dev/null so the interpreter's own flush at exit finds nothing to write. A
    BrokenPipeError from anything other than stdout (a socket) is not swallowed.
    """

    @functools.wraps(main)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            if not _stdout_reader_gone():
                raise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_BROKEN_PIPE

    return guarded


#: logging level -> syslog priority, for the ``<N>`` prefix journald reads on a stream line
_SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JournalFormatter(logging.Formatter):
    """``<4>gateway.runtime: message``: journald takes the priority from the prefix
    (``journalctl -p warning`` works) and stamps the time itself, so none is written."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 5 if record.levelno > logging.INFO else 7)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd set up for this service.

    systemd exports ``JOURNAL_STREAM=<device>:<inode>`` of that stream; a child whose stderr
    was redirected elsewhere inherits the variable but not the stream, hence the comparison.
    """
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return bool(stream) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):
        return False


def configure_logging(level: str | int) -> None:
    """Root logging to stderr: timestamped lines on a terminal, journal lines under systemd."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if stderr_is_journal() else logging.Formatter(TERMINAL_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
