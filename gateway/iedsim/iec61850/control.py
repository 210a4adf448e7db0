"""Line-based fault injection for a running ``iedsim iec61850`` (loopback TCP).

Commands, one per line, each answered ``ok ...`` or ``err <reason>``: see
:attr:`MmsControlChannel.COMMANDS` (what ``help`` answers)."""

from __future__ import annotations

import json
import logging
import time

from gateway.iedsim.control import LineControlServer
from gateway.iedsim.iec61850.server import Iec61850Server

__all__ = ["MmsControlChannel"]

_log = logging.getLogger(__name__)


class MmsControlChannel(LineControlServer):
    """Fault injection for one simulated IED, like the 104 simulator's control channel."""

    COMMANDS = (
        ("stop", "stop serving (clients see the link drop)"),
        ("start", "serve again on the same port"),
        ("drop", "stop and start at once: every client loses its association and may reconnect"),
        ("interlock on|off", "refuse operations with AddCause blocked-by-interlocking (or stop doing so)"),
        ("set NAME VALUE", "force a point; answers ok <time.time() of the update>; the report leaves at once"),
        ("release NAME", "let the feeder model drive NAME again after set"),
        ("quality NAME good|invalid", "set the quality of a point"),
        ("travel SECONDS", "breaker travel time"),
        ("stats", "JSON: operations, interlock, running, missing references"),
    )

    def __init__(self, server: Iec61850Server, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self._sim = server

    async def handle(self, words: list[str]) -> str:
        return await self.execute(words)

    async def execute(self, words: list[str]) -> str:
        """Run one command; the answer line without its newline."""
        sim = self._sim
        cmd, args = words[0], words[1:]
        try:
            if cmd == "stop":
                await sim.stop()
                return "ok stopped"
            if cmd == "drop":
                # every client loses its association (libiec61850 has no per-client close): stop and serve again
                await sim.stop()
                await sim.start()
                return f"ok dropped, listening on {sim.port}"
            if cmd == "start":
                await sim.start()
                return f"ok listening on {sim.port}"
            if cmd == "interlock" and args and args[0] in ("on", "off"):
                sim.interlocked = args[0] == "on"
                return f"ok interlock {args[0]}"
            if cmd == "set" and len(args) == 2:
                at = time.time()
                sim.set_value(args[0], float(args[1]))
                return f"ok {at:.6f}"
            if cmd == "release" and len(args) == 1:
                sim.model.release(args[0])
                return "ok"
            if cmd == "quality" and len(args) == 2 and args[1] in ("good", "invalid"):
                sim.set_quality(args[0], invalid=args[1] == "invalid")
                return "ok"
            if cmd == "travel" and len(args) == 1:
                sim.travel_s = float(args[0])
                return f"ok travel {sim.travel_s:g} s"
            if cmd == "stats":
                return "ok " + json.dumps(
                    {"name": sim.name, "port": sim.port, "operations": sim.operations, "interlocked": sim.interlocked,
                     "running": sim.running, "missing": sim.missing}
                )
        except KeyError as exc:
            return f"err unknown point {exc}"
        except ValueError as exc:
            return f"err {exc}"
        return f"err unknown command {' '.join(words)!r}"
