"""Suite-wide guard: a test must not leave threads or child processes running behind it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    threads = set(threading.enumerate())
    children = _children()
    yield
    deadline = time.monotonic() + 3.0
    while True:
        extra = [t for t in threading.enumerate() if t not in threads and t.is_alive() and not t.daemon]
        extra_children = _children() - children
        if not extra and not extra_children:
            return
        if time.monotonic() > deadline:
            names = [t.name for t in extra]
            pytest.fail(f"test left behind threads {names} / child processes {sorted(extra_children)}")
        time.sleep(0.05)
