"""How long a simulated change takes to reach a c104 client: set_value() -> on_receive.

The simulator exists partly to measure the gateway's latency, so its own share must be
small and known. This times, one sample at a time (no pipelining), from the instant
``Iec104Outstation.set_value()`` is called to the instant a bare ``c104.Client``'s
``point.on_receive`` callback runs (the timestamp is taken inside the callback, on c104's
thread, so the hop back into asyncio is not counted). It also reports the simulator's own
part: set_value() called -> the time set_value() returns for its first transport.write().
Both ends run in one process, so the c104 thread competes for the GIL with the simulator;
the figures are an upper bound of what a separate simulator process would show.

Usage: python bench/sim_emit_latency.py [--samples 1000] [--point feeder.voltage.l1]

No ``from __future__ import annotations``: c104 checks callback annotations at run time.
"""

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import c104

from gateway.bench.stats import pct, summarise
from gateway.config import LabConfig, load_config
from gateway.iedsim.iec104 import Iec104Outstation

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "lab_configs" / "multipower-sim.yaml"


def quiet(config: LabConfig, device: str, period_s: float) -> LabConfig:
    """The lab with the feeder's periodic step slowed, so only our changes are on the wire."""
    dev = config.devices[device]
    sim = dev.simulator.model_copy(update={"period_s": period_s})
    return config.model_copy(update={"devices": {**config.devices, device: dev.model_copy(update={"simulator": sim})}})


class Receiver:
    """Records the perf_counter time of every on_receive for one point; wakes the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.arrived_at = 0.0
        self.event = asyncio.Event()

    def on_receive(
        self, point: c104.Point, previous_info: c104.Information, message: c104.IncomingMessage
    ) -> c104.ResponseState:
        t = time.perf_counter()
        if message.cot == c104.Cot.SPONTANEOUS:
            with self.lock:
                self.arrived_at = t
            self.loop.call_soon_threadsafe(self.event.set)
        return c104.ResponseState.NONE


async def open_client(outstation: Iec104Outstation, ioa: int, type_name: str, receiver: Receiver) -> c104.Client:
    client = c104.Client(tick_rate_ms=50, command_timeout_ms=1000)
    connection = client.add_connection(ip="127.0.0.1", port=outstation.port, init=c104.Init.ALL)
    assert connection is not None
    params = connection.protocol_parameters
    t = outstation.timers
    params.message_timeout, params.confirm_interval, params.keep_alive_interval = t.t1_s, t.t2_s, t.t3_s
    params.send_window_size, params.receive_window_size = t.k, t.w
    station = connection.add_station(common_address=outstation.common_address)
    assert station is not None
    point = station.add_point(io_address=ioa, type=getattr(c104.Type, type_name))
    assert point is not None
    point.on_receive(callable=receiver.on_receive)
    client.start()
    deadline = time.monotonic() + 10
    muted_since = None
    while connection.state != c104.ConnectionState.OPEN:
        if time.monotonic() > deadline:
            raise SystemExit(f"c104 client did not connect: {connection.state}")
        if connection.state == c104.ConnectionState.OPEN_MUTED:  # c104 sometimes skips STARTDT
            muted_since = muted_since or time.monotonic()
            if time.monotonic() - muted_since > 0.1:
                connection.unmute()
                muted_since = None
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # let the initial GI and clock sync pass
    return client


def next_value(kind: str, base: float, i: int) -> float:
    """A value that differs from the previous sample's, valid for the point's kind."""
    if kind == "double":
        return 1.0 if i % 2 else 2.0  # OFF / ON
    if kind == "single":
        return float(i % 2)
    return base + 1.0 + (i % 50) * 0.5 if i % 2 else base


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in samples_s]
    s = summarise(ms)
    return {
        "n": s.n,
        "median_ms": s.median_ms,
        "mean_ms": s.mean_ms,
        "p90_ms": pct(ms, 0.90),
        "p99_ms": s.p99_ms,
        "max_ms": s.max_ms,
        "min_ms": min(ms),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    config = quiet(load_config(args.config), args.device, args.period_s)
    point = config.point(args.point)
    async with Iec104Outstation(config, args.device, host="127.0.0.1", port=0) as outstation:
        receiver = Receiver(asyncio.get_running_loop())
        client = await open_client(outstation, point.address.ioa, point.address.type, receiver)
        emit: list[float] = []
        end_to_end: list[float] = []
        lost = 0
        try:
            base = outstation.values()[args.point].value
            for i in range(args.warmup + args.samples):
                receiver.event.clear()
                value = next_value(point.address.kind, base, i)
                t0_wall = time.time()
                t0 = time.perf_counter()
                outstation.set_value(args.point, value)  # returns the change time; we want the write
                written_wall = time.time()  # set_value() returns right after its first transport.write()
                try:
                    async with asyncio.timeout(2):
                        await receiver.event.wait()
                except TimeoutError:
                    lost += 1
                    continue
                with receiver.lock:
                    arrived = receiver.arrived_at
                if i >= args.warmup:
                    emit.append(written_wall - t0_wall)
                    end_to_end.append(arrived - t0)
                await asyncio.sleep(args.gap_s)
        finally:
            await asyncio.to_thread(client.stop)
        stats = outstation.stats().as_dict()
    return {
        "point": args.point,
        "type": point.address.type,
        "set_value_to_write": summary(emit),
        "set_value_to_c104_on_receive": summary(end_to_end),
        "lost": lost,
        "outstation": {k: stats[k] for k in ("frames_out", "drops", "suppressed")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--device", default="ref615")
    parser.add_argument("--point", default="feeder.voltage.l1")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--gap-s", type=float, default=0.001, help="pause between samples")
    parser.add_argument("--period-s", type=float, default=3600.0, help="feeder step period during the run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args(argv)
    if args.samples < 100:
        parser.error("--samples must be at least 100 for a p99")
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"iedsim IEC 104 emit latency, {args.point} ({result['type']}), one sample at a time")
    for key, label in (
        ("set_value_to_write", "set_value -> first write"),
        ("set_value_to_c104_on_receive", "set_value -> c104 on_receive"),
    ):
        s = result[key]
        assert isinstance(s, dict)
        print(
            f"  {label:30s} n={s['n']:5d}  median {s['median_ms']:.3f} ms  mean {s['mean_ms']:.3f} ms"
            f"  p90 {s['p90_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms  max {s['max_ms']:.3f} ms"
        )
    print(f"  lost {result['lost']}, outstation {result['outstation']}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
