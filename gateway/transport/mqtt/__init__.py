"""MQTT v5 message transport (paho-mqtt on the asyncio loop); see :mod:`.transport` for the design."""

from gateway.transport.mqtt.settings import MqttSettings, preflight
from gateway.transport.mqtt.transport import CONTENT_TYPE, COUNTERS, MqttTransport

__all__ = ["CONTENT_TYPE", "COUNTERS", "MqttSettings", "MqttTransport", "preflight"]
