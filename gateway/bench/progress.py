"""One progress line per route with a counter (rewritten in place on a terminal)."""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``step(label, i, n)`` after each sample; ``done(label, ...)`` closes the line.

    On a terminal the counter is redrawn in place (``\\r``); into a file or pipe it prints
    at every tenth so a log stays short but still shows that the run moves.
    """

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()

    def step(self, label: str, i: int, n: int) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write(f"\r  {label}: {i}/{n}")
            self.stream.flush()
        elif i == n or i % max(1, n // 10) == 0:
            self.stream.write(f"  {label}: {i}/{n}\n")
            self.stream.flush()

    def done(self, label: str, n_ok: int, n: int, median_ms: float) -> None:
        if self.quiet:
            return
        head = "\r" if self.tty else ""
        self.stream.write(f"{head}  {label}: {n_ok}/{n} done, median {median_ms:.2f} ms\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(f"{text}\n")
            self.stream.flush()
