"""The embedded mosquitto: TLS, per-client credentials, per-client topic ACLs, persistence."""

from __future__ import annotations

import queue
import ssl
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.services import MosquittoServer, MqttAcl, MqttTls

pytestmark = pytest.mark.timeout(30)

USERS = {"mgms-lab1": "pw-lab1", "ams": "pw-ams"}
ACL = [
    MqttAcl("mgms-lab1", "write", "heila/lab1/up/#"),
    MqttAcl("mgms-lab1", "read", "heila/lab1/down/#"),
    MqttAcl("ams", "read", "heila/+/up/#"),
    MqttAcl("ams", "write", "heila/+/down/#"),
]


@pytest.fixture
def pki(tmp_path: Path) -> LabPki:
    return make_lab_pki(tmp_path / "pki")


@pytest.fixture
def broker(tmp_path: Path, pki: LabPki) -> Iterator[MosquittoServer]:
    server = MosquittoServer(
        data_dir=tmp_path / "mosquitto",
        tls=MqttTls(pki.server.cert, pki.server.key, pki.ca),
        users=USERS,
        acl=ACL,
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


class Client:
    """A paho MQTT v5 client whose events land in queues the test reads with a timeout."""

    def __init__(self, broker: MosquittoServer, pki: LabPki, user: str, password: str, client_id: str) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        self.c.tls_set_context(ctx)
        self.connected: queue.Queue[ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.put(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(list(rcs))
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.connect(broker.host, broker.port, clean_start=True, properties=Properties(mqtt.PacketTypes.CONNECT))
        self.c.loop_start()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_tls_users_and_acls(broker: MosquittoServer, pki: LabPki) -> None:
    lab = Client(broker, pki, "mgms-lab1", "pw-lab1", "lab1")
    ams = Client(broker, pki, "ams", "pw-ams", "ams")
    try:
        assert not lab.connected.get(timeout=5).is_failure
        assert not ams.connected.get(timeout=5).is_failure
        ams.c.subscribe("heila/+/up/#", qos=1)
        assert [rc.value for rc in ams.subacks.get(timeout=5)] == [1]
        # a lab subscribing wide only ever receives its own downlink (mosquitto checks read
        # access per delivered message)
        lab.c.subscribe("heila/+/down/#", qos=1)
        lab.subacks.get(timeout=5)
        ams.c.publish("heila/lab2/down/activation", b"for lab2", qos=1).wait_for_publish(5)
        ams.c.publish("heila/lab1/down/activation", b"for lab1", qos=1).wait_for_publish(5)
        got_down = lab.messages.get(timeout=5)
        assert (got_down.topic, got_down.payload) == ("heila/lab1/down/activation", b"for lab1")
        lab.c.publish("heila/lab1/up/flexibility", b"ok", qos=1).wait_for_publish(5)
        lab.c.publish("heila/lab2/up/flexibility", b"forged", qos=1).wait_for_publish(5)
        got = ams.messages.get(timeout=5)
        assert (got.topic, got.payload) == ("heila/lab1/up/flexibility", b"ok")
        with pytest.raises(queue.Empty):
            ams.messages.get(timeout=0.5)  # the publish outside lab1's ACL never arrived
    finally:
        lab.close()
        ams.close()


def test_wrong_password_and_plain_tcp_are_refused(broker: MosquittoServer, pki: LabPki) -> None:
    bad = Client(broker, pki, "mgms-lab1", "wrong", "bad")
    try:
        rc = bad.connected.get(timeout=5)
        assert rc.is_failure and rc.value in (0x86, 0x87)  # bad user name or password / not authorized
    finally:
        bad.close()
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=mqtt.MQTTv5)
    plain.username_pw_set("ams", "pw-ams")
    with pytest.raises((OSError, mqtt.WebsocketConnectionError, ConnectionError)):
        plain.connect(broker.host, broker.port)
        for _ in range(20):  # the broker drops a non-TLS client during the handshake
            if plain.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError("dropped")
    plain.loop_stop()


def test_persistent_session_gets_what_was_published_while_away(broker: MosquittoServer, pki: LabPki) -> None:
    def session(user: str, pw: str, cid: str, clean: bool) -> Client:
        c = Client.__new__(Client)
        c.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.c.username_pw_set(user, pw)
        c.c.tls_set_context(ssl.create_default_context(cafile=str(pki.ca)))
        c.connected, c.subacks, c.messages = queue.Queue(), queue.Queue(), queue.Queue()
        c.c.on_connect = lambda cl, u, f, rc, p: c.connected.put(rc)
        c.c.on_subscribe = lambda cl, u, mid, rcs, p: c.subacks.put(list(rcs))
        c.c.on_message = lambda cl, u, m: c.messages.put(m)
        props = Properties(mqtt.PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.c.connect(broker.host, broker.port, clean_start=clean, properties=props)
        c.c.loop_start()
        assert not c.connected.get(timeout=5).is_failure
        return c

    # clean_start=False from the very first connect: with clean_start=True (+ a session expiry)
    # mosquitto 2.0.11 keeps the session while it runs but not across a restart (measured)
    ams = session("ams", "pw-ams", "ams-persistent", False)
    ams.c.subscribe("heila/+/up/#", qos=1)
    ams.subacks.get(timeout=5)
    ams.close()
    lab = session("mgms-lab1", "pw-lab1", "lab1", True)
    for i in range(5):
        lab.c.publish("heila/lab1/up/flexibility", f"m{i}".encode(), qos=1).wait_for_publish(5)
    lab.close()
    broker.restart()  # the queued messages survive a broker restart (persistence)
    ams = session("ams", "pw-ams", "ams-persistent", False)
    try:
        got = [ams.messages.get(timeout=5).payload for _ in range(5)]
        assert got == [f"m{i}".encode() for i in range(5)]
    finally:
        ams.close()
