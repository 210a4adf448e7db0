"""MQTT latency: the floor (bare paho through mosquitto) against the same route through MqttTransport.

Both phases use the same embedded mosquitto (TLS, users, layout ACLs, persistence), QoS 1,
one publisher and one subscriber in this process, so the clocks are the same
(``perf_counter_ns``). Messages go one at a time (the next only after the previous arrived),
so the figures are latencies, not queueing; a short burst phase gives the throughput.

* floor: paho ``loop_start()`` clients (paho's own network threads), ``publish`` ->
  subscriber's ``on_message``; and ``publish`` -> ``on_publish`` (PUBACK).
* transport: ``MqttTransport.send`` -> the receiving transport's handler; and ``send``
  returning (PUBACK).

    python bench/mqtt_floor.py                 # n=1000, 200-byte payloads
    python bench/mqtt_floor.py -n 5000 --size 2000 --burst 5000
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import ssl
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.bench.stats import summarise
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.services import MosquittoServer, MqttAcl, MqttTls
from gateway.transport.base import Delivery, Outgoing, inbox_filter, topic_for
from gateway.transport.mqtt import MqttSettings, MqttTransport

LAB, AMS = "mgms-lab1", "ams"
USERS = {LAB: "pw-lab1", AMS: "pw-ams"}
TOPIC = topic_for(AMS, LAB, "FlexibilityOffer")


def acl() -> list[MqttAcl]:
    rules = []
    for p in USERS:
        rules += [MqttAcl(p, "write", f"heila/v1/to/+/from/{p}/#"), MqttAcl(p, "read", inbox_filter(p))]
    return rules


def summary(samples_ns: list[int]) -> tuple[float, float, float]:
    s = summarise([x / 1e6 for x in samples_ns])
    return s.mean_ms, s.median_ms, s.p99_ms


# -- floor: bare paho, its own threads ---------------------------------------------------


def paho_client(broker: MosquittoServer, pki: LabPki, user: str, cid: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, USERS[user])
    c.tls_set_context(ssl.create_default_context(cafile=str(pki.ca)))
    connected = threading.Event()
    c.on_connect = lambda cl, u, f, rc, p: connected.set()
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    c.connect(broker.host, broker.port, clean_start=True, properties=props)
    c.loop_start()
    if not connected.wait(5):
        raise RuntimeError(f"{cid}: no CONNACK")
    return c


def floor(broker: MosquittoServer, pki: LabPki, n: int, payload: bytes, burst: int) -> dict[str, object]:
    arrived: queue.Queue[int] = queue.Queue()
    acked: queue.Queue[int] = queue.Queue()
    sub = paho_client(broker, pki, AMS, "floor-sub")
    subscribed = threading.Event()
    sub.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()
    sub.on_message = lambda cl, u, m: arrived.put(time.perf_counter_ns())
    sub.subscribe(inbox_filter(AMS), qos=1)
    subscribed.wait(5)
    pub = paho_client(broker, pki, LAB, "floor-pub")
    pub.on_publish = lambda cl, u, mid, rc, p: acked.put(time.perf_counter_ns())
    e2e: list[int] = []
    puback: list[int] = []
    try:
        for i in range(n + 50):
            t0 = time.perf_counter_ns()
            pub.publish(TOPIC, payload, qos=1)
            t_arr = arrived.get(timeout=5)
            t_ack = acked.get(timeout=5)
            if i >= 50:  # warm-up
                e2e.append(t_arr - t0)
                puback.append(t_ack - t0)
        t0, c0 = time.perf_counter_ns(), time.process_time()
        for _ in range(burst):
            pub.publish(TOPIC, payload, qos=1)
        for _ in range(burst):
            arrived.get(timeout=30)
        rate = burst / ((time.perf_counter_ns() - t0) / 1e9)
        cpu_us = (time.process_time() - c0) / burst * 1e6
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    return {"e2e": e2e, "puback": puback, "rate": rate, "cpu_us": cpu_us}


# -- through MqttTransport ---------------------------------------------------------------


async def through_transport(
    broker: MosquittoServer, pki: LabPki, n: int, payload: bytes, burst: int
) -> dict[str, object]:
    def settings(p: str, **kw: object) -> MqttSettings:
        return MqttSettings.model_validate(
            {"participant": p, "host": broker.host, "port": broker.port, "password": USERS[p], "ca_file": pki.ca, **kw}
        )

    arrived: asyncio.Queue[int] = asyncio.Queue()

    async def handler(d: Delivery) -> None:
        arrived.put_nowait(time.perf_counter_ns())

    ams = MqttTransport(settings(AMS, client_id="bench-ams", max_inflight=100))
    lab = MqttTransport(settings(LAB, client_id="bench-lab", max_inflight=100))
    await ams.start(handler)
    await lab.start(handler)
    e2e: list[int] = []
    puback: list[int] = []
    try:
        for i in range(n + 50):
            t0 = time.perf_counter_ns()
            await lab.send(Outgoing(f"m{i}", AMS, TOPIC, payload))
            t_ack = time.perf_counter_ns()
            async with asyncio.timeout(5):
                t_arr = await arrived.get()
            if i >= 50:
                e2e.append(t_arr - t0)
                puback.append(t_ack - t0)
        t0, c0 = time.perf_counter_ns(), time.process_time()
        window = asyncio.Semaphore(100)

        async def one(i: int) -> None:
            async with window:
                await lab.send(Outgoing(f"b{i}", AMS, TOPIC, payload))

        await asyncio.gather(*(one(i) for i in range(burst)))
        async with asyncio.timeout(30):
            for _ in range(burst):
                await arrived.get()
        rate = burst / ((time.perf_counter_ns() - t0) / 1e9)
        cpu_us = (time.process_time() - c0) / burst * 1e6
    finally:
        await lab.close()
        await ams.close()
    return {"e2e": e2e, "puback": puback, "rate": rate, "cpu_us": cpu_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=1000, help="sequential messages per phase (after 50 warm-up)")
    ap.add_argument("--size", type=int, default=200, help="payload bytes")
    ap.add_argument("--burst", type=int, default=2000, help="messages in the throughput burst")
    args = ap.parse_args()
    payload = b"x" * args.size
    with tempfile.TemporaryDirectory(prefix="mqtt-bench-") as tmp:
        pki = make_lab_pki(Path(tmp) / "pki")
        tls = MqttTls(pki.server.cert, pki.server.key, pki.ca)
        with MosquittoServer(data_dir=Path(tmp) / "mosquitto", tls=tls, users=USERS, acl=acl()) as broker:
            raw = floor(broker, pki, args.n, payload, args.burst)
            ours = asyncio.run(through_transport(broker, pki, args.n, payload, args.burst))
    print(f"MQTT v5 over TLS through mosquitto, QoS 1, {args.size}-byte payloads, n={args.n} sequential")
    print()
    print("| route | mean ms | median ms | p99 ms |")
    print("|---|---|---|---|")
    for label, res, key in (
        ("floor: paho publish -> on_message", raw, "e2e"),
        ("MqttTransport: send -> handler", ours, "e2e"),
        ("floor: paho publish -> PUBACK", raw, "puback"),
        ("MqttTransport: send returns (PUBACK)", ours, "puback"),
    ):
        samples = res[key]
        assert isinstance(samples, list)
        mean, med, p99 = summary(samples)
        print(f"| {label} | {mean:.3f} | {med:.3f} | {p99:.3f} |")
    print()
    print(
        f"burst of {args.burst} (MqttTransport: 100 sends in flight): "
        f"floor {raw['rate']:.0f} msg/s, {raw['cpu_us']:.0f} us CPU/msg; "
        f"MqttTransport {ours['rate']:.0f} msg/s, {ours['cpu_us']:.0f} us CPU/msg "
        "(CPU of this process: publisher and subscriber together, mosquitto not counted)"
    )


if __name__ == "__main__":
    main()
