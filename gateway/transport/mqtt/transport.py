"""MQTT v5 message transport: paho-mqtt driven from the asyncio event loop.

Why it is built this way
------------------------

* **Socket on the event loop, not in paho's thread.** paho's ``loop_start()`` runs a thread
  that polls with ``select`` and hands every callback to that thread; each message would then
  cross threads twice. Like aiomqtt, paho's socket hooks (``on_socket_open/close``,
  ``on_socket_register_write/unregister_write``) put the socket into ``loop.add_reader`` /
  ``add_writer``, and ``loop_misc()`` (keepalive) runs once a second from a timer. Every paho
  callback then fires on the loop thread. Only the blocking part of a connect (TCP connect
  and TLS handshake inside ``Client.reconnect()``) runs in a worker thread of our own; the
  socket hooks it fires there hop to the loop with ``call_soon_threadsafe``.
* **Acknowledge after the handler.** ``manual_ack=True``: an inbound PUBLISH is queued, the
  handler runs (one message at a time, in arrival order, because MQTT requires PUBACKs in
  receive order), and only then is the PUBACK sent. What the handler raises decides:

  ==================================  ==============================================================
  handler returns                      acked (counter ``received``)
  ``MessageRejected``                  acked, counted ``rejected``: a bad message must not come back
  ``TransportError`` (e.g. Redis down) not acked, counted ``not_acked``; the connection is dropped
                                       so that the broker redelivers this and every later unacked
                                       message on the next connection (a PUBACK cannot be skipped
                                       and later ones sent: acks go out in order)
  any other exception (a bug)          logged with traceback, counted ``handler_errors``, acked:
                                       redelivering a message that crashes the handler would block
                                       the whole inbox behind it forever; the core maps every
                                       "retry later" failure to ``TransportError`` on purpose
  ==================================  ==============================================================

  A message whose connection was lost while the handler ran is not acked either (its packet
  id belongs to the old connection); the broker redelivers it, and the core de-duplicates.
* **Persistent session from the first connect.** Always ``clean_start=False`` with a Session
  Expiry Interval: mosquitto 2.0.11 keeps a v5 session across a broker restart only then
  (docs/protocol-notes.md). Our Receive Maximum (``max_inflight``) bounds how many unacked
  messages the broker pushes at once, which bounds the inbox queue.
* **send() waits for the PUBACK.** Each publish is a Future keyed by packet id, resolved by
  ``on_publish`` and always removed in ``finally``. A PUBACK reason code 0x87 (mosquitto's
  answer to a publish its ACL forbids) is :class:`~gateway.errors.TransportRefused`.
  paho keeps an unacknowledged publish in its session and resends it after a reconnect, so
  after a ``TransportError`` the message may arrive twice (once from paho, once from the
  outbox); the core de-duplicates by message id.
* **Own reconnect loop** with capped full-jitter backoff (``uniform(0, min(max, min * 2**n))``),
  re-subscribing after every CONNACK (cheap, and a changed filter takes effect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.errors import TransportError, TransportRefused
from gateway.semantic.errors import MessageRejected
from gateway.transport.base import Delivery, MessageHandler, MessageTransport, Outgoing, received_clock
from gateway.transport.mqtt.settings import MqttSettings, client_ssl_context

__all__ = ["CONTENT_TYPE", "COUNTERS", "MqttTransport"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/ld+json"

COUNTERS = (
    "sent",  # publishes handed to the broker
    "acked",  # ... and acknowledged by it (PUBACK / PUBCOMP success)
    "received",  # inbound messages the handler took (acked)
    "handler_errors",  # handler raised something unexpected (message acked, see above)
    "rejected",  # handler raised MessageRejected (acked)
    "not_acked",  # handler raised TransportError (not acked, redelivered later)
    "reconnects",  # successful connections after the first one
    "refused",  # CONNACK / SUBACK / PUBACK refused for good (credentials, ACL)
    "dropped",  # inbound QoS 0 messages dropped on a full inbox queue
)

# MQTT v5 reason codes that will not change by retrying (they need the operator).
_CONNECT_REFUSED = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})
_PUBLISH_REFUSED = frozenset({0x87, 0x90, 0x95, 0x99})
_SUBSCRIBE_REFUSED = frozenset({0x87, 0x8F, 0x9E, 0xA1, 0xA2})

# TLS alerts from a broker that rejects our client certificate (TLS 1.2: during the handshake)
_TLS_REFUSED = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)

# Inbound messages are received at QoS 1 even when we publish at QoS 2: with QoS 2 paho sends
# PUBREC by itself and, after a reconnect, drops the broker's repeated PUBREL for a message
# whose handler did not finish, so "not acked -> redelivered" would not hold. Duplicates are
# the core's business (it de-duplicates by message id), so QoS 2 would add nothing inbound.
_SUBSCRIBE_QOS = 1

_MISC_INTERVAL_S = 1.0
_CLOSE_GRACE_S = 1.0


class _Client(mqtt.Client):
    """paho's client, except that a failed TLS handshake closes its socket.

    paho 2.2 wraps the TCP socket, handshakes, and on failure lets the SSL socket go without
    closing it (a ResourceWarning and an fd held until garbage collection). The context is
    ours and always checks the host name itself, so paho's extra host check is not needed.

    It also remembers the last TLS error on receive: with TLS 1.3 a broker rejects our
    certificate only after the handshake, with an alert that paho logs and turns into a plain
    "connection lost"; the transport needs the alert to tell "refused" from "retry".
    """

    last_tls_error: ssl.SSLError | None = None

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            return super()._sock_recv(bufsize)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            self.last_tls_error = exc
            raise

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        ctx = self._ssl_context
        assert ctx is not None
        ssl_sock = ctx.wrap_socket(tcp_sock, server_hostname=self._host, do_handshake_on_connect=False)
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock


class _ConstantProperties(Properties):
    """PUBLISH properties that are the same for every message of a transport: built once and
    encoded once (paho encodes properties anew on every publish, ~100 us each, most of the
    transport's CPU per message before this). Must not be changed after the first publish.
    """

    def pack(self) -> bytes:
        cached: bytes | None = self.__dict__.get("_packed_once")
        if cached is None:
            cached = super().pack()  # type: ignore[no-untyped-call]
            object.__setattr__(self, "_packed_once", cached)
        return cached


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def _rc_text(rc: ReasonCode) -> str:
    return f"{rc.getName()} (0x{rc.value:02x})"


class MqttTransport(MessageTransport):
    """One participant's MQTT v5 connection: publishes outgoing messages, feeds the inbox to
    the handler. See the module docstring for the acknowledgement rules.

    ``ssl_context`` overrides the context built from the settings (tests, custom trust).
    ``probes`` False: inbound messages are not stamped with their arrival time (no clock read
    on paho's thread; ``Delivery.received_ns`` is 0).
    """

    name = "mqtt"

    def __init__(
        self, settings: MqttSettings, *, ssl_context: ssl.SSLContext | None = None, probes: bool = True
    ) -> None:
        self.settings = settings
        self._received_ns = received_clock(probes)
        self._password = settings.resolved_password()
        self._ssl_context = ssl_context
        self._counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._client: _Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._handler: MessageHandler | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._connect_job: asyncio.Future[MQTTErrorCode] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._inbox_task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[tuple[int, mqtt.MQTTMessage, int]] = asyncio.Queue(
            maxsize=max(64, 4 * settings.max_inflight)
        )
        self._misc_timer: asyncio.TimerHandle | None = None
        self._publish_props = _ConstantProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        self._publish_props.ContentType = CONTENT_TYPE
        if settings.message_expiry_s is not None:
            self._publish_props.MessageExpiryInterval = settings.message_expiry_s
        self._fd: int | None = None
        self._socket_gone = asyncio.Event()
        self._pending: dict[int, asyncio.Future[ReasonCode]] = {}
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._connack: asyncio.Future[bool] | None = None
        self._lost = asyncio.Event()
        self._ready: asyncio.Future[None] | None = None
        self._generation = 0  # bumped whenever a connection ends: acks of older ones are void
        self._connected = False
        self._accepting = False  # inbound messages are taken only from a live, not dropped, connection
        self._ever_connected = False
        self._closing = False
        self._refusal: TransportRefused | None = None
        self._last_error: TransportError | None = None
        self._handler_failing = False
        self._attempt = 0

    # -- public API -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up and the subscriptions are granted."""
        return self._connected

    def stats(self) -> Mapping[str, int]:
        return dict(self._counters)

    async def start(self, handler: MessageHandler) -> None:
        if self._supervisor is not None or self._closing:
            raise RuntimeError("MqttTransport.start() may be called once")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._handler = handler
        self._client = self._make_client()
        cid = self.settings.effective_client_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mqtt-connect-{cid}")
        self._ready = loop.create_future()
        self._inbox_task = asyncio.create_task(self._inbox_loop(), name=f"mqtt-inbox-{cid}")
        self._supervisor = asyncio.create_task(self._run(), name=f"mqtt-connection-{cid}")
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await asyncio.shield(self._ready)
        except TimeoutError:
            await self.close()
            last = f" (last error: {self._last_error})" if self._last_error else ""
            raise TransportError(
                self.name, f"no connection to {self._where} within {self.settings.connect_timeout_s:g} s{last}"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def send(self, message: Outgoing) -> None:
        client, loop = self._client, self._loop
        if client is None or loop is None or self._closing:
            raise TransportError(self.name, "transport not started or closed")
        if not self._connected:
            if self._refusal is not None:
                raise self._refusal
            raise TransportError(self.name, f"not connected to {self._where}")
        try:
            info = client.publish(message.topic, message.data, qos=self.settings.qos, properties=self._publish_props)
        except ValueError as exc:  # wildcard or empty topic: no retry can fix that
            self._counters["refused"] += 1
            raise TransportRefused(self.name, f"cannot publish on {message.topic!r}: {exc}") from exc
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(self.name, f"publish of {message.message_id} failed: {mqtt.error_string(info.rc)}")
        self._counters["sent"] += 1
        fut: asyncio.Future[ReasonCode] = loop.create_future()
        self._pending[info.mid] = fut
        if len(self._pending) == 1:  # alone: write now; under load the writer callback batches
            self._flush()
        try:
            async with asyncio.timeout(self.settings.ack_timeout_s):
                rc = await fut
        except TimeoutError:
            raise TransportError(
                self.name, f"no PUBACK for {message.message_id} within {self.settings.ack_timeout_s:g} s"
            ) from None
        finally:
            if self._pending.get(info.mid) is fut:
                del self._pending[info.mid]
        if rc.is_failure:
            what = f"broker refused {message.message_id} on {message.topic}: {_rc_text(rc)}"
            if rc.value in _PUBLISH_REFUSED:
                self._counters["refused"] += 1
                raise TransportRefused(self.name, what)
            raise TransportError(self.name, what)
        self._counters["acked"] += 1
        log.debug("sent %s on %s (mid %d)", message.message_id, message.topic, info.mid)

    async def close(self) -> None:
        self._closing = True
        for task in (self._supervisor, self._inbox_task):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._supervisor, self._inbox_task):
            if task is not None and task is not asyncio.current_task():
                try:
                    await task
                except asyncio.CancelledError:
                    if not task.cancelled():  # close() itself was cancelled
                        raise
                except Exception:
                    log.exception("mqtt: task %s had failed", task.get_name())
        # a connect may still be running in the worker thread: let it end, then close its socket
        if self._connect_job is not None:
            with contextlib.suppress(Exception):
                await self._connect_job
            self._connect_job = None
        client = self._client
        if client is not None:
            if self._fd is not None and self._connected:
                self._socket_gone.clear()
                client.disconnect()  # keeps the session: it expires after session_expiry_s
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CLOSE_GRACE_S):
                        await self._socket_gone.wait()
            if client.socket() is not None:
                # DISCONNECT could not be written (broker gone): close the socket ourselves;
                # paho has no public call for that, _sock_close also runs on_socket_close
                client._sock_close()
        self._connected = False
        self._stop_misc_timer()
        self._fail_pending(TransportError(self.name, "transport closed"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # idle by now: the connect job has ended
            self._executor = None
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        self._client = None

    # -- connection supervisor ------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _make_client(self) -> _Client:
        s = self.settings
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.effective_client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        username = s.effective_username
        if username is not None:
            client.username_pw_set(username, self._password)
        if s.tls:
            client.tls_set_context(self._ssl_context or self._build_ssl_context())
        client.connect_timeout = s.connect_timeout_s
        client.max_inflight_messages_set(s.max_inflight)
        props = _properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.session_expiry_s
        props.ReceiveMaximum = s.max_inflight
        # clean_start=False always, including the very first connect (see module docstring)
        client.connect_async(s.host, s.port, keepalive=s.keepalive_s, clean_start=False, properties=props)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    def _build_ssl_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.settings)

    async def _run(self) -> None:
        """Connect, stay connected until the connection ends, back off, repeat."""
        assert self._ready is not None
        while not self._closing:
            try:
                await self._connect_once()
            except TransportRefused as exc:
                self._counters["refused"] += 1
                self._refusal = exc
                self._last_error = exc
                log.error("%s", exc)
                if not self._ever_connected:
                    if not self._ready.done():
                        self._ready.set_exception(exc)
                    return
            except TransportError as exc:
                self._last_error = exc
                log.warning("%s", exc)
            except Exception:  # a bug here must not end reconnecting for good
                log.exception("mqtt %s: unexpected error while connecting", self.settings.effective_client_id)
                self._abort_socket()
            else:
                await self._lost.wait()
                log.info("mqtt %s: connection to %s ended", self.settings.effective_client_id, self._where)
            self._connected = False
            delay = random.uniform(
                0, min(self.settings.reconnect_max_s, self.settings.reconnect_min_s * 2**self._attempt)
            )
            self._attempt = min(self._attempt + 1, 32)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        client, loop, executor = self._client, self._loop, self._executor
        assert client is not None and loop is not None and executor is not None
        if self._connect_job is not None:  # an abandoned attempt still in the thread: let it end
            with contextlib.suppress(Exception):
                await self._connect_job
            self._connect_job = None
        if client.socket() is not None:
            self._abort_socket()
        self._lost.clear()
        client.last_tls_error = None
        self._connack = loop.create_future()
        self._connect_job = loop.run_in_executor(executor, client.reconnect)
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await asyncio.shield(self._connect_job)
                session_present = await self._connack
        except TimeoutError:
            self._abort_socket()
            raise TransportError(
                self.name, f"no CONNACK from {self._where} in {self.settings.connect_timeout_s:g} s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise TransportRefused(self.name, f"TLS: broker {self._where} not trusted: {exc.verify_message}") from exc
        except ssl.SSLError as exc:
            if exc.reason in _TLS_REFUSED:  # the broker does not accept our certificate
                raise TransportRefused(self.name, f"TLS: broker {self._where} refused us: {exc.reason}") from exc
            raise TransportError(self.name, f"TLS handshake with {self._where} failed: {exc}") from exc
        except (OSError, ValueError) as exc:
            self._abort_socket()
            raise TransportError(self.name, f"cannot connect to {self._where}: {exc}") from exc
        except TransportError:
            self._abort_socket()
            raise
        finally:
            if self._connect_job.done():
                self._connect_job = None
        filters = self.settings.topic_filters
        # inbound always at QoS 1 (see _SUBSCRIBE_QOS)
        rc, mid = client.subscribe([(f, SubscribeOptions(qos=_SUBSCRIBE_QOS)) for f in filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            self._abort_socket()
            raise TransportError(self.name, f"subscribe failed: {mqtt.error_string(rc)}")
        suback: asyncio.Future[list[ReasonCode]] = loop.create_future()
        self._subacks[mid] = suback
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                granted = await suback
        except TimeoutError:
            self._abort_socket()
            raise TransportError(self.name, f"no SUBACK from {self._where}") from None
        finally:
            self._subacks.pop(mid, None)
        for flt, grc in zip(filters, granted, strict=False):
            if grc.is_failure:
                self._abort_socket()
                what = f"subscription {flt} refused: {_rc_text(grc)}"
                raise (TransportRefused if grc.value in _SUBSCRIBE_REFUSED else TransportError)(self.name, what)
        self._connected = True
        self._refusal = None
        if self._ever_connected:
            self._counters["reconnects"] += 1
        self._ever_connected = True
        if not self._handler_failing:
            self._attempt = 0
        if self._counters["reconnects"] and not session_present:
            log.warning(
                "mqtt %s: broker %s did not resume our session: what was queued for us while away is lost "
                "(session expired, or broker without persistence)",
                self.settings.effective_client_id,
                self._where,
            )
        log.info(
            "mqtt %s connected to %s (session %s), subscribed to %s",
            self.settings.effective_client_id,
            self._where,
            "resumed" if session_present else "new",
            ", ".join(filters),
        )
        assert self._ready is not None
        if not self._ready.done():
            self._ready.set_result(None)

    def _abort_socket(self) -> None:
        """Close a half-open connection (no CONNACK / SUBACK): the next attempt starts clean."""
        client = self._client
        if client is not None and client.socket() is not None:
            client._sock_close()  # no public call; runs on_socket_close
        self._connection_ended()

    def _connection_ended(self) -> None:
        self._connected = False
        self._accepting = False
        self._generation += 1
        self._fail_pending(TransportError(self.name, f"connection to {self._where} lost before the ack"))
        self._lost.set()

    def _fail_pending(self, exc: TransportError) -> None:
        futures: list[asyncio.Future[Any]] = [*self._pending.values(), *self._subacks.values()]
        if self._connack is not None:
            futures.append(self._connack)
        for fut in futures:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here: an abandoned waiter must not log "never retrieved"

    # -- paho callbacks (all on the loop thread, except the socket hooks during a connect) --

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, rc: ReasonCode, props: Properties | None
    ) -> None:
        fut = self._connack
        if fut is None or fut.done():
            return
        if rc.is_failure:
            what = f"broker {self._where} refused the connection: {_rc_text(rc)}"
            cls = TransportRefused if rc.value in _CONNECT_REFUSED else TransportError
            fut.set_exception(cls(self.name, what))
        else:
            self._accepting = True
            fut.set_result(bool(flags.session_present))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        if rc.is_failure:
            log.info("mqtt %s: disconnected: %s", self.settings.effective_client_id, _rc_text(rc))
        tls_error = self._client.last_tls_error if self._client is not None else None
        if self._connack is not None and not self._connack.done() and tls_error is not None:
            what = f"TLS: broker {self._where} refused us: {tls_error.reason}"
            cls = TransportRefused if tls_error.reason in _TLS_REFUSED else TransportError
            self._connack.set_exception(cls(self.name, what))
        self._connection_ended()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Properties | None
    ) -> None:
        fut = self._subacks.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(list(rcs))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Properties) -> None:
        fut = self._pending.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not self._accepting:
            # this connection is being dropped: a message still arriving on it is not handled
            # (and so not acked); the broker redelivers it, in order, on the next connection
            return
        try:
            self._inbox.put_nowait((self._generation, msg, self._received_ns()))
        except asyncio.QueueFull:
            if msg.qos == 0:
                self._counters["dropped"] += 1
                log.warning("mqtt inbox full: QoS 0 message on %s dropped", msg.topic)
            else:  # the broker ignored our Receive Maximum: do not ack, have it redeliver
                log.warning("mqtt inbox full (broker exceeded Receive Maximum): reconnecting")
                self._drop_connection()

    # -- socket hooks: paho's socket on the asyncio loop ----------------------------------

    def _in_loop(self, fn: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Nagle off: a message sent right after another (Reserve then Activation) otherwise
        # waits for the broker's delayed ACK, ~40 ms (measured by mgms bench). The broker
        # needs the same (`set_tcp_nodelay true`, as gateway.services.MosquittoServer does).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._in_loop(self._add_socket, sock.fileno())

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._remove_socket, sock.fileno())

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._add_writer, sock.fileno())

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._remove_writer, sock.fileno())

    def _add_socket(self, fd: int) -> None:
        assert self._loop is not None
        self._fd = fd
        self._socket_gone.clear()
        self._loop.add_reader(fd, self._readable)
        self._stop_misc_timer()
        self._misc_timer = self._loop.call_later(_MISC_INTERVAL_S, self._misc)

    def _remove_socket(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        if self._fd == fd:
            self._fd = None
            self._stop_misc_timer()
        self._socket_gone.set()

    def _add_writer(self, fd: int) -> None:
        assert self._loop is not None
        if fd == self._fd:
            self._loop.add_writer(fd, self._writable)

    def _remove_writer(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_writer(fd)

    def _readable(self) -> None:
        client = self._client
        if client is None:
            return
        client.loop_read()
        # TLS: paho reads packet by packet, so decrypted bytes can wait inside the SSL object
        # where select() does not see them; read on until that buffer is empty.
        for _ in range(10_000):
            sock = client.socket()
            if not isinstance(sock, ssl.SSLSocket) or sock.pending() == 0:
                break
            client.loop_read()

    def _flush(self) -> None:
        """Write what paho queued now instead of on the next loop iteration (saves a poll
        round per message); whatever does not fit stays registered with add_writer.

        Only when traffic is light: each direct write also toggles the writer registration
        (two epoll_ctl calls), which under a burst costs more than the poll round it saves.
        """
        client = self._client
        if client is not None and self._fd is not None and client.want_write():
            client.loop_write()

    def _writable(self) -> None:
        if self._client is not None:
            self._client.loop_write()

    def _misc(self) -> None:
        assert self._loop is not None
        self._misc_timer = None
        if self._client is None or self._fd is None:
            return
        self._client.loop_misc()
        if self._fd is not None:
            self._misc_timer = self._loop.call_later(_MISC_INTERVAL_S, self._misc)

    def _stop_misc_timer(self) -> None:
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None

    # -- inbound: one message at a time, ack after the handler ----------------------------

    async def _inbox_loop(self) -> None:
        handler = self._handler
        assert handler is not None
        while True:
            generation, msg, received_ns = await self._inbox.get()
            if generation != self._generation:
                continue  # its connection is gone; the broker redelivers it
            delivery = Delivery(data=bytes(msg.payload), topic=msg.topic, transport=self.name, received_ns=received_ns)
            try:
                await handler(delivery)
            except TransportError as exc:
                self._counters["not_acked"] += 1
                self._handler_failing = True
                log.warning("mqtt: message on %s not taken (%s); reconnecting for redelivery", msg.topic, exc)
                self._drop_connection()
                continue
            except MessageRejected as exc:
                self._counters["rejected"] += 1
                log.info("mqtt: message on %s rejected: %s", msg.topic, exc)
            except Exception:
                self._counters["handler_errors"] += 1
                log.exception("mqtt: handler failed on a message on %s (%d bytes); acked", msg.topic, len(msg.payload))
            else:
                self._counters["received"] += 1
                self._handler_failing = False
            self._ack(generation, msg)

    def _ack(self, generation: int, msg: mqtt.MQTTMessage) -> None:
        client = self._client
        if client is None or generation != self._generation or msg.qos == 0:
            return
        client.ack(msg.mid, msg.qos)
        if self._inbox.empty():  # the last ack of a burst goes out now, the others batched
            self._flush()

    def _drop_connection(self) -> None:
        """End this connection without acking what is outstanding: the broker redelivers it
        (with the DUP flag) when the session resumes."""
        client = self._client
        self._generation += 1  # no ack of this connection may go out any more
        self._accepting = False
        if client is not None and self._fd is not None:
            client.disconnect()
