"""Clock offset between the MGMS and the AMS host: NTP-style exchanges over HTTPS and MQTT.

Why: a route that starts on one host and ends on another (flexibility MGMS db -> AMS db)
subtracts timestamps of two clocks. On one host they are the same clock; across hosts an
offset of a few ms would be the whole measurement. The bench therefore estimates the offset
over the same links the messages take (TLS to the AMS's HTTPS side, or the MQTT broker) and
corrects cross-host hops with it, reporting the uncertainty next to it.

The exchange (RFC 5905's on-wire method): the client notes ``t1`` and sends; the server
notes ``t2`` on receipt and ``t3`` just before it answers; the client notes ``t4``. Then::

    offset = ((t2 - t1) + (t3 - t4)) / 2      # server clock minus client clock
    delay  = (t4 - t1) - (t3 - t2)            # the network's share of the round trip

The true offset lies within ``offset +- delay / 2`` whatever the asymmetry of the path (the
request took between 0 and ``delay`` of it, the answer the rest), so the sample with the
smallest delay gives the tightest bound; that one is reported.

Sign convention (the one :func:`correction` applies): the client is the MGMS, the server the
AMS, so ``offset = AMS clock - MGMS clock``. A hop stamped at its start by host A and at its
end by host B lasted ``end - start - offset(A -> B)`` with ``offset(A -> B) = clock B -
clock A``: ``end - start - offset`` from MGMS to AMS, ``end - start + offset`` from AMS to
MGMS, uncorrected on one host. Its uncertainty is the offset's bound.

Servers, on the AMS host:

* HTTPS: ``python -m gateway.bench.clock serve --port 8471 --cert ... --key ...`` (or any
  endpoint answering ``GET /clock`` with ``{"t2_ns": ..., "t3_ns": ...}``);
* MQTT: ``python -m gateway.bench.clock serve --mqtt --config ams.yaml``: a responder with the
  AMS's broker credentials (the ``messaging.transports.mqtt`` block of its config). Requests
  travel on ``heila/v1/clock/to/<recipient>/from/<sender>/ClockRequest`` and answers on
  ``.../ClockResponse``: a root of their own, so the running Messengers (which subscribe to
  ``heila/v1/to/<participant>/#``) never see them. The broker needs two ACL lines for it
  (:func:`clock_acl`; mosquitto: ``pattern write heila/v1/clock/to/+/from/%u/#`` and
  ``pattern read heila/v1/clock/to/%u/#``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import ssl
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import ClientSession, TCPConnector, web

from gateway.services import MqttAcl
from gateway.transport.base import Delivery, Outgoing
from gateway.transport.mqtt import MqttSettings, MqttTransport

__all__ = [
    "CLOCK_ROOT",
    "ClockOffset",
    "Correction",
    "Host",
    "MqttClockResponder",
    "MqttEcho",
    "clock_acl",
    "clock_app",
    "clock_topic",
    "correction",
    "estimate_offset",
    "estimate_offset_mqtt",
    "mqtt_settings_of",
    "offset_from",
]

Clock = Callable[[], int]
"""A wall clock in ns; tests pass one shifted by a known offset."""

Host = Literal["mgms", "ams"]

CLOCK_ROOT = "heila/v1/clock/to"
WARM_UP = 3  # the first exchanges include TLS handshakes, connection set-up, first subscriptions


def clock_topic(recipient: str, sender: str, kind: str) -> str:
    """The clock exchange's topic: the message layout's shape under a root of its own."""
    return f"{CLOCK_ROOT}/{recipient}/from/{sender}/{kind}"


def clock_acl(participants: Sequence[str]) -> list[MqttAcl]:
    """The broker ACL lines the MQTT exchange needs, per participant (as the layout's ACLs)."""
    out: list[MqttAcl] = []
    for p in participants:
        out.append(MqttAcl(p, "write", f"{CLOCK_ROOT}/+/from/{p}/#"))
        out.append(MqttAcl(p, "read", f"{CLOCK_ROOT}/{p}/#"))
    return out


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """The peer's (AMS) clock minus ours (MGMS), in ms, within ``+- uncertainty_ms``.

    ``method`` is how it was found (``https``, ``mqtt``); ``peer`` whom it was found against
    (a URL, or ``mqtt://host:port/participant``). The delays tell how good the link was.
    """

    offset_ms: float
    uncertainty_ms: float
    method: str
    peer: str
    min_delay_ms: float
    median_delay_ms: float
    exchanges: int

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "offset_ms": self.offset_ms,
            "uncertainty_ms": self.uncertainty_ms,
            "method": self.method,
            "peer": self.peer,
            "min_delay_ms": self.min_delay_ms,
            "median_delay_ms": self.median_delay_ms,
            "exchanges": self.exchanges,
        }


def offset_from(t1: int, t2: int, t3: int, t4: int) -> tuple[float, float]:
    """(offset ns, delay ns) of one exchange (see the module docstring)."""
    return ((t2 - t1) + (t3 - t4)) / 2, float((t4 - t1) - (t3 - t2))


def best_of(samples: Sequence[tuple[float, float]], method: str, peer: str) -> ClockOffset:
    """The sample with the smallest delay (the tightest bound), with the delays' spread."""
    if not samples:
        raise ValueError(f"no clock exchange with {peer} completed")
    best_offset, best_delay = min(samples, key=lambda s: s[1])
    return ClockOffset(
        offset_ms=best_offset / 1e6,
        uncertainty_ms=best_delay / 2e6,
        method=method,
        peer=peer,
        min_delay_ms=best_delay / 1e6,
        median_delay_ms=statistics.median(d for _, d in samples) / 1e6,
        exchanges=len(samples),
    )


# ---------------------------------------------------------------------------- correction


@dataclass(frozen=True, slots=True)
class Correction:
    """What was done to one route or hop: ``corrected = raw - applied_ms``, good to ``+- uncertainty_ms``.

    ``cross_host`` says whether its start and end were stamped by different hosts; a hop
    between the MGMS and the AMS on one host is not (one clock), so nothing is applied.
    """

    start: Host
    end: Host
    cross_host: bool
    applied_ms: float
    uncertainty_ms: float

    def apply(self, values: Sequence[float]) -> list[float]:
        return [v - self.applied_ms for v in values]

    def as_dict(self) -> dict[str, Any]:
        return {
            "clock_hosts": f"{self.start}->{self.end}",
            "cross_host": self.cross_host,
            "offset_applied_ms": self.applied_ms,
            "offset_uncertainty_ms": self.uncertainty_ms,
        }


def correction(start: Host, end: Host, offset: ClockOffset | None, *, ams_remote: bool) -> Correction:
    """The correction of a hop stamped by ``start``'s clock then ``end``'s.

    ``offset`` is AMS clock minus MGMS clock; ``offset(A -> B) = clock B - clock A`` is
    subtracted. Only when the AMS is on another host (``ams_remote``): on one host the
    estimate is reported but the clock is the same, so applying it would only add its noise.
    """
    if start == end or not ams_remote:
        return Correction(start, end, False, 0.0, 0.0)
    if offset is None:
        raise ValueError("the AMS is remote but no clock offset was estimated (give --clock-url or --clock-mqtt)")
    sign = 1.0 if (start, end) == ("mgms", "ams") else -1.0
    return Correction(start, end, True, sign * offset.offset_ms, offset.uncertainty_ms)


# ---------------------------------------------------------------------------- HTTPS


def clock_app(clock: Clock = time.time_ns) -> web.Application:
    """An aiohttp app answering ``GET /clock`` with its receive and send times (ns, ``clock``)."""

    async def handle(request: web.Request) -> web.Response:
        t2 = clock()
        return web.json_response({"t2_ns": t2, "t3_ns": clock()})

    app = web.Application()
    app.router.add_get("/clock", handle)
    return app


async def estimate_offset(url: str, tls: ssl.SSLContext | None, n: int = 50) -> ClockOffset:
    """``n`` exchanges with ``url`` (a ``/clock`` endpoint) on one kept-alive TLS connection."""
    samples: list[tuple[float, float]] = []
    async with ClientSession(connector=TCPConnector(ssl=tls if tls is not None else False, limit=1)) as session:
        for i in range(n + WARM_UP):
            t1 = time.time_ns()
            async with session.get(url) as resp:
                body = await resp.json()
            t4 = time.time_ns()
            resp.raise_for_status()
            if i >= WARM_UP:
                samples.append(offset_from(t1, int(body["t2_ns"]), int(body["t3_ns"]), t4))
    return best_of(samples, "https", url)


# ---------------------------------------------------------------------------- MQTT


def _own(settings: MqttSettings, role: str, subscription: str) -> MqttSettings:
    """The participant's broker settings for a side connection of its own: a fresh client id
    (the running gateway or AMS keeps its own), no session left behind, one subscription."""
    return settings.model_copy(
        update={
            "client_id": f"{settings.participant}-{role}-{secrets.token_hex(3)}",
            "session_expiry_s": 0,
            "subscriptions": (subscription,),
            "share_group": None,
        }
    )


def _peer_of(topic: str) -> str:
    """The sender in ``heila/v1/clock/to/<recipient>/from/<sender>/<kind>``."""
    parts = topic.split("/")
    if len(parts) != 8 or parts[5] != "from":
        raise ValueError(f"not a clock topic: {topic!r}")
    return parts[6]


class MqttClockResponder:
    """The AMS side of the MQTT exchange: answers each ClockRequest with (t2, t3) of ``clock``.

    ``t2`` is read when the handler runs, a few us after the bytes arrived: still inside
    the server's receive -> send interval, so the bound holds (it only widens by that much).
    """

    def __init__(self, settings: MqttSettings, *, clock: Clock = time.time_ns) -> None:
        me = settings.participant
        self.transport = MqttTransport(_own(settings, "clock", clock_topic(me, "+", "ClockRequest")))
        self.clock = clock
        self.answered = 0

    async def start(self) -> None:
        await self.transport.start(self._on_request)

    async def close(self) -> None:
        await self.transport.close()

    async def _on_request(self, delivery: Delivery) -> None:
        t2 = self.clock()
        try:
            rid = str(json.loads(delivery.data)["id"])
            peer = _peer_of(delivery.topic)
        except (ValueError, KeyError, TypeError):
            return  # not ours to answer; acked and dropped
        me = self.transport.settings.participant
        t3 = self.clock()
        body = json.dumps({"id": rid, "t2_ns": t2, "t3_ns": t3}).encode()
        await self.transport.send(Outgoing(rid, peer, clock_topic(peer, me, "ClockResponse"), body))
        self.answered += 1


class _Waiter:
    """Futures keyed by request id, resolved by the transport's handler with the arrival."""

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[tuple[int, dict[str, Any]]]] = {}

    def expect(self, rid: str) -> asyncio.Future[tuple[int, dict[str, Any]]]:
        fut: asyncio.Future[tuple[int, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        return fut

    async def __call__(self, delivery: Delivery) -> None:
        try:
            body = json.loads(delivery.data)
            fut = self.pending.get(str(body["id"]))
        except (ValueError, KeyError, TypeError):
            return
        if fut is not None and not fut.done():
            fut.set_result((delivery.received_ns, body))


async def _exchange(
    transport: MqttTransport, waiter: _Waiter, topic: str, recipient: str, timeout_s: float
) -> tuple[int, int, dict[str, Any]]:
    """Send one request; (t1, t4, answer). The answer may come before our PUBACK does."""
    rid = secrets.token_hex(8)
    fut = waiter.expect(rid)
    try:
        t1 = time.time_ns()
        await transport.send(Outgoing(rid, recipient, topic, json.dumps({"id": rid}).encode()))
        async with asyncio.timeout(timeout_s):
            t4, body = await fut
        return t1, t4, body
    finally:
        waiter.pending.pop(rid, None)


async def estimate_offset_mqtt(settings: MqttSettings, peer: str, n: int = 50, timeout_s: float = 5.0) -> ClockOffset:
    """``n`` exchanges with ``peer``'s :class:`MqttClockResponder` over the broker in ``settings``.

    ``t4`` is the transport's receive probe (``received_ns``, stamped in paho's on_message).
    """
    me = settings.participant
    waiter = _Waiter()
    transport = MqttTransport(_own(settings, "clockprobe", clock_topic(me, peer, "ClockResponse")))
    await transport.start(waiter)
    samples: list[tuple[float, float]] = []
    try:
        for i in range(n + WARM_UP):
            t1, t4, body = await _exchange(transport, waiter, clock_topic(peer, me, "ClockRequest"), peer, timeout_s)
            if i >= WARM_UP:
                samples.append(offset_from(t1, int(body["t2_ns"]), int(body["t3_ns"]), t4))
    finally:
        await transport.close()
    return best_of(samples, "mqtt", f"mqtt://{settings.host}:{settings.port}/{peer}")


class MqttEcho:
    """Publish -> on_message through the broker on one connection of our own: the MQTT floor
    a real lab allows (the lab's broker and credentials, our transport layer, no Messenger).

    The topic is the clock root's ``to/<me>/from/<me>/Floor``: allowed by the same two ACL
    lines, and out of the running Messengers' way.
    """

    def __init__(self, settings: MqttSettings) -> None:
        me = settings.participant
        self.topic = clock_topic(me, me, "Floor")
        self.me = me
        self.waiter = _Waiter()
        self.transport = MqttTransport(_own(settings, "floor", self.topic))

    async def __aenter__(self) -> MqttEcho:
        await self.transport.start(self.waiter)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    async def one(self, timeout_s: float = 5.0) -> float:
        """ms from just before the publish to its arrival back (one way through the broker)."""
        t1, t4, _ = await _exchange(self.transport, self.waiter, self.topic, self.me, timeout_s)
        return (t4 - t1) / 1e6


# ---------------------------------------------------------------------------- CLI


async def _serve_https(host: str, port: int, tls: ssl.SSLContext | None) -> None:
    runner = web.AppRunner(clock_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    print(f"clock endpoint on {'https' if tls else 'http'}://{host}:{port}/clock", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _serve_mqtt(settings: MqttSettings) -> None:
    responder = MqttClockResponder(settings)
    await responder.start()
    print(
        f"clock responder {settings.participant} on mqtt://{settings.host}:{settings.port} "
        f"({clock_topic(settings.participant, '+', 'ClockRequest')})",
        flush=True,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await responder.close()


def mqtt_settings_of(config: str, kind: Literal["ams", "lab"]) -> MqttSettings:
    """The ``messaging.transports.mqtt`` block of an AMS config or a lab config."""
    if kind == "ams":
        from ams.config import load_ams_config

        messaging = load_ams_config(config).messaging
    else:
        from gateway.config import load_config

        lab = load_config(config).messaging
        if lab is None:
            raise ValueError(f"{config}: no messaging block")
        messaging = lab
    raw = messaging.transports.get("mqtt")
    if raw is None:
        raise ValueError(f"{config}: messaging has no mqtt transport")
    return MqttSettings.model_validate({**raw, "participant": messaging.participant})


def main(argv: list[str] | None = None) -> int:
    """``serve`` on the AMS host; ``probe`` from the MGMS host (HTTPS URL or ``--mqtt``)."""
    ap = argparse.ArgumentParser(prog="python -m gateway.bench.clock", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="0.0.0.0")  # reached from the MGMS host
    s.add_argument("--port", type=int, default=8471)
    s.add_argument("--cert")
    s.add_argument("--key")
    s.add_argument("--mqtt", action="store_true", help="answer over the broker of --config instead of HTTPS")
    s.add_argument("--config", help="AMS config (ams run's) whose messaging.transports.mqtt block to use")
    p = sub.add_parser("probe")
    p.add_argument("url", nargs="?", help="https://ams-host:8471/clock")
    p.add_argument("--ca-file")
    p.add_argument("--mqtt", action="store_true", help="probe over the broker of --config instead of HTTPS")
    p.add_argument("--config", help="lab config whose messaging.transports.mqtt block to use")
    p.add_argument("--peer", default="ams", help="the responder's participant name (default ams)")
    p.add_argument("-n", type=int, default=50)
    args = ap.parse_args(argv)
    if args.mqtt and not args.config:
        ap.error("--mqtt needs --config")
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            if args.mqtt:
                asyncio.run(_serve_mqtt(mqtt_settings_of(args.config, "ams")))
            else:
                tls = None
                if args.cert:
                    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    tls.load_cert_chain(args.cert, args.key)
                asyncio.run(_serve_https(args.host, args.port, tls))
        return 0
    if args.mqtt:
        est = asyncio.run(estimate_offset_mqtt(mqtt_settings_of(args.config, "lab"), args.peer, args.n))
    elif args.url:
        ctx = ssl.create_default_context(cafile=args.ca_file) if args.url.startswith("https") else None
        est = asyncio.run(estimate_offset(args.url, ctx, args.n))
    else:
        ap.error("probe needs a URL or --mqtt")
    print(
        f"offset {est.offset_ms:+.3f} ms +- {est.uncertainty_ms:.3f} ms over {est.method} "
        f"(min delay {est.min_delay_ms:.3f} ms, {est.exchanges} exchanges with {est.peer})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
