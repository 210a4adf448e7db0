"""The floors: each protocol stack bare, on the same machine, in the same run.

Why: a latency figure alone does not say how much of it the gateway adds. Each route of
``mgms bench`` is paired with the same exchange done by the bare library with nothing of
ours in between, so "median vs floor" is the gateway's own cost:

* c104: a bare ``c104.Client`` on the 104 simulator; value change -> ``on_receive`` callback,
  and the SBO breaker command -> position callback (travel time 0).
* raw-socket IEC 104 (the asyncio engine's floor): an asyncio reader on the bench's event loop,
  STARTDT, the project's codec; value change -> the frame decoded
  (:mod:`gateway.protocols.iec104.bare_raw`).
* libiec61850: simulator update -> report callback of the adapter's connection without the
  gateway, its receive path ticked when the socket is readable instead of by libiec61850's
  thread, which sleeps 10 ms whenever it finds nothing (:mod:`gateway.protocols.iec61850.bare`).
* gurux: one register GET through a bare gurux session (no adapter queue, no store).
* mosquitto: bare paho clients (their own network threads) over TLS, QoS 1, publish ->
  subscriber's ``on_message``.
* aiohttp: a bare TLS POST (mutual TLS, keep-alive) to a bare aiohttp handler.
* durable floors (``durable=``): the same bare transports, and the receiver makes the payload
  durable before it acknowledges: one ``XADD`` to a Redis with ``appendfsync always``, inside
  paho's ``on_message`` (paho sends the PUBACK after it returns) or the aiohttp handler
  (before the 200). The sample ends when the XADD has returned. A message route that must
  not lose what it acknowledged cannot be faster than this (plus its seal and open).
"""

# No ``from __future__ import annotations`` here: c104 checks a callback's signature by its
# annotation objects and refuses strings.
import asyncio
import queue
import ssl
import threading
import time
from collections.abc import Awaitable, Callable

import paho.mqtt.client as mqtt
from aiohttp import ClientSession, TCPConnector, web
from paho.mqtt.enums import CallbackAPIVersion

from gateway.iedsim.pki import LabPki
from gateway.services import free_port
from gateway.transport.base import inbox_filter, topic_for

__all__ = ["aiohttp_floor", "paho_floor"]


def paho_floor(
    host: str,
    port: int,
    pki: LabPki,
    users: tuple[tuple[str, str], tuple[str, str]],
    n: int,
    payload: bytes,
    step: Callable[[int], None],
    *,
    threaded: bool = False,
    durable: Callable[[bytes], object] | None = None,
) -> list[float]:
    """Bare paho over TLS, QoS 1: publish -> subscriber ``on_message`` (ms). Blocking.

    ``threaded`` False (the floor): both clients driven from this one thread (``loop()``),
    so the figure is broker + TLS + paho's parsing with no thread hand-off. ``threaded``
    True: paho as usually used, each client with its network thread (``loop_start()``);
    on a loaded machine every hand-off between threads waits for the scheduler and the GIL.
    ``durable``: called with the payload in ``on_message``, before the PUBACK (the durable floor).
    """
    (pub_user, pub_pw), (sub_user, sub_pw) = users
    arrived: queue.Queue[int] = queue.Queue()

    def client(user: str, pw: str, cid: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, pw)
        c.tls_set_context(ssl.create_default_context(cafile=str(pki.ca)))
        up = threading.Event()
        c.on_connect = lambda cl, u, f, rc, p: up.set()
        c.connect(host, port, clean_start=True)
        if threaded:
            c.loop_start()
            up.wait(5)
        else:
            deadline = time.monotonic() + 5
            while not up.is_set() and time.monotonic() < deadline:
                c.loop(0.05)
        if not up.is_set():
            if threaded:
                c.loop_stop()
            raise RuntimeError(f"{cid}: no CONNACK from the broker")
        return c

    sub = client(sub_user, sub_pw, f"floor-sub-{time.time_ns()}")
    subscribed = threading.Event()
    sub.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()

    def on_message(_cl: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        if durable is not None:
            durable(bytes(m.payload))
        arrived.put(time.perf_counter_ns())

    sub.on_message = on_message
    sub.subscribe(inbox_filter(sub_user), qos=1)
    deadline = time.monotonic() + 5
    while not subscribed.is_set() and time.monotonic() < deadline:
        if threaded:
            subscribed.wait(0.1)
        else:
            sub.loop(0.05)
    pub = client(pub_user, pub_pw, f"floor-pub-{time.time_ns()}")
    topic = topic_for(sub_user, pub_user, "Flexibility")
    out: list[float] = []
    try:
        for i in range(n + 20):
            t0 = time.perf_counter_ns()
            pub.publish(topic, payload, qos=1)
            if threaded:
                t1 = arrived.get(timeout=5)
            else:
                pub.loop_write()
                limit = time.monotonic() + 5
                while arrived.empty() and time.monotonic() < limit:
                    sub.loop(0.01)
                t1 = arrived.get_nowait()
                pub.loop(0.0)  # the PUBACK, untimed
            if i >= 20:  # warm-up
                out.append((t1 - t0) / 1e6)
                step(i - 19)
    finally:
        for c in (pub, sub):
            c.disconnect()
            if threaded:
                c.loop_stop()
            else:
                c.loop(0.05)
    return out


async def aiohttp_floor(
    pki: LabPki,
    client_cert: tuple[str, str],
    n: int,
    body: bytes,
    step: Callable[[int], None],
    *,
    durable: Callable[[bytes], Awaitable[object]] | None = None,
) -> list[float]:
    """Bare aiohttp over mutual TLS, keep-alive: POST sent -> body read in the handler (ms).

    One way, like the routes (they end where the receiver stored the message), not the
    round trip; requests go one at a time. ``durable``: awaited with the body in the handler
    before it answers (the durable floor); the sample then ends when it has returned."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server_tls.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    server_tls.verify_mode = ssl.CERT_REQUIRED
    client_tls = ssl.create_default_context(cafile=str(pki.ca))
    client_tls.load_cert_chain(*client_cert)

    got: list[int] = []

    async def take(request: web.Request) -> web.Response:
        data = await request.read()
        if durable is not None:
            await durable(data)
        got.append(time.perf_counter_ns())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/m", take)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_tls)
    await site.start()
    out: list[float] = []
    try:
        async with ClientSession(connector=TCPConnector(ssl=client_tls)) as session:
            url = f"https://127.0.0.1:{port}/m"
            for i in range(n + 20):
                t0 = time.perf_counter_ns()
                async with session.post(url, data=body) as resp:
                    await resp.read()
                    resp.raise_for_status()
                if i >= 20:
                    out.append((got[-1] - t0) / 1e6)
                    step(i - 19)
                await asyncio.sleep(0)
    finally:
        await runner.cleanup()
    return out
