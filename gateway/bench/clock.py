"""Clock offset between the MGMS and the AMS host: an NTP-style exchange over HTTPS.

Why: a route that starts on one host and ends on another (flexibility MGMS db -> AMS db)
subtracts timestamps of two clocks. On one host they are the same clock; across hosts an
offset of a few ms would be the whole measurement. The bench therefore estimates the offset
over the same kind of link the messages take (TLS to the AMS's HTTPS side) and corrects
cross-host hops with it, reporting the uncertainty next to it.

The exchange (RFC 5905's on-wire method): the client notes ``t1`` and sends; the server
notes ``t2`` on receipt and ``t3`` just before it answers; the client notes ``t4``. Then::

    offset = ((t2 - t1) + (t3 - t4)) / 2      # server clock minus client clock
    delay  = (t4 - t1) - (t3 - t2)            # the network's share of the round trip

The true offset lies within ``offset +- delay / 2`` whatever the asymmetry of the path, so
the sample with the smallest delay gives the tightest bound; that one is reported.

On the AMS host: ``python -m gateway.bench.clock serve --port 8471 --cert ... --key ...``
(or any HTTPS endpoint answering ``GET /clock`` with ``{"t2_ns": ..., "t3_ns": ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import time
from dataclasses import dataclass

from aiohttp import ClientSession, TCPConnector, web

__all__ = ["ClockEstimate", "clock_app", "estimate_offset", "offset_from"]


@dataclass(frozen=True, slots=True)
class ClockEstimate:
    """Server clock minus client clock (ms), its bound (+- ms) and the exchange's delays."""

    offset_ms: float
    uncertainty_ms: float
    min_delay_ms: float
    median_delay_ms: float
    exchanges: int
    url: str

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "offset_ms": self.offset_ms,
            "uncertainty_ms": self.uncertainty_ms,
            "min_delay_ms": self.min_delay_ms,
            "median_delay_ms": self.median_delay_ms,
            "exchanges": self.exchanges,
            "url": self.url,
        }


def offset_from(t1: int, t2: int, t3: int, t4: int) -> tuple[float, float]:
    """(offset ns, delay ns) of one exchange (see the module docstring)."""
    return ((t2 - t1) + (t3 - t4)) / 2, float((t4 - t1) - (t3 - t2))


def clock_app() -> web.Application:
    """An aiohttp app answering ``GET /clock`` with its receive and send times (ns, wall clock)."""

    async def clock(request: web.Request) -> web.Response:
        t2 = time.time_ns()
        return web.json_response({"t2_ns": t2, "t3_ns": time.time_ns()})

    app = web.Application()
    app.router.add_get("/clock", clock)
    return app


async def estimate_offset(url: str, tls: ssl.SSLContext | None, n: int = 50) -> ClockEstimate:
    """``n`` exchanges with ``url`` (a ``/clock`` endpoint) on one kept-alive TLS connection."""
    samples: list[tuple[float, float]] = []
    async with ClientSession(connector=TCPConnector(ssl=tls if tls is not None else False, limit=1)) as session:
        for i in range(n + 3):
            t1 = time.time_ns()
            async with session.get(url) as resp:
                body = await resp.json()
            t4 = time.time_ns()
            resp.raise_for_status()
            if i >= 3:  # the first ones include the TLS handshake
                samples.append(offset_from(t1, int(body["t2_ns"]), int(body["t3_ns"]), t4))
    best_offset, best_delay = min(samples, key=lambda s: s[1])
    return ClockEstimate(
        offset_ms=best_offset / 1e6,
        uncertainty_ms=best_delay / 2e6,
        min_delay_ms=best_delay / 1e6,
        median_delay_ms=statistics.median(d for _, d in samples) / 1e6,
        exchanges=len(samples),
        url=url,
    )


async def _serve(host: str, port: int, tls: ssl.SSLContext | None) -> None:
    runner = web.AppRunner(clock_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    print(f"clock endpoint on {'https' if tls else 'http'}://{host}:{port}/clock", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """``serve`` on the AMS host; ``probe URL`` from the MGMS host."""
    ap = argparse.ArgumentParser(prog="python -m gateway.bench.clock", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="0.0.0.0")  # reached from the MGMS host
    s.add_argument("--port", type=int, default=8471)
    s.add_argument("--cert")
    s.add_argument("--key")
    p = sub.add_parser("probe")
    p.add_argument("url")
    p.add_argument("--ca-file")
    p.add_argument("-n", type=int, default=50)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        tls = None
        if args.cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(args.cert, args.key)
        try:
            asyncio.run(_serve(args.host, args.port, tls))
        except KeyboardInterrupt:
            return 0
        return 0
    ctx = ssl.create_default_context(cafile=args.ca_file) if args.url.startswith("https") else None
    est = asyncio.run(estimate_offset(args.url, ctx, args.n))
    print(f"offset {est.offset_ms:+.3f} ms +- {est.uncertainty_ms:.3f} ms (min delay {est.min_delay_ms:.3f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
