"""HTTPS transport against itself: real aiohttp servers on 127.0.0.1, real TLS with the lab PKI.

Each test builds its own PKI and binds port 0 (or a free port for the peer that must be down),
so tests do not share state. Status-code tests talk raw aiohttp where the status itself is the
rule; everything else goes through :class:`HttpsTransport` on both ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from gateway.errors import ConfigError, TransportError, TransportRefused
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.semantic import (
    Envelope,
    FlexibilityType,
    Keystore,
    MemoryNonceStore,
    Offer,
    Opener,
    PrivateIdentity,
    Sealer,
)
from gateway.semantic.errors import Replayed
from gateway.semantic.jsonld import CONTEXT_FILE
from gateway.services import free_port
from gateway.transport.base import Delivery, Outgoing, topic_for
from gateway.transport.https import HttpsPeer, HttpsSettings, HttpsTransport, PeerUnavailable

pytestmark = pytest.mark.timeout(10)

TOKEN = "lab-token-for-ams-0123456789"
BODY = b'{"@context": "https://mgms.example.org/contexts/heila-v1.jsonld", "sealed": "..."}'


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def message(recipient: str = "mgms", sender: str = "ams", data: bytes = BODY, n: int = 1) -> Outgoing:
    return Outgoing(
        f"urn:uuid:00000000-0000-4000-8000-{n:012d}", recipient, topic_for(recipient, sender, "Offer"), data
    )


class Inbox:
    """A handler that records deliveries, or raises what the test tells it to."""

    def __init__(self) -> None:
        self.got: list[Delivery] = []
        self.raise_: Exception | None = None

    async def __call__(self, delivery: Delivery) -> None:
        if self.raise_ is not None:
            raise self.raise_
        self.got.append(delivery)


@pytest.fixture
def pki(tmp_path: Path) -> LabPki:
    return make_lab_pki(tmp_path / "pki")


@pytest.fixture
async def running() -> AsyncIterator[Callable[[HttpsSettings, Inbox | None], Awaitable[HttpsTransport]]]:
    """Start transports; close every one of them at the end, whatever the test did."""
    started: list[HttpsTransport] = []

    async def start(settings: HttpsSettings, inbox: Inbox | None = None) -> HttpsTransport:
        t = HttpsTransport(settings)
        await t.start(inbox if inbox is not None else Inbox())
        started.append(t)
        return t

    yield start
    for t in started:
        await t.close()


def server(pki: LabPki, participant: str = "mgms", **kw: object) -> HttpsSettings:
    """A receiving participant on port 0; certificate auth by default (CN 'mgms gateway' -> 'ams')."""
    base: dict[str, object] = {
        "participant": participant,
        "listen_port": 0,
        "server_cert_file": pki.server.cert,
        "server_key_file": pki.server.key,
        "client_ca_file": pki.ca,
        "cert_names": {"mgms gateway": "ams", "intruder": "ams"},
    }
    base.update(kw)
    return HttpsSettings.model_validate(base)


def client(pki: LabPki, port: int | None, *, peer: str = "mgms", cert: bool = True, **kw: object) -> HttpsSettings:
    """A send-only participant 'ams' that reaches ``peer`` on ``port``."""
    base: dict[str, object] = {
        "participant": "ams",
        "peers": {peer: HttpsPeer(url=f"https://127.0.0.1:{port}", ca_file=pki.ca)},
    }
    if cert:
        base |= {"cert_file": pki.client.cert, "key_file": pki.client.key}
    base.update(kw)
    return HttpsSettings.model_validate(base)


def raw_tls(pki: LabPki, *, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if cert:
        ctx.load_cert_chain(pki.client.cert, pki.client.key)
    return ctx


# -- round trip -----------------------------------------------------------------------------


async def test_round_trip_between_two_servers_cert_one_way_token_the_other(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """mgms accepts ams by bearer token; ams accepts mgms by client certificate."""
    monkeypatch.setenv("AMS_TO_MGMS_TOKEN", TOKEN)
    mgms_port, ams_port = free_port(), free_port()
    mgms_in, ams_in = Inbox(), Inbox()
    mgms = await running(
        HttpsSettings(
            participant="mgms",
            listen_port=mgms_port,
            server_cert_file=pki.server.cert,
            server_key_file=pki.server.key,
            client_auth="token",
            accept_token_sha256={sha(TOKEN): "ams"},
            cert_file=pki.client.cert,
            key_file=pki.client.key,
            peers={"ams": HttpsPeer(url=f"https://127.0.0.1:{ams_port}", ca_file=pki.ca)},
        ),
        mgms_in,
    )
    ams = await running(
        HttpsSettings(
            participant="ams",
            listen_port=ams_port,
            server_cert_file=pki.server.cert,
            server_key_file=pki.server.key,
            client_ca_file=pki.ca,
            cert_names={"mgms gateway": "mgms"},
            bearer_token_env="AMS_TO_MGMS_TOKEN",
            peers={"mgms": HttpsPeer(url=f"https://127.0.0.1:{mgms_port}", ca_file=pki.ca, server_name="localhost")},
        ),
        ams_in,
    )
    await ams.send(message("mgms", "ams", b"to mgms"))
    await mgms.send(message("ams", "mgms", b"to ams", n=2))
    await ams.send(message("mgms", "ams", b"again", n=3))  # same keep-alive connection

    assert [(d.data, d.topic, d.transport, d.peer) for d in mgms_in.got] == [
        (b"to mgms", "heila/v1/to/mgms/from/ams/Offer", "https", "ams"),
        (b"again", "heila/v1/to/mgms/from/ams/Offer", "https", "ams"),
    ]
    assert [(d.data, d.topic, d.peer) for d in ams_in.got] == [(b"to ams", "heila/v1/to/ams/from/mgms/Offer", "mgms")]
    assert ams.stats()["sent"] == ams.stats()["acked"] == 2
    assert mgms.stats()["received"] == 2 and ams.stats()["received"] == 1


# -- client certificates ----------------------------------------------------------------------


async def test_client_certificate_cn_becomes_the_peer(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    inbox = Inbox()
    srv = await running(server(pki), inbox)
    cli = await running(client(pki, srv.port))
    await cli.send(message())
    assert [d.peer for d in inbox.got] == ["ams"]


async def test_client_certificate_from_rogue_ca_is_refused_at_tls(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    inbox = Inbox()
    srv = await running(server(pki), inbox)
    rogue = client(pki, srv.port, cert=False, cert_file=pki.rogue_client.cert, key_file=pki.rogue_client.key)
    cli = await running(rogue)
    with pytest.raises(TransportError) as caught:
        await cli.send(message())
    assert "client certificate refused?" in str(caught.value)  # TLS 1.3: the refusal reaches us as a reset
    assert inbox.got == [] and srv.stats()["received"] == 0


async def test_client_without_certificate_gets_401_and_is_refused(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    """No certificate passes TLS (so the context stays public) but cannot POST."""
    inbox = Inbox()
    srv = await running(server(pki), inbox)
    cli = await running(client(pki, srv.port, cert=False))
    with pytest.raises(TransportRefused, match="401"):
        await cli.send(message())
    assert inbox.got == [] and srv.stats()["unauthenticated"] == 1


async def test_handler_bug_is_500_and_retryable(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]], caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox()
    inbox.raise_ = KeyError("oops")
    srv = await running(server(pki), inbox)
    cli = await running(client(pki, srv.port))
    with pytest.raises(TransportError, match="500") as caught:
        await cli.send(message())
    assert not isinstance(caught.value, TransportRefused)
    assert srv.stats()["handler_failures"] == 1
    assert "handler failed" in caplog.text


async def test_server_certificate_must_carry_the_expected_name(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    srv = await running(server(pki))
    settings = client(pki, srv.port)
    wrong = settings.model_copy(
        update={"peers": {"mgms": HttpsPeer(url=f"https://127.0.0.1:{srv.port}", ca_file=pki.ca, server_name="x.test")}}
    )
    cli = await running(wrong)
    with pytest.raises(TransportRefused, match="not trusted"):
        await cli.send(message())


async def test_server_certificate_from_another_ca_is_refused(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    srv = await running(server(pki))
    cli = await running(client(pki, srv.port).model_copy(
        update={"peers": {"mgms": HttpsPeer(url=f"https://127.0.0.1:{srv.port}", ca_file=pki.rogue_ca)}}
    ))  # fmt: skip
    with pytest.raises(TransportRefused):
        await cli.send(message())


# -- tokens and spoofing ----------------------------------------------------------------------


def token_server(pki: LabPki) -> HttpsSettings:
    return server(pki, client_auth="token", client_ca_file=None, accept_token_sha256={sha(TOKEN): "ams"})


async def test_bearer_token_authenticates(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEILA_TOKEN", TOKEN)
    inbox = Inbox()
    srv = await running(token_server(pki), inbox)
    cli = await running(client(pki, srv.port, cert=False, bearer_token_env="HEILA_TOKEN"))
    await cli.send(message())
    assert [d.peer for d in inbox.got] == ["ams"]


async def test_wrong_token_is_401_and_refused_on_the_client(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEILA_TOKEN", "not-the-token")
    srv = await running(token_server(pki))
    cli = await running(client(pki, srv.port, cert=False, bearer_token_env="HEILA_TOKEN"))
    with pytest.raises(TransportRefused, match="401"):
        await cli.send(message())
    async with aiohttp.ClientSession() as s, s.post(
        f"https://127.0.0.1:{srv.port}/{message().topic}", data=BODY, ssl=raw_tls(pki, cert=False),
        headers={"Content-Type": "application/ld+json"},
    ) as r:  # fmt: skip
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert srv.stats()["unauthenticated"] == 2 and srv.stats()["received"] == 0
    assert cli.stats()["refused"] == 1


async def test_sender_path_spoofing_is_403(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ams's token, but the path claims the message comes from 'eve'."""
    monkeypatch.setenv("HEILA_TOKEN", TOKEN)
    inbox = Inbox()
    srv = await running(token_server(pki), inbox)
    cli = await running(client(pki, srv.port, cert=False, bearer_token_env="HEILA_TOKEN"))
    with pytest.raises(TransportRefused, match="403"):
        await cli.send(message(sender="eve"))
    assert inbox.got == [] and srv.stats()["forbidden"] == 1


async def test_both_requires_certificate_and_token_naming_the_same_participant(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEILA_TOKEN", TOKEN)
    inbox = Inbox()
    srv = await running(server(pki, client_auth="both", accept_token_sha256={sha(TOKEN): "ams"}), inbox)
    with_both = await running(client(pki, srv.port, bearer_token_env="HEILA_TOKEN"))
    await with_both.send(message())
    cert_only = await running(client(pki, srv.port))
    with pytest.raises(TransportRefused, match="401"):
        await cert_only.send(message(n=2))
    assert [d.peer for d in inbox.got] == ["ams"]


async def test_both_with_certificate_and_token_of_different_participants_is_403(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEILA_TOKEN", TOKEN)
    srv = await running(server(pki, client_auth="both", accept_token_sha256={sha(TOKEN): "eve"}))
    cli = await running(client(pki, srv.port, bearer_token_env="HEILA_TOKEN"))
    with pytest.raises(TransportRefused, match="403"):
        await cli.send(message())
    assert srv.stats()["forbidden"] == 1


async def test_certificate_not_listed_in_cert_names_is_403(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    srv = await running(server(pki, cert_names={"someone": "ams"}))
    cli = await running(client(pki, srv.port))
    with pytest.raises(TransportRefused, match="403"):
        await cli.send(message())


async def test_message_for_another_recipient_is_404(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    srv = await running(server(pki))
    cli = await running(client(pki, srv.port, peer="bob"))
    with pytest.raises(TransportRefused, match="404"):
        await cli.send(message(recipient="bob"))


# -- body size, handler outcomes ----------------------------------------------------------------


async def test_oversize_body_is_413_before_the_handler(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    inbox = Inbox()
    srv = await running(server(pki, max_body_bytes=1000), inbox)
    async with aiohttp.ClientSession() as s, s.post(
        f"https://127.0.0.1:{srv.port}/{message().topic}", data=b"x" * 5000, ssl=raw_tls(pki),
        headers={"Content-Type": "application/ld+json"},
    ) as r:  # fmt: skip
        assert r.status == 413
    cli = await running(client(pki, srv.port))
    with pytest.raises(TransportRefused, match="413"):
        await cli.send(message(data=b"x" * 1001))
    await cli.send(message(data=b"x" * 1000, n=2))
    assert [len(d.data) for d in inbox.got] == [1000]
    assert srv.stats()["too_large"] == 2


async def test_large_body_waits_for_100_continue_so_refusals_come_first(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    inbox = Inbox()
    srv = await running(server(pki, max_body_bytes=100_000), inbox)
    cli = await running(client(pki, srv.port))
    await cli.send(message(data=b"y" * 90_000))  # > 64 KiB: goes through 100-continue
    with pytest.raises(TransportRefused, match="413"):
        await cli.send(message(data=b"x" * 200_000, n=2))
    await cli.send(message(data=b"z" * 99_000, n=3))  # the refused request did not poison the connection
    stranger = await running(client(pki, srv.port, cert=False))
    with pytest.raises(TransportRefused, match="401"):
        await stranger.send(message(data=b"x" * 80_000, n=4))
    assert [len(d.data) for d in inbox.got] == [90_000, 99_000]
    assert srv.stats()["too_large"] == 1 and srv.stats()["unauthenticated"] == 1


async def test_chunked_oversize_body_is_413(pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]) -> None:
    """No Content-Length to check up front: the read itself stops at max_body_bytes."""
    inbox = Inbox()
    srv = await running(server(pki, max_body_bytes=1000), inbox)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 500

    async with aiohttp.ClientSession() as s, s.post(
        f"https://127.0.0.1:{srv.port}/{message().topic}", data=chunks(), ssl=raw_tls(pki),
        headers={"Content-Type": "application/ld+json"},
    ) as r:  # fmt: skip
        assert r.status == 413
    assert inbox.got == [] and srv.stats()["too_large"] == 1


async def test_client_refuses_to_send_more_than_its_own_limit(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    cli = await running(client(pki, free_port(), max_body_bytes=10))
    with pytest.raises(TransportRefused, match="max_body_bytes"):
        await cli.send(message(data=b"x" * 11))
    assert cli.stats()["sent"] == 0


async def test_rejected_message_is_422_with_reason_and_refused_on_the_client(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    inbox = Inbox()
    inbox.raise_ = Replayed("seen before", message_id="urn:uuid:x")
    srv = await running(server(pki), inbox)
    async with aiohttp.ClientSession() as s, s.post(
        f"https://127.0.0.1:{srv.port}/{message().topic}", data=BODY, ssl=raw_tls(pki),
        headers={"Content-Type": "application/ld+json"},
    ) as r:  # fmt: skip
        assert r.status == 422
        assert await r.json() == {"reason": "replayed", "detail": "seen before"}
    cli = await running(client(pki, srv.port))
    with pytest.raises(TransportRefused, match="422: replayed: seen before"):
        await cli.send(message())
    assert srv.stats()["rejected"] == 2


async def test_handler_transport_error_is_503_and_retryable_on_the_client(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    inbox = Inbox()
    inbox.raise_ = TransportError("redis", "down")
    srv = await running(server(pki, retry_after_s=7), inbox)
    cli = await running(client(pki, srv.port))
    with pytest.raises(TransportError, match="503") as caught:
        await cli.send(message())
    assert not isinstance(caught.value, TransportRefused)
    assert isinstance(caught.value, PeerUnavailable)
    assert caught.value.status == 503 and caught.value.retry_after_s == 7
    assert "retry after 7 s" in str(caught.value)
    inbox.raise_ = None  # Redis is back: the same message goes through on the retry
    await cli.send(message())
    assert len(inbox.got) == 1
    assert srv.stats()["unavailable"] == 1 and cli.stats()["errors"] == 1 and cli.stats()["acked"] == 1


async def test_slow_handler_times_out_as_retryable(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    release = asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        await release.wait()

    srv = HttpsTransport(server(pki))
    await srv.start(slow)
    try:
        cli = await running(client(pki, srv.port, request_timeout_s=0.3))
        with pytest.raises(TransportError, match="no answer within") as caught:
            await cli.send(message())
        assert not isinstance(caught.value, TransportRefused)
    finally:
        release.set()
        await srv.close()


async def test_peer_down_is_retryable(pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]) -> None:
    cli = await running(client(pki, free_port()))
    with pytest.raises(TransportError) as caught:
        await cli.send(message())
    assert not isinstance(caught.value, TransportRefused)
    assert cli.stats()["errors"] == 1


async def test_unknown_recipient_is_refused(pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]) -> None:
    cli = await running(client(pki, free_port()))
    with pytest.raises(TransportRefused, match="no HTTPS peer"):
        await cli.send(message(recipient="nobody"))


async def test_send_before_start_is_retryable(pki: LabPki) -> None:
    with pytest.raises(TransportError, match="not started"):
        await HttpsTransport(client(pki, free_port())).send(message())


# -- with the real message pipeline --------------------------------------------------------------


async def test_sealed_offer_crosses_and_opens_a_replay_is_422(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    """ams seals an Offer for mgms; mgms's handler opens it with the real inbound pipeline."""
    ams_id, mgms_id = PrivateIdentity.generate("ams"), PrivateIdentity.generate("mgms")
    sealer = Sealer(Keystore(ams_id, [mgms_id.public]))
    opener = Opener(Keystore(mgms_id, [ams_id.public]), MemoryNonceStore())
    opened: list[tuple[Envelope, Delivery]] = []

    async def handler(delivery: Delivery) -> None:
        opened.append((await opener.open(delivery.data), delivery))

    srv = HttpsTransport(server(pki))
    await srv.start(handler)
    try:
        cli = await running(client(pki, srv.port))
        topic = topic_for("mgms", "ams", "Offer")
        start = datetime.now(UTC) + timedelta(hours=1)
        offer = Offer(identifier="o-1", flexibility_type=FlexibilityType.UPWARD, power_kw=40.0, start=start,
                      stop=start + timedelta(hours=1), price_eur_per_mwh=55.5)  # fmt: skip
        envelope = Envelope.create(offer, sender="ams", recipient="mgms", topic=topic)
        sealed = sealer.seal(envelope)
        await cli.send(Outgoing(envelope.id, "mgms", topic, sealed))
        [(got, delivery)] = opened
        assert got.payload == offer and got.topic == delivery.topic == topic and delivery.peer == "ams"
        with pytest.raises(TransportRefused, match="422: replayed"):
            await cli.send(Outgoing(envelope.id, "mgms", topic, sealed))  # the same bytes again
        assert srv.stats()["rejected"] == 1
    finally:
        await srv.close()


# -- context, health, lifecycle -------------------------------------------------------------------


async def test_context_is_served_as_json_ld_with_etag(
    pki: LabPki, running: Callable[..., Awaitable[HttpsTransport]]
) -> None:
    srv = await running(server(pki))
    url = f"https://127.0.0.1:{srv.port}/contexts/{CONTEXT_FILE}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=raw_tls(pki, cert=False)) as r:  # public: no client certificate needed
            assert r.status == 200 and r.content_type == "application/ld+json"
            assert "max-age" in r.headers["Cache-Control"]
            etag = r.headers["ETag"]
            doc = json.loads(await r.read())
        assert isinstance(doc["@context"], dict)
        async with s.get(url, ssl=raw_tls(pki), headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        async with s.get(f"https://127.0.0.1:{srv.port}/healthz", ssl=raw_tls(pki)) as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"


async def test_close_releases_port_tasks_and_threads(pki: LabPki) -> None:
    before = asyncio.all_tasks()
    srv = HttpsTransport(server(pki))
    await srv.start(Inbox())
    port = srv.port
    assert port
    cli = HttpsTransport(client(pki, port))
    await cli.start(Inbox())
    await cli.send(message())
    await cli.close()
    await srv.close()
    await cli.close()  # twice is harmless
    assert asyncio.all_tasks() - before == set()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


async def test_close_during_a_send_fails_it_as_retryable(pki: LabPki) -> None:
    """The message stays in the outbox: close() must not let send() look successful."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        arrived.set()
        await release.wait()

    srv = HttpsTransport(server(pki))
    await srv.start(stuck)
    cli = HttpsTransport(client(pki, srv.port))
    await cli.start(Inbox())
    try:
        sending = asyncio.create_task(cli.send(message()))
        await arrived.wait()
        await cli.close()
        with pytest.raises(TransportError) as caught:
            await sending
        assert not isinstance(caught.value, TransportRefused)
    finally:
        release.set()
        await cli.close()
        await srv.close()


async def test_port_in_use_is_a_transport_error(pki: LabPki) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        t = HttpsTransport(server(pki, listen_port=busy.getsockname()[1]))
        with pytest.raises(TransportError, match="cannot listen"):
            await t.start(Inbox())
        await t.close()


# -- configuration ----------------------------------------------------------------------------


def test_settings_never_take_a_token_itself(pki: LabPki) -> None:
    with pytest.raises(ValidationError, match="SHA-256"):
        server(pki, client_auth="token", accept_token_sha256={TOKEN: "ams"})
    with pytest.raises(ValidationError, match="extra"):
        HttpsSettings.model_validate({"participant": "ams", "bearer_token": TOKEN})


def test_settings_need_what_the_auth_mode_uses(pki: LabPki) -> None:
    with pytest.raises(ValidationError, match="client_ca_file"):
        server(pki, client_ca_file=None)
    with pytest.raises(ValidationError, match="accept_token"):
        server(pki, client_auth="token")
    with pytest.raises(ValidationError, match="server_cert_file"):
        HttpsSettings(participant="mgms", listen_port=0)
    with pytest.raises(ValidationError, match="url"):
        HttpsPeer(url="http://127.0.0.1:1", ca_file=pki.ca)


def test_missing_token_variable_names_the_key(pki: LabPki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEILA_ABSENT_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"https\.bearer_token_env: environment variable HEILA_ABSENT_TOKEN"):
        HttpsTransport(client(pki, 1, bearer_token_env="HEILA_ABSENT_TOKEN"))


def test_unreadable_ca_names_the_file(pki: LabPki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    settings = client(pki, 1).model_copy(
        update={"peers": {"mgms": HttpsPeer(url="https://127.0.0.1:1", ca_file=missing)}}
    )
    with pytest.raises(ConfigError, match=r"nope\.crt: https\.peers\.mgms\.ca_file"):
        HttpsTransport(settings)
