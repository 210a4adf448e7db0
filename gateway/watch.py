"""``mgms watch``: the live points in a terminal, redrawn from the Redis change feed.

It reads only Redis (latest-value hashes once, then the change stream with a blocking
XREAD), so it runs anywhere Redis is reachable, gateway or not, and never polls the device.
"""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

from gateway.config import LabConfig
from gateway.errors import StoreError
from gateway.points import DoublePoint, Quality
from gateway.store import RedisStore, StoredValue

__all__ = ["render", "watch"]

_DOUBLE_TEXT = {int(d): d.name.lower() for d in DoublePoint}


def _fmt_value(v: StoredValue | None, kind: str) -> str:
    if v is None or v.value is None:
        return "-"
    if kind == "double":
        return f"{_DOUBLE_TEXT.get(int(v.value), '?')} ({int(v.value)})"
    if kind == "single":
        return "on" if v.value else "off"
    return f"{float(v.value):.3f}"


def render(cfg: LabConfig, values: dict[str, StoredValue], links: dict[str, str], at: float) -> str:
    """The whole screen as text: one line per device link, one per point."""
    lines = [f"MGMS lab {cfg.lab.name} - {time.strftime('%H:%M:%S', time.localtime(at))}"]
    for dev, state in links.items():
        lines.append(f"  device {dev}: link {state}")
    lines.append("")
    lines.append(f"{'point':<28} {'value':>18} {'unit':<5} {'quality':<22} {'age':>8}  cause")
    for p in cfg.points:
        if p.direction.value != "monitor":
            continue
        v = values.get(p.name)
        q = "-" if v is None else ("good" if v.quality == Quality.GOOD else ",".join(v.flags))
        age = "-" if v is None else f"{max(0.0, at - v.recv_ts):.1f}s"
        cause = "" if v is None else v.cause
        lines.append(f"{p.name:<28} {_fmt_value(v, p.address.kind):>18} {p.unit:<5} {q:<22} {age:>8}  {cause}")
    return "\n".join(lines)


async def watch(
    cfg: LabConfig, store: RedisStore, *, once: bool = False, out: TextIO, max_rate_hz: float = 5.0
) -> None:
    """Print the table; unless ``once``, redraw it on every change (at most ``max_rate_hz``)."""
    values = await store.latest_all()
    links = {}
    for dev in cfg.devices:
        link = await store.link(dev)
        links[dev] = link.state if link is not None else "unknown"
    if once:
        out.write(render(cfg, values, links, time.time()) + "\n")
        return
    last_id = await store.changes_tail()
    min_gap = 1.0 / max_rate_hz
    drawn = 0.0
    dirty = True
    while True:
        if dirty and time.monotonic() - drawn >= min_gap:
            out.write("\x1b[H\x1b[2J" + render(cfg, values, links, time.time()) + "\n")
            out.flush()
            drawn, dirty = time.monotonic(), False
        try:
            entries = await store.changes(last_id, block_ms=int(min_gap * 1000))
        except StoreError as exc:
            out.write(f"\nRedis unavailable ({exc}); retrying\n")
            await asyncio.sleep(1.0)
            continue
        if entries:
            last_id, dirty = entries[-1].id, True
        if dirty:
            values = await store.latest_all()
            for dev in cfg.devices:
                link = await store.link(dev)
                links[dev] = link.state if link is not None else "unknown"
