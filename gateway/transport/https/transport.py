"""HTTPS message transport: each message is one ``POST`` of its sealed bytes to the recipient.

Why HTTPS next to MQTT: a participant behind a firewall that allows only outbound 443, or a
peer that runs no broker, can still exchange messages point to point. The transport is a pipe:
it never parses the body; the messaging core verifies, decrypts and de-duplicates.

Wire contract (the path *is* the message topic, see :mod:`gateway.transport.base`)::

    POST /heila/v1/to/<recipient>/from/<sender>/<MessageType>
    Content-Type: application/ld+json
    Authorization: Bearer <token>          (when the server uses tokens)
    <sealed message bytes>

    202  taken: the handler stored it                     -> sender: done (acked)
    401  no or unknown credentials                        -> sender: TransportRefused
    403  authenticated, but not as <sender>               -> sender: TransportRefused
    404  <recipient> is not this server's participant     -> sender: TransportRefused
    413  body larger than max_body_bytes (checked first)  -> sender: TransportRefused
    415  not a JSON content type                          -> sender: TransportRefused
    422  handler raised MessageRejected {"reason","detail"} -> sender: TransportRefused
    503  handler raised TransportError, Retry-After        -> sender: PeerUnavailable (retry)
    500  handler raised anything else (a bug)             -> sender: PeerUnavailable (retry)
    other 5xx, 408, 425, 429                              -> sender: PeerUnavailable (retry)
    connection refused or reset, timeout                  -> sender: TransportError (retry)

    GET /contexts/heila-v1.jsonld   the JSON-LD context messages refer to (ETag, cacheable)
    GET /healthz                    200 {"status": "ok"}

The 202 goes out only after the handler returned, which is the whole ack semantics: the
handler stores the message durably first, so a 2xx means "no longer the sender's problem".
HTTP/1.1 handles one request at a time per connection, so messages of one connection reach
the handler one at a time and in order.

Authentication happens before the body is read (an unauthenticated caller cannot make the
server buffer a megabyte), and the size is checked against ``Content-Length`` before reading.
Bodies over 64 KiB are sent with ``Expect: 100-continue``, so those checks refuse a large
message before it is even transmitted.
TLS 1.2 is the floor on both sides. With ``client_auth`` ``"certificate"`` or ``"both"`` the
TLS handshake refuses a client certificate that does not verify against ``client_ca_file``
(such a client never reaches HTTP and is not counted); a client *without* a certificate gets
through TLS, may read the context and ``/healthz``, and gets 401 on ``POST``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.config import file_problem, no_pass_phrase, pem_pair_problem
from gateway.errors import ConfigError, ConfigIssue, TransportError, TransportRefused
from gateway.semantic.errors import MessageRejected
from gateway.semantic.jsonld import CONTEXT_FILE, CONTEXT_IRI, context_bytes
from gateway.transport.base import (
    TOPIC_ROOT,
    Delivery,
    MessageHandler,
    MessageTransport,
    Outgoing,
    received_clock,
    topic_for,
)
from gateway.transport.https.settings import HttpsPeer, HttpsSettings

__all__ = ["CONTENT_TYPE", "HttpsTransport", "PeerUnavailable", "context_paths", "preflight"]

log = logging.getLogger(__name__)

NAME: Final = "https"
CONTENT_TYPE: Final = "application/ld+json"
_ACCEPTED_TYPES: Final = frozenset({"application/ld+json", "application/json"})
_SETTINGS_FILE: Final = "<https settings>"
_COUNTERS: Final = (
    "sent",
    "acked",
    "refused",
    "errors",
    "received",
    "rejected",
    "unavailable",
    "unauthenticated",
    "forbidden",
    "too_large",
    "handler_failures",
)
# Permanent answers: the same request cannot succeed until an operator changes something.
# 408 and 429 are missing on purpose: "later" can work for them.
_RETRYABLE_4XX: Final = frozenset({408, 425, 429})
_EXPECT_CONTINUE_ABOVE: Final = 64 * 1024


class PeerUnavailable(TransportError):
    """The peer answered, but not "taken" and not "never": 5xx, 408, 425 or 429. Retryable.

    ``retry_after_s`` is the peer's ``Retry-After`` (seconds form) when it sent one, so an
    outbox can wait that long instead of its own backoff; ``status`` is the HTTP status.
    """

    def __init__(self, transport: str, message: str, status: int, retry_after_s: float | None) -> None:
        super().__init__(transport, message)
        self.status = status
        self.retry_after_s = retry_after_s


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds; None when absent or in the HTTP-date form (not worth
    trusting a peer's clock for)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 86_400 else None


def context_paths() -> tuple[str, ...]:
    """URL paths the JSON-LD context is served under: ``/contexts/<file>`` and the IRI's path."""
    paths = {f"/contexts/{CONTEXT_FILE}", urlsplit(CONTEXT_IRI).path}
    return tuple(sorted(p for p in paths if p))


def _issue(key: str, reason: str, file: Path | str = _SETTINGS_FILE) -> ConfigError:
    return ConfigError([ConfigIssue(str(file), f"https.{key}", reason)])


def _env(key: str, var: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise _issue(key, f"environment variable {var} is not set or empty")
    return value


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _load_chain(ctx: ssl.SSLContext, key: str, cert: Path, private_key: Path) -> None:
    try:
        ctx.load_cert_chain(cert, private_key, password=no_pass_phrase)
    except ssl.SSLError as exc:
        raise _issue(key, pem_pair_problem(cert, private_key, exc), cert) from exc
    except OSError as exc:
        raise _issue(key, f"certificate {cert} with key {private_key}: not usable ({exc})", cert) from exc


def _load_ca(ctx: ssl.SSLContext, key: str, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise _issue(key, f"not a readable PEM CA certificate ({exc})", ca) from exc


def server_tls_context(settings: HttpsSettings) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2+; client certificates requested and verified when
    ``client_auth`` uses them."""
    assert settings.server_cert_file is not None and settings.server_key_file is not None  # validated
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, "server_cert_file", settings.server_cert_file, settings.server_key_file)
    if settings.client_auth in ("certificate", "both"):
        assert settings.client_ca_file is not None  # validated
        _load_ca(ctx, "client_ca_file", settings.client_ca_file)
        # OPTIONAL, not REQUIRED: a certificate that is presented must still verify against
        # client_ca_file (else the handshake fails), but a caller without one gets through TLS
        # so that it can fetch the JSON-LD context and /healthz, and so that a sender that lost
        # its certificate gets a clear 401 instead of a connection reset. POST needs a verified
        # certificate all the same (see _authenticate).
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_tls_context(settings: HttpsSettings, name: str, peer: HttpsPeer) -> ssl.SSLContext:
    """The TLS context toward one peer: verify its server certificate against its own CA only
    (not the system store: a public CA must not be able to impersonate a participant)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, f"peers.{name}.ca_file", peer.ca_file)
    if settings.cert_file is not None and settings.key_file is not None:
        _load_chain(ctx, "cert_file", settings.cert_file, settings.key_file)
    return ctx


def preflight(settings: HttpsSettings) -> list[tuple[tuple[str, ...], str]]:
    """Every problem the constructor would stop at, all of them: (key below the block, reason).

    The constructor reads the environment variables and PEM files one after the other and
    raises at the first; ``check-config`` and the start of ``run`` list them all at once,
    through the same loaders, so the two cannot disagree.
    """
    problems: list[tuple[tuple[str, ...], str]] = []

    def attempt(loc: tuple[str, ...], files: dict[tuple[str, ...], Path], load: Callable[[], object]) -> None:
        missing = [(key, p) for key, f in files.items() if (p := file_problem(f)) is not None]
        if missing:
            problems.extend(missing)
            return
        try:
            load()
        except ConfigError as exc:
            for issue in exc.issues:  # name the file when the reason does not
                named = issue.file == _SETTINGS_FILE or issue.file in issue.reason
                problems.append((loc, issue.reason if named else f"{issue.file}: {issue.reason}"))

    def client() -> ssl.SSLContext:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    if settings.bearer_token_env is not None:
        attempt(("bearer_token_env",), {}, partial(_env, "bearer_token_env", settings.bearer_token_env))
    for name, peer in settings.peers.items():
        if peer.token_env is not None:
            attempt(("peers", name, "token_env"), {}, partial(_env, "token_env", peer.token_env))
        ca_key = ("peers", name, "ca_file")
        attempt(ca_key, {ca_key: peer.ca_file}, partial(_load_ca, client(), "ca_file", peer.ca_file))
    for var in settings.accept_token_env:
        attempt(("accept_token_env", var), {}, partial(_env, var, var))
    if settings.cert_file is not None and settings.key_file is not None:
        pair: dict[tuple[str, ...], Path] = {("cert_file",): settings.cert_file, ("key_file",): settings.key_file}
        attempt(("cert_file",), pair, partial(_load_chain, client(), "cert_file", *pair.values()))
    if settings.listen_port is not None and settings.server_cert_file and settings.server_key_file:
        pair = {("server_cert_file",): settings.server_cert_file, ("server_key_file",): settings.server_key_file}
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        attempt(("server_cert_file",), pair, partial(_load_chain, server, "server_cert_file", *pair.values()))
        if settings.client_auth in ("certificate", "both") and settings.client_ca_file is not None:
            ca = settings.client_ca_file
            attempt(("client_ca_file",), {("client_ca_file",): ca}, partial(_load_ca, server, "client_ca_file", ca))
    return problems


def _common_name(peercert: Any) -> str | None:
    """The subject CN of a verified peer certificate (``SSLSocket.getpeercert()`` form)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                return str(value)
    return None


class _Route:
    """What the client needs per peer, resolved once: base URL, TLS context, headers."""

    __slots__ = ("base", "headers", "server_hostname", "ssl")

    def __init__(self, base: URL, tls: ssl.SSLContext, server_hostname: str | None, token: str | None) -> None:
        self.base = base
        self.ssl = tls
        self.server_hostname = server_hostname
        headers = {"Content-Type": CONTENT_TYPE}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self.headers: Mapping[str, str] = headers


class HttpsTransport(MessageTransport):
    """Sends messages as HTTPS POSTs to peers and (when ``listen_port`` is set) receives them.

    Every file and environment variable is read in the constructor, so a bad configuration
    fails at once with a :class:`~gateway.errors.ConfigError`, not at the first message.
    ``port`` is the bound port after :meth:`start` (useful with ``listen_port=0``).
    ``probes`` False: received messages are not stamped with their arrival time (no clock
    read; ``Delivery.received_ns`` is 0).
    """

    name = NAME

    def __init__(self, settings: HttpsSettings, *, probes: bool = True) -> None:
        self.settings = settings
        self._received_ns = received_clock(probes)
        self._counts: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        default_token = _env("bearer_token_env", settings.bearer_token_env) if settings.bearer_token_env else None
        self._routes: dict[str, _Route] = {}
        for peer_name, peer in settings.peers.items():
            token = _env(f"peers.{peer_name}.token_env", peer.token_env) if peer.token_env else default_token
            tls = client_tls_context(settings, peer_name, peer)
            self._routes[peer_name] = _Route(URL(peer.url), tls, peer.server_name, token)
        # Accepted tokens by digest: the server never holds a token in the clear longer than here.
        self._token_owners: dict[str, str] = dict(settings.accept_token_sha256)
        for var, owner in settings.accept_token_env.items():
            self._token_owners[_token_digest(_env(f"accept_token_env.{var}", var))] = owner
        self._server_tls = server_tls_context(settings) if settings.listen_port is not None else None
        self._etag = '"' + hashlib.sha256(context_bytes()).hexdigest()[:32] + '"'
        self._handler: MessageHandler | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, handler: MessageHandler) -> None:
        """Open the client session and, if configured, listen. Raises TransportError when the
        port cannot be bound (in use, no permission)."""
        if self._session is not None:
            raise RuntimeError("HttpsTransport already started")
        self._handler = handler
        # One session for the transport's life: keep-alive connections are reused per peer, so a
        # message costs one request, not a TCP + TLS handshake.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s),
            connector=aiohttp.TCPConnector(limit_per_host=8, enable_cleanup_closed=False),
            raise_for_status=False,
        )
        if self._server_tls is None:
            return
        try:
            await self._listen(self._server_tls)
        except BaseException:
            await self._close_session()
            raise

    async def _listen(self, tls: ssl.SSLContext) -> None:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        prefix = "/" + TOPIC_ROOT
        app.router.add_post(
            prefix + "/{recipient}/from/{sender}/{message_type}", self._receive, expect_handler=self._expect
        )
        for path in context_paths():
            app.router.add_get(path, self._context)
        app.router.add_get("/healthz", self._health)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=self.settings.shutdown_timeout_s
        )
        await runner.setup()
        site = web.TCPSite(runner, self.settings.listen_host, self.settings.listen_port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise TransportError(
                NAME, f"cannot listen on {self.settings.listen_host}:{self.settings.listen_port}: {exc}"
            ) from exc
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else self.settings.listen_port
        log.info("%s: %s listening on %s:%s", NAME, self.settings.participant, self.settings.listen_host, self.port)

    async def close(self) -> None:
        """Stop listening (requests in flight get ``shutdown_timeout_s`` to finish), then close
        the client session; sends in flight fail with TransportError and stay in the outbox."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._close_session()
        self.port = None

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def stats(self) -> Mapping[str, int]:
        """Counters: client side ``sent`` (POSTs tried), ``acked`` (2xx), ``refused`` (permanent
        failures), ``errors`` (retryable failures); server side ``received`` (handed to the
        handler), ``rejected`` (422), ``unavailable`` (503), ``unauthenticated`` (401),
        ``forbidden`` (403), ``too_large`` (413), ``handler_failures`` (500: the handler raised
        something else)."""
        return dict(self._counts)

    # -- client ----------------------------------------------------------------------------

    async def send(self, message: Outgoing) -> None:
        """POST ``message`` to its recipient; return once it answered 2xx."""
        session = self._session
        if session is None:
            raise TransportError(NAME, "not started")
        route = self._routes.get(message.recipient)
        if route is None:
            self._counts["refused"] += 1
            raise TransportRefused(NAME, f"no HTTPS peer configured for recipient {message.recipient!r}")
        if len(message.data) > self.settings.max_body_bytes:
            self._counts["refused"] += 1
            raise TransportRefused(NAME, f"{message.message_id}: {len(message.data)} bytes exceed max_body_bytes")
        url = route.base / message.topic
        self._counts["sent"] += 1
        try:
            async with session.post(
                url,
                data=message.data,
                headers=route.headers,
                ssl=route.ssl,
                server_hostname=route.server_hostname,
                # A large body waits for "100 Continue", so a 401/413 comes before it is sent;
                # small ones do not pay the extra round trip.
                expect100=len(message.data) > _EXPECT_CONTINUE_ABOVE,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    self._counts["acked"] += 1
                    log.debug("%s: %s -> %s: %d", NAME, message.message_id, message.recipient, status)
                    return
                body = await response.text(errors="replace")
                retry_after = response.headers.get("Retry-After")
        except aiohttp.ClientConnectorCertificateError as exc:
            self._counts["refused"] += 1
            raise TransportRefused(
                NAME, f"{message.recipient}: server certificate not trusted ({exc.certificate_error})"
            ) from exc
        except aiohttp.ClientSSLError as exc:
            # An alert from the server about our certificate: retrying the same certificate
            # cannot help. Other TLS failures (reset mid-handshake) may be passing.
            if _is_certificate_alert(exc):
                self._counts["refused"] += 1
                raise TransportRefused(NAME, f"{message.recipient}: our client certificate refused ({exc})") from exc
            self._counts["errors"] += 1
            raise TransportError(NAME, f"{message.recipient}: TLS failed: {exc}") from exc
        except TimeoutError as exc:
            self._counts["errors"] += 1
            raise TransportError(
                NAME, f"{message.recipient}: no answer within {self.settings.request_timeout_s} s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            # Under TLS 1.3 a server that refuses our client certificate does so after the
            # client finished its handshake: we only see the connection reset, which looks like
            # any passing failure. So it stays retryable, with a hint for the operator.
            hint = ""
            if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError) or (
                isinstance(exc, aiohttp.ClientOSError) and exc.errno == errno.ECONNRESET
            ):
                hint = " (if this persists: client certificate refused?)"
            self._counts["errors"] += 1
            raise TransportError(NAME, f"{message.recipient}: {type(exc).__name__}: {exc}{hint}") from exc
        detail = _answer_detail(body)
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            self._counts["refused"] += 1
            log.info("%s: %s refused by %s: %d %s", NAME, message.message_id, message.recipient, status, detail)
            raise TransportRefused(NAME, f"{message.recipient} answered {status}: {detail}")
        self._counts["errors"] += 1
        after = _retry_after_s(retry_after)
        hint = f" (retry after {after:g} s)" if after is not None else ""
        raise PeerUnavailable(NAME, f"{message.recipient} answered {status}: {detail}{hint}", status, after)

    # -- server ----------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> tuple[str | None, int]:
        """Who is calling: ``(participant, 0)``, or ``(None, 401|403)`` when they may not."""
        mode = self.settings.client_auth
        by_cert: str | None = None
        by_token: str | None = None
        if mode in ("certificate", "both"):
            transport = request.transport
            cn = _common_name(transport.get_extra_info("peercert")) if transport is not None else None
            if cn is not None:
                names = self.settings.cert_names
                by_cert = names.get(cn) if names else cn
                if by_cert is None:  # a CA-signed certificate that names no participant
                    return None, 403
        if mode in ("token", "both"):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and token:
                digest = _token_digest(token.strip())
                by_token = next((o for d, o in self._token_owners.items() if hmac.compare_digest(d, digest)), None)
        if mode == "certificate":
            return by_cert, 0 if by_cert else 401
        if mode == "token":
            return by_token, 0 if by_token else 401
        if by_cert is None or by_token is None:
            return None, 401
        if by_cert != by_token:
            return None, 403
        return by_cert, 0

    def _precheck(self, request: web.Request) -> tuple[str, None] | tuple[None, web.Response]:
        """Everything that can be decided from the headers alone: who, as whom, to whom, how big.

        Returns the authenticated participant, or the refusal to answer with (counted here).
        """
        participant, refusal = self._authenticate(request)
        if participant is None:
            if refusal == 403:
                self._counts["forbidden"] += 1
                return None, _problem(403, "certificate names no participant or disagrees with the token")
            self._counts["unauthenticated"] += 1
            headers = {"WWW-Authenticate": 'Bearer realm="heila"'} if self.settings.client_auth != "certificate" else {}
            return None, _problem(401, "no valid credentials", headers)
        info = request.match_info
        recipient, sender = info["recipient"], info["sender"]
        if participant != sender:
            self._counts["forbidden"] += 1
            log.warning("%s: %s tried to send as %s", NAME, participant, sender)
            return None, _problem(403, f"authenticated as {participant!r}, not {sender!r}")
        if recipient != self.settings.participant:
            return None, _problem(404, f"this is the inbox of {self.settings.participant!r}, not {recipient!r}")
        if request.content_type not in _ACCEPTED_TYPES:
            return None, _problem(415, f"content type must be {CONTENT_TYPE}")
        length = request.content_length
        if length is not None and length > self.settings.max_body_bytes:
            self._counts["too_large"] += 1
            return None, _problem(413, f"body of {length} bytes exceeds {self.settings.max_body_bytes}")
        return participant, None

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue`` (the client sends it for large bodies): refuse before the
        body is on the wire, or invite it."""
        _, refusal = self._precheck(request)
        if refusal is not None:
            # The client will not send the body now, so this connection cannot carry another
            # request (the server would read the next request as this one's body).
            refusal.force_close()
            return refusal
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="only 100-continue is supported")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the response proper
        return None

    async def _receive(self, request: web.Request) -> web.StreamResponse:
        participant, refusal = self._precheck(request)
        if refusal is not None:
            return refusal
        info = request.match_info
        recipient, sender = info["recipient"], info["sender"]
        try:
            data = await request.read()  # bounded by client_max_size (chunked bodies too)
        except web.HTTPRequestEntityTooLarge:
            self._counts["too_large"] += 1
            return _problem(413, f"body exceeds {self.settings.max_body_bytes} bytes")
        topic = topic_for(recipient, sender, info["message_type"])
        delivery = Delivery(data, topic, NAME, peer=participant, received_ns=self._received_ns())
        handler = self._handler
        assert handler is not None  # the route exists only after start()
        try:
            await handler(delivery)
        except MessageRejected as exc:
            self._counts["rejected"] += 1
            log.info("%s: rejected %s from %s: %s", NAME, topic, participant, exc)
            return web.json_response({"reason": str(exc.reason), "detail": exc.detail}, status=422)
        except TransportError as exc:
            self._counts["unavailable"] += 1
            log.warning("%s: cannot take %s from %s now: %s", NAME, topic, participant, exc)
            return _problem(503, "cannot store the message now", {"Retry-After": str(self.settings.retry_after_s)})
        except Exception:
            # A bug in the handler: not the sender's fault and maybe not permanent, so 500 (the
            # sender retries) rather than a 4xx that would make it drop the message.
            self._counts["handler_failures"] += 1
            log.exception("%s: handler failed on %s from %s", NAME, topic, participant)
            return _problem(500, "internal error")
        self._counts["received"] += 1
        log.debug("%s: took %s (%d bytes) from %s", NAME, topic, len(data), participant)
        return web.Response(status=202)

    async def _context(self, request: web.Request) -> web.StreamResponse:
        # The IRI carries the version, so the document behind it never changes: cache for a day.
        headers = {"ETag": self._etag, "Cache-Control": "public, max-age=86400"}
        if self._etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=context_bytes(), content_type=CONTENT_TYPE, headers=headers)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok", "participant": self.settings.participant})


def _problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


def _answer_detail(body: str) -> str:
    """The useful part of an error answer: ``reason: detail`` from our JSON, else the text."""
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        if isinstance(doc, dict):
            parts = [str(doc[k]) for k in ("reason", "detail") if k in doc]
            if parts:
                return ": ".join(parts)
    return body[:200]


def _is_certificate_alert(exc: aiohttp.ClientSSLError) -> bool:
    text = str(exc).upper()
    return any(
        marker in text for marker in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")
    )
