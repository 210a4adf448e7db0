"""The audit trail on a real redis-server: chain, checkpoints, tampering found, export, outage."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.audit import (
    GENESIS,
    AuditEntry,
    AuditKind,
    AuditLog,
    audit_key,
    entry_digest,
    parse_since,
    read_export,
    read_stream,
    render,
    verify,
)
from gateway.semantic.security import PrivateIdentity
from gateway.services import RedisServer

pytestmark = pytest.mark.timeout(60)

PREFIX = "mgms:testlab"
KEY = audit_key(PREFIX)
SIM_CONFIG = Path(__file__).resolve().parents[1] / "lab_configs" / "multipower-sim.yaml"


@pytest.fixture(scope="module")
def identity() -> PrivateIdentity:
    return PrivateIdentity.generate("mgms-testlab")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_server.client_url())
    try:
        yield c
    finally:
        await c.aclose()


async def _filled(client: aioredis.Redis, identity: PrivateIdentity, n: int = 20) -> list[AuditEntry]:
    """n command records with a checkpoint every 8 and at close, read back from the stream."""
    audit = AuditLog(client, prefix=PREFIX, identity=identity, checkpoint_every=8)
    await audit.start()
    for i in range(n):
        audit.record(AuditKind.COMMAND_REQUEST, "alice", request_id=f"r{i}", point="feeder.breaker.command")
        await asyncio.sleep(0)
    await audit.close()
    return await read_stream(client, KEY)


async def test_entries_form_one_verified_chain_with_signed_checkpoints(
    client: aioredis.Redis, identity: PrivateIdentity
) -> None:
    entries = await _filled(client, identity)
    assert [e.seq for e in entries] == list(range(len(entries)))
    assert entries[0].prev == GENESIS
    assert all(b.prev == a.digest for a, b in itertools.pairwise(entries))
    checkpoints = [e for e in entries if e.kind == "checkpoint"]
    assert len(checkpoints) >= 3  # 20 records, every 8, and at close
    assert entries[-1].kind == "checkpoint"
    assert len([e for e in entries if e.kind == "command.request"]) == 20
    rep = verify(entries, identity.public)
    assert rep.ok, rep.problems
    assert rep.checkpoints_ok == len(checkpoints)
    assert rep.unsigned_tail == 0


async def test_a_restarted_writer_continues_the_same_chain(client: aioredis.Redis, identity: PrivateIdentity) -> None:
    await _filled(client, identity, 5)
    entries = await _filled(client, identity, 5)
    assert [e.seq for e in entries] == list(range(len(entries)))
    assert verify(entries, identity.public).ok


async def test_concurrent_appends_stay_one_chain(client: aioredis.Redis, identity: PrivateIdentity) -> None:
    """Two writers on one stream (two processes' worth), many coroutines each: one linear chain."""
    logs = [AuditLog(client, prefix=PREFIX, identity=identity, checkpoint_every=50, batch_max=16) for _ in range(2)]
    for a in logs:
        await a.start()

    async def burst(a: AuditLog, who: str) -> None:
        for i in range(50):
            a.record(AuditKind.COMMAND_OUTCOME, who, n=i)
            if i % 7 == 0:
                await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        for k in range(8):
            tg.create_task(burst(logs[k % 2], f"op{k}"))
    for a in logs:
        await a.close()
    entries = await read_stream(client, KEY)
    outcomes = [e for e in entries if e.kind == "command.outcome"]
    assert len(outcomes) == 400
    assert [e.seq for e in entries] == list(range(len(entries)))
    rep = verify(entries, identity.public)
    assert rep.ok, rep.problems


# --- tampering with an exported copy --------------------------------------------------------


async def test_a_deleted_entry_is_named(client: aioredis.Redis, identity: PrivateIdentity) -> None:
    entries = await _filled(client, identity)
    gone = entries.pop(5)
    rep = verify(entries, identity.public)
    assert [(p.what, p.seq) for p in rep.problems] == [("deleted", gone.seq + 1)]
    assert f"seq {gone.seq} missing" in str(rep.problems[0])
    assert entries[5].id in str(rep.problems[0])


async def test_two_swapped_entries_are_named(client: aioredis.Redis, identity: PrivateIdentity) -> None:
    entries = await _filled(client, identity)
    entries[6], entries[7] = entries[7], entries[6]
    rep = verify(entries, identity.public)
    assert [(p.what, p.index, p.seq) for p in rep.problems] == [("reordered", 7, 6)]
    assert "seq 6 comes after seq 7" in str(rep.problems[0])


async def test_an_edited_field_is_named(client: aioredis.Redis, identity: PrivateIdentity) -> None:
    entries = await _filled(client, identity)
    entries[3] = dataclasses.replace(entries[3], actor="mallory")
    rep = verify(entries, identity.public)
    assert [(p.what, p.index, p.seq, p.id) for p in rep.problems] == [("changed", 3, 3, entries[3].id)]


async def test_an_edit_with_its_digest_recomputed_breaks_the_chain_there(
    client: aioredis.Redis, identity: PrivateIdentity
) -> None:
    entries = await _filled(client, identity)
    forged = dataclasses.replace(entries[3], data={**entries[3].data, "point": "other.breaker"})
    entries[3] = dataclasses.replace(forged, digest=entry_digest(forged.content()))
    rep = verify(entries, identity.public)
    assert [(p.what, p.seq) for p in rep.problems] == [("chain", 4)]
    assert "seq 3" in rep.problems[0].detail


async def test_a_forged_checkpoint_signature_is_found(client: aioredis.Redis, identity: PrivateIdentity) -> None:
    entries = await _filled(client, identity)
    i = next(i for i, e in enumerate(entries) if e.kind == "checkpoint")
    cp = entries[i]
    # a whole forged history, re-signed with another key and every digest recomputed
    other = PrivateIdentity.generate(identity.participant)
    from gateway.audit import _checkpoint_input
    from gateway.semantic.security import b64encode

    sig = b64encode(other.sign_key.sign(_checkpoint_input(cp.actor, cp.seq - 1, cp.prev)))
    forged = dataclasses.replace(cp, data={**cp.data, "sig": sig})
    entries[i] = dataclasses.replace(forged, digest=entry_digest(forged.content()))
    rep = verify(entries, identity.public)
    kinds = [(p.what, p.seq) for p in rep.problems]
    assert ("signature", cp.seq) in kinds
    assert "does not verify" in str(next(p for p in rep.problems if p.what == "signature"))
    # and with the wrong public key every checkpoint fails
    assert all(p.what == "signature" for p in verify(await read_stream(client, KEY), other.public).problems)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_export_round_trips(client: aioredis.Redis, identity: PrivateIdentity, tmp_path: Path, fmt: str) -> None:
    entries = await _filled(client, identity)
    f = tmp_path / f"audit.{fmt}"
    f.write_text(render(entries, fmt))  # type: ignore[arg-type]
    back = read_export(f)
    assert back == entries
    assert verify(back, identity.public).ok
    lines = f.read_text().splitlines()
    if fmt == "jsonl":  # the same edit in the file is found
        doc = json.loads(lines[2])
        doc["data"]["point"] = "x"
        lines[2] = json.dumps(doc)
        f.write_text("\n".join(lines) + "\n")
        assert [(p.what, p.index) for p in verify(read_export(f), identity.public).problems] == [("changed", 2)]


async def test_export_since_starts_later_and_still_verifies(client: aioredis.Redis, identity: PrivateIdentity) -> None:
    await _filled(client, identity, 4)
    await asyncio.sleep(0.01)
    cut = time.time()
    await asyncio.sleep(0.01)
    await _filled(client, identity, 4)
    later = await read_stream(client, KEY, since=cut)
    assert later and later[0].seq > 0
    rep = verify(later, identity.public)
    assert rep.ok and any("starts at seq" in n for n in rep.notes)
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


async def test_redis_outage_buffers_bounded_and_records_the_loss(
    redis_server: RedisServer, identity: PrivateIdentity
) -> None:
    c = aioredis.Redis.from_url(redis_server.client_url())
    try:
        audit = AuditLog(c, prefix=PREFIX, identity=identity, buffer_max=50)
        await audit.start()
        audit.record(AuditKind.CONFIG_LOAD, "mgms", file="lab.yaml")
        assert await audit.flush(5)
        await asyncio.to_thread(redis_server.stop)
        t0 = time.perf_counter()
        for i in range(200):
            audit.record(AuditKind.COMMAND_REQUEST, "bob", n=i)  # never blocks, never raises
        assert time.perf_counter() - t0 < 0.1
        await asyncio.sleep(0.2)
        assert audit.stats()["buffered"] <= 50 + audit.batch_max
        assert audit.counters["dropped"] >= 150
        await asyncio.to_thread(redis_server.start)
        assert await audit.flush(20)
        await audit.close()
        entries = await read_stream(c, KEY)
    finally:
        await c.aclose()
    lost = [e for e in entries if e.kind == "audit.lost"]
    assert len(lost) == 1 and lost[0].data["records"] == audit.counters["dropped"]
    assert verify(entries, identity.public).ok
    kept = [e.data["n"] for e in entries if e.kind == "command.request"]
    assert kept == sorted(kept) and kept[-1] == 199  # the newest kept, the oldest dropped


# --- the CLI: mgms audit export / verify ----------------------------------------------------


async def test_mgms_audit_export_and_verify(
    redis_server: RedisServer, client: aioredis.Redis, identity: PrivateIdentity, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from gateway.cli import main
    from gateway.config import load_config
    from gateway.store import StoreKeys

    sim = SIM_CONFIG
    prefix = StoreKeys.for_lab(load_config(sim)).prefix
    audit = AuditLog(client, prefix=prefix, identity=identity, checkpoint_every=4)
    await audit.start()
    for i in range(10):
        audit.record(AuditKind.COMMAND_REQUEST, "alice", request_id=f"r{i}")
    await audit.close()
    pub = tmp_path / "mgms.pub"
    pub.write_text(identity.public.to_json())
    from gateway.services import redis_secret_path

    secret = redis_secret_path(redis_server.secrets_dir, "auditor")  # the auditor may read P:audit only
    common = ["-c", str(sim), "--redis-url", redis_server.url, "--redis-user", "auditor"]
    common += ["--redis-secret-file", str(secret)]

    def run(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        return code, capsys.readouterr().out

    # main() runs its own event loop: in a thread, as a shell would run it beside this one
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"a.{fmt}"
        code, _ = await asyncio.to_thread(run, "audit", "export", *common, "--format", fmt, "-o", str(out))
        assert code == 0
        code, text = await asyncio.to_thread(run, "audit", "verify", str(out), "--public-key", str(pub))
        assert code == 0 and text.rstrip().endswith(": OK"), text
        assert "3 checkpoint(s) verified by mgms-testlab" in text
    code, text = await asyncio.to_thread(run, "audit", "verify", *common, "--public-key", str(pub))
    assert code == 0 and f"{prefix}:audit: 13 entries (seq 0..12)" in text, text

    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    del lines[4]
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines) + "\n")
    code, text = await asyncio.to_thread(run, "audit", "verify", str(cut), "--public-key", str(pub))
    assert code == 1
    assert "entry #4 (seq 5, id " in text and "deleted: seq 4 missing before it" in text, text
    assert await asyncio.to_thread(run, "audit", "verify", str(cut)) == (2, "")


@pytest.mark.timeout(60)
def test_the_audit_microbench_runs_short(tmp_path: Path) -> None:
    """bench/audit_record.py (docs/security.md's figures), a few hundred calls: it runs and its chain verifies."""
    import subprocess
    import sys

    out = tmp_path / "audit.json"
    r = subprocess.run(
        [sys.executable, "bench/audit_record.py", "--n", "500", "--commands", "50", "--json", str(out)],
        capture_output=True, text=True, timeout=50, cwd=SIM_CONFIG.parents[1],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["chain_verified"] == 1.0 and res["entries"] > 500 + 5 * 50
    assert res["record_us_median"] < 100  # a bound no machine misses: the figures are in docs/security.md
