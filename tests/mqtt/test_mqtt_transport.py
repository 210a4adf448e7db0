"""MqttTransport against a real mosquitto: TLS, per-participant users and topic-layout ACLs.

Every test gets its own broker (it starts in a few tens of milliseconds) so tests that stop or
restart it cannot disturb each other.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr

from gateway.errors import ConfigError, TransportError, TransportRefused
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.semantic.errors import Malformed
from gateway.services import MosquittoServer, MqttAcl, MqttTls, free_port
from gateway.transport.base import Delivery, MessageHandler, Outgoing, inbox_filter, topic_for
from gateway.transport.mqtt import MqttSettings, MqttTransport

pytestmark = pytest.mark.timeout(20)

LAB, AMS = "mgms-lab1", "ams"
USERS = {LAB: "pw-lab1", AMS: "pw-ams"}


def layout_acl(*participants: str) -> list[MqttAcl]:
    """The ACL of the topic layout: write only as yourself, read only your own inbox."""
    acl: list[MqttAcl] = []
    for p in participants:
        acl.append(MqttAcl(p, "write", f"heila/v1/to/+/from/{p}/#"))
        acl.append(MqttAcl(p, "read", inbox_filter(p)))
    return acl


@pytest.fixture
def pki(tmp_path: Path) -> LabPki:
    return make_lab_pki(tmp_path / "pki")


@pytest.fixture
def broker(tmp_path: Path, pki: LabPki) -> Iterator[MosquittoServer]:
    server = MosquittoServer(
        data_dir=tmp_path / "mosquitto",
        tls=MqttTls(pki.server.cert, pki.server.key, pki.ca),
        users=USERS,
        acl=layout_acl(LAB, AMS),
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


def settings_for(broker: MosquittoServer, pki: LabPki, participant: str, **overrides: object) -> MqttSettings:
    values: dict[str, object] = {
        "participant": participant,
        "host": broker.host,
        "port": broker.port,
        "password": USERS.get(participant, "nope"),
        "ca_file": pki.ca,
        "connect_timeout_s": 3.0,
        "ack_timeout_s": 3.0,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        **overrides,
    }
    return MqttSettings.model_validate(values)


class Inbox:
    """A handler that records deliveries in a queue the test reads with a timeout."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()

    async def __call__(self, delivery: Delivery) -> None:
        self.queue.put_nowait(delivery)

    async def get(self, timeout_s: float = 5.0) -> Delivery:
        async with asyncio.timeout(timeout_s):
            return await self.queue.get()

    async def nothing_for(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            await self.get(seconds)


Factory = Callable[..., Awaitable[MqttTransport]]


@pytest.fixture
async def transports(broker: MosquittoServer, pki: LabPki) -> AsyncIterator[Factory]:
    """Start transports; every one is closed at the end, whatever the test did."""
    made: list[MqttTransport] = []

    async def make(participant: str, handler: MessageHandler, **overrides: object) -> MqttTransport:
        t = MqttTransport(settings_for(broker, pki, participant, **overrides))
        made.append(t)
        await t.start(handler)
        return t

    yield make
    for t in made:
        await t.close()


def msg(sender: str, recipient: str, n: int, message_type: str = "FlexibilityOffer") -> Outgoing:
    return Outgoing(
        message_id=f"m{n}",
        recipient=recipient,
        topic=topic_for(recipient, sender, message_type),
        data=f"payload {n}".encode(),
    )


async def test_round_trip_both_ways(transports: Factory) -> None:
    lab_inbox, ams_inbox = Inbox(), Inbox()
    lab = await transports(LAB, lab_inbox)
    ams = await transports(AMS, ams_inbox)
    await lab.send(msg(LAB, AMS, 1))
    got = await ams_inbox.get()
    assert (got.topic, got.data, got.transport) == (topic_for(AMS, LAB, "FlexibilityOffer"), b"payload 1", "mqtt")
    await ams.send(msg(AMS, LAB, 2, "ActivationRequest"))
    got = await lab_inbox.get()
    assert (got.topic, got.data) == (topic_for(LAB, AMS, "ActivationRequest"), b"payload 2")
    assert lab.stats()["sent"] == lab.stats()["acked"] == 1
    assert ams.stats()["received"] == 1
    await ams_inbox.nothing_for(0.2)  # nothing echoed back to the sender's own inbox


async def test_publish_properties_seen_by_a_plain_client(
    broker: MosquittoServer, pki: LabPki, transports: Factory
) -> None:
    """Content type (and message expiry when set) travel as MQTT v5 properties."""
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain-ams", protocol=mqtt.MQTTv5)
    plain.username_pw_set(AMS, USERS[AMS])
    plain.tls_set_context(ssl.create_default_context(cafile=str(pki.ca)))
    plain.on_connect = lambda c, u, f, rc, p: c.subscribe(inbox_filter(AMS), qos=1)
    plain.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    plain.on_message = lambda c, u, m: got.put(m)
    plain.connect(broker.host, broker.port)
    plain.loop_start()
    try:
        assert await asyncio.to_thread(subscribed.wait, 5)
        lab = await transports(LAB, Inbox(), message_expiry_s=600)
        await lab.send(msg(LAB, AMS, 1))
        m = await asyncio.to_thread(got.get, True, 5)
        assert m.payload == b"payload 1" and m.qos == 1
        assert m.properties is not None
        assert getattr(m.properties, "ContentType", None) == "application/ld+json"
        assert 590 <= getattr(m.properties, "MessageExpiryInterval", 0) <= 600
    finally:
        plain.disconnect()
        plain.loop_stop()


async def test_qos2_publish(transports: Factory) -> None:
    inbox = Inbox()
    await transports(AMS, inbox)
    lab = await transports(LAB, Inbox(), qos=2)
    await lab.send(msg(LAB, AMS, 1))  # returns on PUBCOMP
    assert (await inbox.get()).data == b"payload 1"
    assert lab.stats()["acked"] == 1


async def test_inbound_is_acked_only_after_the_handler_returned(transports: Factory) -> None:
    """A receiver that goes away while its handler runs gets the message again; one whose
    handler returned does not."""
    entered, release = asyncio.Event(), asyncio.Event()
    seen: list[bytes] = []

    async def slow(delivery: Delivery) -> None:
        seen.append(delivery.data)
        entered.set()
        await release.wait()

    lab = await transports(LAB, Inbox())
    ams = await transports(AMS, slow, client_id="ams-1")
    await lab.send(msg(LAB, AMS, 1))
    async with asyncio.timeout(5):
        await entered.wait()
    await ams.close()  # handler still running: no PUBACK went out
    assert ams.stats()["received"] == 0

    inbox = Inbox()
    ams2 = await transports(AMS, inbox, client_id="ams-1")  # same session
    assert (await inbox.get()).data == b"payload 1"  # redelivered
    await ams2.close()  # that handler returned: acked
    inbox3 = Inbox()
    await transports(AMS, inbox3, client_id="ams-1")
    await inbox3.nothing_for(0.5)
    assert seen == [b"payload 1"]


async def test_handler_transport_error_means_redelivery_after_reconnect(transports: Factory) -> None:
    inbox = Inbox()
    fail_first = True

    async def flaky(delivery: Delivery) -> None:
        nonlocal fail_first
        await inbox(delivery)
        if fail_first:
            fail_first = False
            raise TransportError("store", "redis down")

    lab = await transports(LAB, Inbox())
    ams = await transports(AMS, flaky)
    await lab.send(msg(LAB, AMS, 1))
    await lab.send(msg(LAB, AMS, 2))
    got = [(await inbox.get()).data for _ in range(3)]
    # m1 not taken: the connection is dropped, then m1 and m2 come again, in order
    assert got == [b"payload 1", b"payload 1", b"payload 2"]
    await inbox.nothing_for(0.3)
    stats = ams.stats()
    assert (stats["not_acked"], stats["received"], stats["reconnects"]) == (1, 2, 1)


async def test_rejected_and_crashing_handler_ack_and_count(transports: Factory) -> None:
    crashed = asyncio.Event()

    async def judge(delivery: Delivery) -> None:
        if delivery.data.endswith(b"1"):
            raise Malformed("not JSON")
        if delivery.data.endswith(b"2"):
            crashed.set()
            raise RuntimeError("bug in the core")

    lab = await transports(LAB, Inbox())
    ams = await transports(AMS, judge, client_id="ams-judge")
    for n in (1, 2):
        await lab.send(msg(LAB, AMS, n))
    async with asyncio.timeout(5):
        await crashed.wait()
    await ams.close()
    inbox = Inbox()
    again = await transports(AMS, inbox, client_id="ams-judge")
    await inbox.nothing_for(0.5)  # both were acked: no redelivery
    assert (ams.stats()["rejected"], ams.stats()["handler_errors"]) == (1, 1)
    assert again.stats()["received"] == 0


async def test_publish_the_acl_forbids_is_refused(transports: Factory) -> None:
    lab = await transports(LAB, Inbox())
    forged = Outgoing("m1", AMS, topic_for(AMS, "mgms-lab2", "FlexibilityOffer"), b"forged")
    with pytest.raises(TransportRefused, match="0x87"):
        await lab.send(forged)
    await lab.send(msg(LAB, AMS, 2))  # the connection is still fine
    assert lab.stats()["refused"] == 1
    assert lab.stats()["acked"] == 1


async def test_no_puback_in_time_is_a_transport_error(broker: MosquittoServer, transports: Factory) -> None:
    inbox = Inbox()
    await transports(AMS, inbox)
    lab = await transports(LAB, Inbox(), ack_timeout_s=0.3)
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)  # a broker that hangs: TCP up, no answers
    try:
        with pytest.raises(TransportError, match="no PUBACK") as info:
            await lab.send(msg(LAB, AMS, 1))
        assert not isinstance(info.value, TransportRefused)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert (await inbox.get()).data == b"payload 1"  # it did go through, late: a duplicate is possible
    await lab.send(msg(LAB, AMS, 2))
    assert (await inbox.get()).data == b"payload 2"


async def test_wrong_password_is_refused_at_once(broker: MosquittoServer, pki: LabPki) -> None:
    t = MqttTransport(settings_for(broker, pki, LAB, password="wrong", connect_timeout_s=5.0))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TransportRefused, match=r"0x86|0x87"):
        await t.start(Inbox())
    assert loop.time() - t0 < 2.0  # refused, not timed out
    assert t.stats()["refused"] == 1
    await t.close()


async def test_untrusted_broker_certificate_is_refused(broker: MosquittoServer, pki: LabPki) -> None:
    t = MqttTransport(settings_for(broker, pki, LAB, ca_file=pki.rogue_ca))
    with pytest.raises(TransportRefused, match="not trusted"):
        await t.start(Inbox())


async def test_start_without_broker_times_out(pki: LabPki) -> None:
    s = MqttSettings(participant=LAB, port=free_port(), ca_file=pki.ca, password=SecretStr("x"), connect_timeout_s=0.5)
    t = MqttTransport(s)
    with pytest.raises(TransportError, match=r"within 0\.5 s") as info:
        await t.start(Inbox())
    assert not isinstance(info.value, TransportRefused)
    assert [x.name for x in threading.enumerate() if x.name.startswith("mqtt-")] == []


async def test_broker_restart_keeps_the_offline_receivers_messages(
    broker: MosquittoServer, transports: Factory
) -> None:
    ams = await transports(AMS, Inbox(), client_id="ams-persistent")
    await ams.close()  # session (subscription) stays on the broker
    lab = await transports(LAB, Inbox())
    for n in range(3):
        await lab.send(msg(LAB, AMS, n))

    await asyncio.to_thread(broker.stop)  # clean stop: mosquitto saves its database
    with pytest.raises(TransportError):
        await lab.send(msg(LAB, AMS, 99))
    await asyncio.to_thread(broker.start)  # same port, same data directory
    async with asyncio.timeout(5):  # what the outbox does: retry until taken
        while True:
            try:
                await lab.send(msg(LAB, AMS, 3))
                break
            except TransportError:
                await asyncio.sleep(0.05)
    assert lab.stats()["reconnects"] == 1

    inbox = Inbox()
    await transports(AMS, inbox, client_id="ams-persistent")
    got = [(await inbox.get()).data for _ in range(4)]
    assert got == [f"payload {n}".encode() for n in range(4)]


async def test_broker_crash_after_autosave_keeps_the_offline_receivers_messages(
    broker: MosquittoServer, transports: Factory
) -> None:
    """SIGKILL instead of a clean stop: what mosquitto saved (autosave every
    autosave_interval_s = 1 s) survives. Messages acked after its last save are lost in a crash
    (measured; see docs/transports.md)."""
    ams = await transports(AMS, Inbox(), client_id="ams-crash")
    await ams.close()
    lab = await transports(LAB, Inbox())
    for n in range(3):
        await lab.send(msg(LAB, AMS, n))
    sent_at = time.time()
    db = broker.data_dir / "mosquitto.db"
    for _ in range(100):  # mosquitto's next autosave after the last PUBACK (within ~2 intervals)
        if db.exists() and db.stat().st_mtime > sent_at:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("mosquitto did not save its database within 5 s")
    await asyncio.to_thread(broker.restart, hard=True)
    inbox = Inbox()
    await transports(AMS, inbox, client_id="ams-crash")
    got = [(await inbox.get()).data for _ in range(3)]
    assert got == [f"payload {n}".encode() for n in range(3)]


async def test_shared_subscription_splits_the_inbox(transports: Factory) -> None:
    n = 20
    got: dict[str, list[bytes]] = {"w1": [], "w2": []}
    all_in = asyncio.Event()

    def worker(name: str) -> MessageHandler:
        async def handle(delivery: Delivery) -> None:
            got[name].append(delivery.data)
            if sum(map(len, got.values())) >= n:
                all_in.set()

        return handle

    await transports(AMS, worker("w1"), client_id="ams-w1", share_group="ams-workers")
    await transports(AMS, worker("w2"), client_id="ams-w2", share_group="ams-workers")
    lab = await transports(LAB, Inbox())
    await asyncio.gather(*(lab.send(msg(LAB, AMS, i)) for i in range(n)))
    async with asyncio.timeout(5):
        await all_in.wait()
    await asyncio.sleep(0.2)  # a message that went to both would show up as an extra one
    assert got["w1"] and got["w2"]
    assert sorted(got["w1"] + got["w2"]) == sorted(f"payload {i}".encode() for i in range(n))


async def test_shared_subscription_queues_for_an_offline_member(transports: Factory) -> None:
    """mosquitto 2.0.11 keeps handing messages round robin to a group member whose session is
    offline; they wait for that member (and are lost if its session expires)."""
    w1, w2 = Inbox(), Inbox()
    await transports(AMS, w1, client_id="ams-w1", share_group="ams-workers")
    away = await transports(AMS, Inbox(), client_id="ams-w2", share_group="ams-workers")
    await away.close()
    lab = await transports(LAB, Inbox())
    for i in range(4):
        await lab.send(msg(LAB, AMS, i))
    first = [(await w1.get()).data for _ in range(2)]
    await w1.nothing_for(0.3)
    await transports(AMS, w2, client_id="ams-w2", share_group="ams-workers")
    second = [(await w2.get()).data for _ in range(2)]
    assert sorted(first + second) == [f"payload {i}".encode() for i in range(4)]


async def test_close_leaves_nothing_running(broker: MosquittoServer, pki: LabPki) -> None:
    before = asyncio.all_tasks()
    fds = set(os.listdir("/proc/self/fd"))
    t = MqttTransport(settings_for(broker, pki, LAB))
    await t.start(Inbox())
    assert t.connected
    assert set(os.listdir("/proc/self/fd")) - fds  # the connection's socket
    await t.close()
    assert set(os.listdir("/proc/self/fd")) - fds == set()
    await t.close()  # idempotent
    assert asyncio.all_tasks() == before
    assert [x.name for x in threading.enumerate() if x.name.startswith("mqtt-")] == []
    assert t._client is None and t._fd is None and t._misc_timer is None
    with pytest.raises(TransportError):
        await t.send(msg(LAB, AMS, 1))


async def test_close_while_the_broker_is_gone(broker: MosquittoServer, pki: LabPki) -> None:
    t = MqttTransport(settings_for(broker, pki, LAB))
    await t.start(Inbox())
    await asyncio.to_thread(broker.stop, hard=True)
    await asyncio.sleep(0.2)  # the supervisor is now backing off / retrying
    await t.close()
    assert t._fd is None
    assert [x.name for x in threading.enumerate() if x.name.startswith("mqtt-")] == []


async def test_certificate_authentication(tmp_path: Path, pki: LabPki) -> None:
    """Mutual TLS: the client certificate's CN is the MQTT user the ACL speaks of; a
    certificate from another CA is refused for good."""
    me = "mgms gateway"  # CN of the lab PKI's client certificate
    tls = MqttTls(pki.server.cert, pki.server.key, pki.ca, require_certificate=True, use_identity_as_username=True)
    with MosquittoServer(data_dir=tmp_path / "mtls", tls=tls, acl=layout_acl(me)) as server:
        common: dict[str, object] = {
            "host": server.host,
            "port": server.port,
            "ca_file": pki.ca,
            "connect_timeout_s": 3.0,
        }
        inbox = Inbox()
        t = MqttTransport(
            MqttSettings.model_validate(
                {"participant": me, "cert_file": pki.client.cert, "key_file": pki.client.key, **common}
            )
        )
        await t.start(inbox)
        try:
            await t.send(msg(me, me, 1))
            assert (await inbox.get()).data == b"payload 1"
        finally:
            await t.close()
        rogue = MqttTransport(
            MqttSettings.model_validate(
                {"participant": me, "cert_file": pki.rogue_client.cert, "key_file": pki.rogue_client.key, **common}
            )
        )
        with pytest.raises(TransportRefused, match="refused us"):
            await rogue.start(Inbox())


def test_settings_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    s = MqttSettings(participant=AMS, share_group="workers")
    assert s.topic_filters == ("$share/workers/heila/v1/to/ams/#",)
    assert s.effective_client_id == "ams" and s.effective_username == "ams"
    monkeypatch.setenv("MQTT_PW_TEST", "secret")
    assert MqttSettings(participant=AMS, password_env="MQTT_PW_TEST").resolved_password() == "secret"
    with pytest.raises(ConfigError, match="MQTT_PW_UNSET"):
        MqttSettings(participant=AMS, password_env="MQTT_PW_UNSET").resolved_password()
    with pytest.raises(ValueError, match="not both"):
        MqttSettings(participant=AMS, password=SecretStr("a"), password_env="B")
    with pytest.raises(ValueError, match="share_group"):
        MqttSettings(participant=AMS, share_group="a/b")
    with pytest.raises(ValueError, match="extra"):
        MqttSettings.model_validate({"participant": AMS, "qos2": 1})
    assert "secret" not in repr(MqttSettings(participant=AMS, password=SecretStr("secret")))
