"""Security pipeline: every way a message can be wrong is refused with its own counted reason."""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.cli import main as mgms_main
from gateway.errors import ConfigError, StoreError
from gateway.semantic import (
    MESSAGE_TYPES,
    Envelope,
    Keystore,
    MemoryNonceStore,
    MessageRejected,
    Opener,
    Payload,
    PrivateIdentity,
    Reason,
    RedisNonceStore,
    RejectionCounter,
    Sealer,
    SecurityMode,
    write_key_pair,
)
from gateway.semantic.security import (
    ENC_ALG,
    b64decode,
    b64encode,
    load_private_identity,
    load_public_identity,
)
from gateway.services import RedisServer

TYPES = sorted(MESSAGE_TYPES)
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def clock_at(t: datetime) -> Callable[[], datetime]:
    return lambda: t


def opener(keystores: dict[str, Keystore], name: str = "ams", *, at: datetime = NOW, **kw: Any) -> Opener:
    return Opener(keystores[name], MemoryNonceStore(), clock=clock_at(at), **kw)


def seal(
    keystore: Keystore,
    payload: Payload,
    *,
    recipient: str = "ams",
    mode: SecurityMode = SecurityMode.ENCRYPTED,
    ttl_s: float = 300.0,
    created: datetime = NOW,
) -> bytes:
    env = Envelope.create(payload, sender=keystore.own.participant, recipient=recipient, topic="heila/v1/ams",
                          ttl_s=ttl_s, now=created)  # fmt: skip
    return Sealer(keystore, mode=mode).seal(env)


def edit(data: bytes, **changes: Any) -> bytes:
    doc = json.loads(data)
    doc.update(changes)
    return json.dumps(doc).encode()


def flip_byte(b64: str, index: int = 0) -> str:
    raw = bytearray(b64decode(b64))
    raw[index] ^= 0x01
    return b64encode(bytes(raw))


def spare_bit_flipped(b64: str) -> str:
    """The same bytes in a non-canonical spelling: 32 bytes leave 2 unused bits in the last character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return b64[:-1] + alphabet[alphabet.index(b64[-1]) ^ 1]


async def rejected(op: Opener, data: bytes) -> MessageRejected:
    with pytest.raises(MessageRejected) as info:
        await op.open(data)
    return info.value


# --- the happy path ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(SecurityMode))
@pytest.mark.parametrize("name", TYPES)
async def test_rule_every_type_round_trips_sealed_and_opened(
    name: str, mode: SecurityMode, samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    data = seal(keystores["mgms"], samples[name], mode=mode)
    env = await opener(keystores, accept_signed_only=True).open(data)
    assert env.payload == samples[name] and env.sender == "mgms" and env.recipient == "ams"


async def test_rule_the_broker_sees_only_ciphertext(
    samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    data = seal(keystores["mgms"], samples["Offer"])
    doc = json.loads(data)
    assert "payload" not in doc and "signature" not in doc and doc["enc_alg"] == ENC_ALG
    for secret in (b"offer-1", b"55.5", b"upward", b"price_eur_per_mwh"):
        assert secret not in data
    assert doc["type"] == "Offer" and doc["topic"] == "heila/v1/ams"  # routing stays possible


async def test_each_message_gets_a_fresh_ephemeral_key_and_iv(
    samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    a, b = (json.loads(seal(keystores["mgms"], samples["Bid"])) for _ in range(2))
    assert a["epk"] != b["epk"] and a["iv"] != b["iv"] and a["ciphertext"] != b["ciphertext"]


# --- each rejection, with its own reason ---------------------------------------------------


async def test_rule_forged_signer_is_bad_signature(samples: dict[str, Payload], keystores: dict[str, Keystore]) -> None:
    """Eve encrypts to ams (anyone can) and claims to be mgms: the tag holds, the signature does not."""
    eve = keystores["eve"].own
    forger = Keystore(PrivateIdentity("mgms", eve.sign_key, eve.decrypt_key), [keystores["ams"].own.public])
    exc = await rejected(opener(keystores), seal(forger, samples["ActivationNotification"]))
    assert exc.reason is Reason.BAD_SIGNATURE


async def test_rule_unknown_sender_is_refused(samples: dict[str, Payload], keystores: dict[str, Keystore]) -> None:
    exc = await rejected(opener(keystores), seal(keystores["eve"], samples["Bid"]))
    assert exc.reason is Reason.UNKNOWN_SENDER


@pytest.mark.parametrize("field", ["ciphertext", "epk", "iv"])
async def test_rule_tampered_byte_is_tampered(
    field: str, samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    data = seal(keystores["mgms"], samples["ControlSignals"])
    doc = json.loads(data)
    exc = await rejected(opener(keystores), edit(data, **{field: flip_byte(doc[field], 5)}))
    assert exc.reason is Reason.TAMPERED


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "urn:uuid:00000000-0000-4000-8000-000000000001"),
        ("type", "Bid"),
        ("sender", "ams"),
        ("topic", "heila/v1/elsewhere"),
        ("created", "2026-11-22T11:59:00Z"),
        ("expires", "2026-11-22T13:00:00Z"),
    ],
)
async def test_rule_aad_binds_the_header(
    field: str, value: str, samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    data = seal(keystores["mgms"], samples["ControlSignals"])
    exc = await rejected(opener(keystores), edit(data, **{field: value}))
    assert exc.reason is Reason.TAMPERED


async def test_rule_signed_only_tampered_byte_is_bad_signature(
    samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    data = seal(keystores["mgms"], samples["ReserveNotification"], mode=SecurityMode.SIGNED)
    doc = json.loads(data)
    doc["payload"]["power_kw"] = 4000.0
    exc = await rejected(opener(keystores, accept_signed_only=True), json.dumps(doc).encode())
    assert exc.reason is Reason.BAD_SIGNATURE
    exc = await rejected(opener(keystores, accept_signed_only=True), edit(data, topic="heila/v1/other"))
    assert exc.reason is Reason.BAD_SIGNATURE


async def test_rule_replayed_message_is_refused(samples: dict[str, Payload], keystores: dict[str, Keystore]) -> None:
    op = opener(keystores)
    data = seal(keystores["mgms"], samples["Flexibility"])
    await op.open(data)
    exc = await rejected(op, data)
    assert exc.reason is Reason.REPLAYED


async def test_rule_replay_claim_comes_after_authentication(
    samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    """A forgery reusing a genuine id must not lock the genuine message out."""
    op = opener(keystores)
    data = seal(keystores["mgms"], samples["Flexibility"])
    forged = edit(data, ciphertext=flip_byte(json.loads(data)["ciphertext"]))
    assert (await rejected(op, forged)).reason is Reason.TAMPERED
    assert (await op.open(data)).payload == samples["Flexibility"]


@pytest.mark.parametrize(
    ("at", "ttl_s", "match"),
    [
        (NOW + timedelta(seconds=300), 300.0, "expired at"),
        (NOW + timedelta(seconds=301), 3600.0, "older than the replay window"),
        (NOW - timedelta(seconds=31), 300.0, "in the future"),
    ],
)
async def test_rule_expired_or_out_of_window_is_expired(
    at: datetime, ttl_s: float, match: str, samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    data = seal(keystores["mgms"], samples["WeatherForecast"], ttl_s=ttl_s)
    exc = await rejected(opener(keystores, at=at, replay_window_s=300, clock_skew_s=30), data)
    assert exc.reason is Reason.EXPIRED and match in str(exc)


async def test_within_window_and_skew_is_accepted(samples: dict[str, Payload], keystores: dict[str, Keystore]) -> None:
    for at in (NOW - timedelta(seconds=29), NOW + timedelta(seconds=299)):
        data = seal(keystores["mgms"], samples["Bid"])
        await opener(keystores, at=at, replay_window_s=300, clock_skew_s=30).open(data)


async def test_rule_wrong_recipient_is_refused(samples: dict[str, Payload], keystores: dict[str, Keystore]) -> None:
    data = seal(keystores["mgms"], samples["Offer"])  # to ams
    exc = await rejected(opener(keystores, "eve"), data)
    assert exc.reason is Reason.WRONG_RECIPIENT
    exc = await rejected(opener(keystores), edit(data, recipient="eve"))
    assert exc.reason is Reason.WRONG_RECIPIENT


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: b"\x00garbage",
        lambda d: edit(d, ciphertext=None),
        lambda d: edit(d, iv="AAAA"),
        lambda d: edit(d, epk=spare_bit_flipped(json.loads(d)["epk"])),
        lambda d: edit(d, payload={"identifier": "x"}),
        lambda d: json.dumps({k: v for k, v in json.loads(d).items() if k != "epk"}).encode(),
    ],
    ids=["not-json", "ciphertext-not-string", "short-iv", "non-canonical-b64", "both-payload-and-ciphertext", "no-epk"],
)
async def test_rule_malformed_security_fields_are_malformed(
    mutate: Callable[[bytes], bytes], samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    data = seal(keystores["mgms"], samples["Offer"])
    exc = await rejected(opener(keystores), mutate(data))
    assert exc.reason is Reason.MALFORMED


async def test_rule_signed_only_refused_unless_allowed(
    samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    data = seal(keystores["mgms"], samples["Offer"], mode=SecurityMode.SIGNED)
    exc = await rejected(opener(keystores), data)
    assert exc.reason is Reason.MALFORMED and "requires encryption" in str(exc)


@pytest.mark.parametrize("changes", [{"enc_alg": "X25519-HKDF-SHA256-A128GCM"}, {"sig_alg": "RSA"}, {"version": "0"}])
async def test_rule_unknown_algorithm_or_version_is_unsupported(
    changes: dict[str, str], samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    data = seal(keystores["mgms"], samples["Offer"])
    exc = await rejected(opener(keystores), edit(data, **changes))
    assert exc.reason is Reason.UNSUPPORTED_VERSION


async def test_rule_each_rejection_is_counted_under_a_distinct_reason(
    samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    counter = RejectionCounter()
    op = Opener(keystores["ams"], MemoryNonceStore(), counter=counter, clock=clock_at(NOW))
    mgms, eve = keystores["mgms"], keystores["eve"].own
    forger = Keystore(PrivateIdentity("mgms", eve.sign_key, eve.decrypt_key), [keystores["ams"].own.public])
    good = seal(mgms, samples["Bid"])
    await op.open(good)
    cases = {
        Reason.BAD_SIGNATURE: seal(forger, samples["Bid"]),
        Reason.UNKNOWN_SENDER: seal(keystores["eve"], samples["Bid"]),
        Reason.TAMPERED: edit(good, topic="x/y"),
        Reason.REPLAYED: good,
        Reason.EXPIRED: seal(mgms, samples["Bid"], created=NOW - timedelta(hours=1)),
        Reason.WRONG_RECIPIENT: seal(keystores["ams"], samples["Bid"], recipient="mgms"),
        Reason.MALFORMED: b"{",
        Reason.UNSUPPORTED_VERSION: edit(good, version="9"),
    }
    for reason, data in cases.items():
        assert (await rejected(op, data)).reason is reason
    assert counter.snapshot() == {r.value: 1 for r in Reason}
    assert len({r.value for r in Reason}) == len(Reason)


def test_rule_sealer_signs_only_as_its_own_participant(
    samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    env = Envelope.create(samples["Bid"], sender="ams", recipient="mgms", topic="t")
    with pytest.raises(ValueError, match="not this keystore"):
        Sealer(keystores["mgms"]).seal(env)
    env = Envelope.create(samples["Bid"], sender="mgms", recipient="nobody", topic="t")
    with pytest.raises(LookupError, match="no public key for recipient"):
        Sealer(keystores["mgms"]).seal(env)


# --- nonce stores --------------------------------------------------------------------------


async def test_memory_nonce_store_forgets_after_ttl_and_stays_bounded() -> None:
    now = [0.0]
    store = MemoryNonceStore(max_entries=2, clock=lambda: now[0])
    assert await store.claim("a", 10) and not await store.claim("a", 10)
    assert await store.claim("b", 10)
    with pytest.raises(StoreError, match="full"):  # refuse to judge rather than forget a live id
        await store.claim("c", 10)
    now[0] = 11.0
    assert await store.claim("a", 10) and len(store) == 1


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    with RedisServer(appendonly=False) as server:
        client = aioredis.Redis.from_url(server.client_url())
        try:
            yield client
        finally:
            await client.aclose()


async def test_redis_nonce_store_claims_once_with_expiry(
    redis_client: aioredis.Redis, samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    store = RedisNonceStore(redis_client, prefix="t:")
    assert await store.claim("urn:uuid:1", 12.3)
    assert not await store.claim("urn:uuid:1", 12.3)
    assert 0 < await redis_client.ttl("t:urn:uuid:1") <= 13
    # Two workers sharing the store: the same message is accepted by one of them only.
    workers = [Opener(keystores["ams"], RedisNonceStore(redis_client), clock=clock_at(NOW)) for _ in range(2)]
    data = seal(keystores["mgms"], samples["Bid"])
    await workers[0].open(data)
    assert (await rejected(workers[1], data)).reason is Reason.REPLAYED


async def test_rule_unreachable_nonce_store_is_retryable_not_a_rejection(
    samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    class DownRedis:
        """Stands in for a Redis whose connection is gone (the store takes its client injected)."""

        async def set(self, *args: object, **kwargs: object) -> bool:
            raise RedisConnectionError("Connection refused")

    op = Opener(keystores["ams"], RedisNonceStore(DownRedis()), clock=clock_at(NOW))  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="nonce store: Connection refused") as info:
        await op.open(seal(keystores["mgms"], samples["Bid"]))
    assert info.value.retryable and op.counter.total == 0


async def test_rule_a_worker_never_crashes_on_mutated_sealed_input(
    samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    """Random byte edits of a sealed message: open() accepts it or raises MessageRejected, nothing else."""
    rng = random.Random(7)
    base = seal(keystores["mgms"], samples["OfferList"])
    op = opener(keystores)
    for _ in range(300):
        data = bytearray(base)
        i = rng.randrange(len(data))
        data[i : i + rng.randint(0, 3)] = bytes(rng.randrange(32, 127) for _ in range(rng.randint(0, 3)))
        with contextlib.suppress(MessageRejected):
            await op.open(bytes(data))
    assert op.counter.total >= 290


# --- keys ----------------------------------------------------------------------------------


def test_key_pair_files_private_is_0600_and_loads_back(tmp_path: Path) -> None:
    ident = write_key_pair("lab-1", tmp_path)
    assert stat.S_IMODE((tmp_path / "lab-1.key").stat().st_mode) == 0o600
    assert load_public_identity(tmp_path / "lab-1.pub").to_json() == ident.public.to_json()
    assert load_private_identity(tmp_path / "lab-1.key").to_json() == ident.to_json()
    with pytest.raises(FileExistsError):
        write_key_pair("lab-1", tmp_path)
    os.chmod(tmp_path / "lab-1.key", 0o644)
    again = write_key_pair("lab-1", tmp_path, overwrite=True)
    assert stat.S_IMODE((tmp_path / "lab-1.key").stat().st_mode) == 0o600
    assert again.public.to_json() != ident.public.to_json()


def test_rule_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    write_key_pair("lab-1", tmp_path)
    os.chmod(tmp_path / "lab-1.key", 0o640)
    with pytest.raises(ConfigError, match="accessible by others"):
        load_private_identity(tmp_path / "lab-1.key")


def test_key_file_errors_name_the_file(tmp_path: Path) -> None:
    write_key_pair("lab-1", tmp_path)
    os.chmod(tmp_path / "lab-1.pub", 0o600)
    with pytest.raises(ConfigError, match="expected a private key file"):
        load_private_identity(tmp_path / "lab-1.pub")
    (tmp_path / "bad.pub").write_text('{"format": "mgms-key-v1", "kind": "public", "participant": "x"}')
    with pytest.raises(ConfigError, match=r"bad\.pub: ed25519: Field required"):
        load_public_identity(tmp_path / "bad.pub")
    with pytest.raises(ValueError, match="participant name"):
        write_key_pair("../evil", tmp_path)


def test_mgms_keys_command_creates_a_pair_and_prints_the_public_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mgms_main(["keys", "ams", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["kind"] == "public" and out == (tmp_path / "ams.pub").read_text()
    assert stat.S_IMODE((tmp_path / "ams.key").stat().st_mode) == 0o600
    assert mgms_main(["keys", "ams", "--out-dir", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
    assert mgms_main(["keys", "ams", "--out-dir", str(tmp_path), "--force"]) == 0
