"""pytest plugin: run a test marked ``forked`` in a forked child of the test runner.

Why: c104 2.2.1 (lib60870 in native threads) can SIGSEGV the whole process
(docs/protocol-notes.md; seen in CI while a c104 client was stopped and rebuilt during a
refused TLS handshake). A crash inside the runner ends the suite with no report of the other
tests. In a child, the crash fails that one test, with the signal named, and no c104 client
or thread survives into the tests after it (the child leaves with ``os._exit``: no C++
destructor runs at an arbitrary moment of a later test).

pytest-forked does the same but cannot carry pytest 9's reports (``marshal`` refuses them);
this uses pytest's own report serialisation (the one pytest-xdist uses). The child sets up
and tears down every fixture the test needs (``nextitem=None``); only the tests that opt in
are forked, and they must not need a fixture whose teardown would act on the runner's state.
Loaded by ``-p tests.forkbox`` (pyproject addopts) for tests/ and hil_tests/.
"""

from __future__ import annotations

import json
import os
import signal
import traceback
from typing import Any

import pytest
from _pytest.runner import runtestprotocol

_CHILD_FAILED = 3
_CRASHES = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "forked: run this test in a forked child (a crash fails only it)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if item.get_closest_marker("forked") is None:
        return None
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports, crash = _run_in_child(item)
    if crash is not None and item.get_closest_marker("forked").kwargs.get("rerun_on_signal", True):
        # A native crash (never an assertion) gets one more run in a new child; it is listed
        # at the end of the run, so a crash rate is seen, not hidden.
        item.config.stash.setdefault(_CRASHES, []).append(f"{item.nodeid}: {crash}")
        reports, crash = _run_in_child(item)
    for report in reports:
        ihook.pytest_runtest_logreport(report=report)
    # the runner's own fixture stack, as runtestprotocol would leave it for the next test
    item.session._setupstate.teardown_exact(nextitem)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    crashes = config.stash.get(_CRASHES, [])
    if crashes:
        terminalreporter.section("native crashes in forked tests (each run once more)", sep="-", yellow=True)
        for line in crashes:
            terminalreporter.line(line)


def _run_in_child(item: pytest.Item) -> tuple[list[pytest.TestReport], str | None]:
    """The test's reports, and the signal that killed the child (None if it was not killed)."""
    config = item.config
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, send the reports, leave without running any destructor
        os.close(read_fd)
        code = 0
        try:
            reports = runtestprotocol(item, log=False, nextitem=None)
            data = json.dumps(
                [config.hook.pytest_report_to_serializable(config=config, report=r) for r in reports]
            ).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view) :]
        except BaseException:  # anything here is a harness failure, reported by the parent
            traceback.print_exc()
            code = _CHILD_FAILED
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and chunks:
        loaded: list[dict[str, Any]] = json.loads(b"".join(chunks))
        reports = [config.hook.pytest_report_from_serializable(config=config, data=d) for d in loaded]
        return [r for r in reports if isinstance(r, pytest.TestReport)], None
    crash: str | None = None
    if os.WIFSIGNALED(status):
        crash = signal.Signals(os.WTERMSIG(status)).name
        why = f"the forked test process was killed by {crash}"
    else:
        why = f"the forked test process exited with status {os.waitstatus_to_exitcode(status)} without a report"
    return [
        pytest.TestReport(
            nodeid=item.nodeid,
            location=item.location,
            keywords=dict.fromkeys(item.keywords, 1),
            outcome="failed",
            longrepr=why,
            when="call",
        )
    ], crash
