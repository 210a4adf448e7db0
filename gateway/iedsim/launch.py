"""Start simulators as child processes, the way a lab (or the demo, or a benchmark) runs them.

A simulator in its own process keeps its event loop and the GIL away from the gateway's,
so timings measured across the two are not flattered or spoiled by sharing one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

__all__ = ["SimProcess"]


class SimProcess:
    """``iedsim iec104`` as a child process, with its line-based control channel."""

    def __init__(self, config_file: Path, device: str, port: int, control_port: int, *, stations: int = 1) -> None:
        self.args = [
            sys.executable,
            "-m",
            "gateway.iedsim.cli",
            "--log-level",
            "WARNING",
            "iec104",
            "--config",
            str(config_file),
            "--device",
            device,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--control-port",
            str(control_port),
            "--stations",
            str(stations),
            "--parent-pid",
            str(os.getpid()),
        ]
        self.ready_lines: list[str] = []
        self.control_port = control_port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout_s: float = 15.0) -> str:
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        first = ""
        async with asyncio.timeout(timeout_s):
            while True:
                line = (await self.proc.stdout.readline()).decode().strip()
                if not line:
                    raise RuntimeError(f"simulator exited (code {await self.proc.wait()})")
                first = first or line
                self.ready_lines.append(line)
                if line.startswith("control channel"):
                    return first

    async def control(self, line: str) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.control_port)
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
