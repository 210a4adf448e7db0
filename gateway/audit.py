"""A tamper-evident audit trail: hash-chained entries in one Redis stream, signed at intervals.

Why: the command log (``P:cmd:log``) says what happened, but anyone who can write to Redis
can rewrite it. The audit stream ``P:audit`` (``P`` = the participant's key prefix, as
:class:`gateway.store.StoreKeys` and :class:`gateway.messaging.MessagingKeys` use) makes a
rewrite *visible*:

* every entry carries its sequence number ``seq``, the SHA-256 ``digest`` of its own canonical
  content (:func:`gateway.semantic.envelope.canonical_json` of everything but the digest) and
  ``prev``, the digest of the entry before it (:data:`GENESIS` for the first). Deleting,
  reordering or editing an entry breaks the chain at that place, and :func:`verify` says which
  entry and what is wrong;
* every ``checkpoint_every`` entries or ``checkpoint_period_s`` seconds (and at
  :meth:`AuditLog.close`) a ``checkpoint`` entry carries an Ed25519 signature, by the
  participant's own messaging identity (the key :class:`gateway.semantic.security.Keystore`
  loads), over the head digest: someone who rewrites the chain and recomputes every digest
  still cannot make the signatures fit without the private key.

What is recorded (:class:`AuditKind`): each command's request (with the requester), the
authorisation decision, what was sent, the device's ACTCON, the outcome; each activation
(MGMS: received, finished; AMS: sent, settled); AMS registrations; every config load; and
``login`` / ``role.change``, which nothing emits yet (roles come later, issue 14 item 2): the
kinds are reserved so the record format does not change when they arrive.

Writing never blocks and never fails the caller: :meth:`AuditLog.record` appends to a bounded
in-process buffer; one writer task per process chains and stores batches. The store is one Lua
script that appends a batch only if the stream's head is still the digest the batch was chained
on (so two processes writing the same stream stay one linear chain: the loser re-chains on the
new head and tries again). While Redis is away the buffer holds up to ``buffer_max`` records;
beyond that the oldest are dropped and counted, and the next stored entry is an ``audit.lost``
entry saying how many, so the loss itself is in the trail.

Limits: a deletion of the newest entries after the last checkpoint leaves no gap to see; the
stream is only as durable as the Redis (the embedded one runs with AOF ``always``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import InvalidSignature
from redis.exceptions import RedisError

from gateway.semantic.envelope import canonical_json
from gateway.semantic.security import PrivateIdentity, PublicIdentity, b64decode, b64encode

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from gateway.commands import CommandOutcome
    from gateway.store import CommandRequestEntry

log = logging.getLogger(__name__)

__all__ = [
    "GENESIS",
    "AuditEntry",
    "AuditKind",
    "AuditLog",
    "AuditProblem",
    "VerifyReport",
    "audit_key",
    "entry_digest",
    "os_user",
    "parse_since",
    "read_export",
    "read_stream",
    "render",
    "verify",
]

GENESIS = "0" * 64
"""``prev`` of the first entry of a stream."""

_CHECKPOINT_DOMAIN = b"mgms-audit-checkpoint-v1\n"
"""Prefix of what a checkpoint signs: a signature made for a message can never pass as one."""

ExportFormat = Literal["jsonl", "csv"]
CSV_FIELDS = ("id", "seq", "ts", "kind", "actor", "prev", "digest", "data")


class AuditKind(StrEnum):
    """What an entry records. The values are the stored ``kind`` strings."""

    COMMAND_REQUEST = "command.request"
    COMMAND_DECISION = "command.decision"  # authorised / refused (invalid, read-only, ...), and why
    COMMAND_SENT = "command.sent"
    COMMAND_ACK = "command.ack"  # the device's ACTCON (positive or negative)
    COMMAND_OUTCOME = "command.outcome"
    ACTIVATION = "activation"  # data.phase: received / finished (MGMS), sent / settled (AMS)
    SETTLEMENT = "settlement"
    REGISTRATION = "registration"
    CONFIG_LOAD = "config.load"
    LOGIN = "login"  # reserved: an identity authenticated (not emitted yet)
    ROLE_CHANGE = "role.change"  # reserved: a role granted or revoked (not emitted yet)
    CHECKPOINT = "checkpoint"
    LOST = "audit.lost"  # records dropped from a full buffer (a long Redis outage)


def audit_key(prefix: str) -> str:
    """The audit stream of a participant whose keys start with ``prefix``."""
    return f"{prefix}:audit"


def entry_digest(content: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of an entry's canonical content (everything but ``digest`` and ``id``)."""
    return hashlib.sha256(canonical_json(content)).hexdigest()


def _checkpoint_input(signer: str, seq: int, digest: str) -> bytes:
    return _CHECKPOINT_DOMAIN + canonical_json({"digest": digest, "seq": seq, "signer": signer})


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One stored entry. ``id`` is the Redis stream id (not part of the digest: Redis makes it)."""

    seq: int
    ts: str
    kind: str
    actor: str
    data: Mapping[str, Any]
    prev: str
    digest: str
    id: str = ""

    def content(self) -> dict[str, Any]:
        """What the digest covers."""
        return {
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "actor": self.actor,
            "data": dict(self.data),
            "prev": self.prev,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **self.content(), "digest": self.digest}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditEntry:
        """From an exported line or a stream entry; a missing or mistyped field is a ValueError."""
        try:
            data = d["data"]
            if not isinstance(data, Mapping):
                raise ValueError("data is not an object")
            return cls(
                seq=int(d["seq"]),
                ts=str(d["ts"]),
                kind=str(d["kind"]),
                actor=str(d["actor"]),
                data=data,
                prev=str(d["prev"]),
                digest=str(d["digest"]),
                id=str(d.get("id", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an audit entry: {exc!r}") from exc


# --- Writing -------------------------------------------------------------------------------

# KEYS[1] the stream. ARGV[1] the head digest the batch was chained on, then (seq, digest,
# entry JSON) per entry. Appends all, or none and returns the real head: one linear chain even
# with several writers, in one round trip per batch.
_APPEND_LUA = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  local f = last[1][2]
  local d, n = nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'd' then d = f[i + 1] elseif f[i] == 'n' then n = f[i + 1] end
  end
  if d ~= ARGV[1] then return {0, d or '', n or '-1'} end
elseif ARGV[1] ~= '__GENESIS__' then
  return {0, '__GENESIS__', '-1'}
end
local ids = {}
for i = 2, #ARGV, 3 do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'n', ARGV[i], 'd', ARGV[i + 1], 'e', ARGV[i + 2])
end
return {1, ids}
""".replace("__GENESIS__", GENESIS)


@dataclass(frozen=True, slots=True)
class _Record:
    ts: str
    kind: str
    actor: str
    data: Mapping[str, Any]


_CHECKPOINT_MARK = _Record("", AuditKind.CHECKPOINT.value, "", {})


def os_user() -> str:
    """The account the process runs as (who started ``mgms run``)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid:{os.getuid()}"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")


def _jsonable(value: Any) -> Any:
    """Data as JSON can hold it (canonical_json refuses NaN and unknown types)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


class AuditLog:
    """The audit stream of one participant, written by one background task.

    ``identity`` signs the checkpoints (None: hash chain only, no signatures; ``verify`` says
    so). ``start()`` before recording takes effect; ``close()`` writes a last checkpoint and
    flushes (bounded by ``close_timeout_s``).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        identity: PrivateIdentity | None = None,
        checkpoint_every: int = 256,
        checkpoint_period_s: float = 60.0,
        buffer_max: int = 10_000,
        batch_max: int = 256,
        linger_s: float = 0.05,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.key = audit_key(prefix)
        self.identity = identity
        self.checkpoint_every = checkpoint_every
        self.checkpoint_period_s = checkpoint_period_s
        self.buffer_max = buffer_max
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.close_timeout_s = close_timeout_s
        self._buffer: collections.deque[_Record] = collections.deque()
        self._pending: list[_Record] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._head: tuple[int, str] | None = None  # (seq, digest) of the stream's last entry
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._lost_reported = 0
        self._script: Any = None
        self.counters: dict[str, int] = {"recorded": 0, "stored": 0, "dropped": 0, "checkpoints": 0, "retries": 0}

    # -------------------------------------------------------------- the callers' side

    def record(self, kind: AuditKind, actor: str = "", **data: Any) -> None:
        """Queue one entry: constant time, never blocks, never raises (a full buffer drops
        its oldest record, counted in ``dropped`` and reported in the chain later)."""
        try:
            rec = _Record(_iso(time.time()), kind.value, actor, _jsonable(data))
        except Exception:  # audit must not break the command path
            log.exception("audit record %s not built", kind)
            return
        if len(self._buffer) >= self.buffer_max:
            self._buffer.popleft()
            self.counters["dropped"] += 1
        self._buffer.append(rec)
        self.counters["recorded"] += 1
        self._wake.set()

    def checkpoint(self) -> None:
        """Ask for a signed checkpoint with the next write (no-op without an identity)."""
        if self.identity is not None:
            self._buffer.append(_CHECKPOINT_MARK)
            self._wake.set()

    # -------------------------------------------------------------- the command path
    # One call per step of Gateway.execute, so the hooks there stay one line each.

    def command_request(self, outcome: CommandOutcome, *, via: str) -> None:
        """A command asked for (``via``: ``stream`` for the Redis request stream, ``internal``
        for the gateway's own, e.g. an activation step); ``actor`` is who asked."""
        self.record(
            AuditKind.COMMAND_REQUEST,
            outcome.requested_by,
            request_id=outcome.request_id,
            point=outcome.point,
            value=outcome.value,
            via=via,
        )

    def request_refused(self, request: CommandRequestEntry, result: str, reason: str) -> None:
        """A stream request the store refused before execution (malformed, expired)."""
        self.record(
            AuditKind.COMMAND_REQUEST,
            request.requested_by,
            request_id=request.request_id,
            point=request.point,
            value=request.value,
            via="stream",
            stream_id=request.stream_id,
        )
        self.record(
            AuditKind.COMMAND_DECISION,
            request.requested_by,
            request_id=request.request_id,
            point=request.point,
            decision="refused",
            reason=f"{result}: {reason}",
        )

    def command_decision(
        self, outcome: CommandOutcome, decision: Literal["authorised", "refused"], reason: str
    ) -> None:
        self.record(
            AuditKind.COMMAND_DECISION,
            outcome.requested_by,
            request_id=outcome.request_id,
            point=outcome.point,
            decision=decision,
            reason=reason,
        )

    def command_sent(self, outcome: CommandOutcome) -> None:
        """What goes to the device (the engineering value; the adapter converts it to raw)."""
        self.record(
            AuditKind.COMMAND_SENT,
            outcome.requested_by,
            request_id=outcome.request_id,
            point=outcome.point,
            value=outcome.value,
            sent_ts=outcome.sent_ts,
        )

    def command_end(self, outcome: CommandOutcome) -> None:
        """The device's answer (if it was sent) and the outcome, as the command log has them."""
        if outcome.sent_ts is not None:
            if outcome.ack_ts is not None:
                ack = "positive"
            elif outcome.result == "rejected":
                ack = "negative"
            else:
                ack = "none"
            self.record(
                AuditKind.COMMAND_ACK,
                outcome.requested_by,
                request_id=outcome.request_id,
                point=outcome.point,
                actcon=ack,
                ack_ts=outcome.ack_ts,
                reason=outcome.reason if ack == "negative" else "",
            )
        self.record(
            AuditKind.COMMAND_OUTCOME,
            outcome.requested_by,
            request_id=outcome.request_id,
            point=outcome.point,
            value=outcome.value,
            result=outcome.result,
            reason=outcome.reason,
            requested_ts=outcome.requested_ts,
            sent_ts=outcome.sent_ts,
            ack_ts=outcome.ack_ts,
            confirm_ts=outcome.confirm_ts,
        )

    def config_load(self, source: str | Path | None, *, who: str, **data: Any) -> None:
        """A process loaded its config: the file, its SHA-256 (a later edit shows) and who ran it."""
        digest = ""
        if source:
            with contextlib.suppress(OSError):
                digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        self.record(AuditKind.CONFIG_LOAD, os_user(), program=who, file=str(source or ""), sha256=digest, **data)

    # -------------------------------------------------------------- life cycle

    async def start(self) -> None:
        if self._task is None:
            self._script = self.redis.register_script(_APPEND_LUA)
            self._task = asyncio.create_task(self._writer(), name=f"audit:{self.key}")

    async def close(self) -> None:
        """Last checkpoint, then flush what is buffered (bounded); then the writer ends."""
        if self._task is None:
            return
        if self._since_checkpoint or self._buffer or self._pending:
            self.checkpoint()
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(self.close_timeout_s):
                await asyncio.shield(self._task)
        except TimeoutError:
            left = len(self._buffer) + len(self._pending)
            log.error("audit: %d record(s) not stored at close (Redis unreachable)", left)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (bounded) until everything recorded so far is stored; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._buffer or self._pending:
            if time.monotonic() > deadline or self._task is None or self._task.done():
                return False
            self._wake.set()
            await asyncio.sleep(0.005)
        return True

    def stats(self) -> dict[str, int]:
        return {**self.counters, "buffered": len(self._buffer) + len(self._pending)}

    # -------------------------------------------------------------- the writer

    async def _writer(self) -> None:
        backoff_s = 0.05
        while True:
            if not self._buffer and not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                timeout = self.checkpoint_period_s if self.identity is not None else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                if not self._buffer and not self._pending and self._since_checkpoint and not self._closing:
                    self.checkpoint()  # the period passed with entries not yet signed
                await self._linger()
                continue
            try:
                await self._store_batch()
                backoff_s = 0.05
            except RedisError as exc:
                self.counters["retries"] += 1
                if backoff_s == 0.05:
                    log.warning("audit: Redis unreachable (%s); buffering", exc)
                if self._closing and self.close_timeout_s <= 0:
                    return
                await asyncio.sleep(backoff_s)
                backoff_s = min(2.0, backoff_s * 2)

    async def _linger(self) -> None:
        """Let a command's records gather before writing them: one append (one fsync with
        ``appendfsync always``) per command instead of one per step. Each append delays every
        other client's reply in that Redis round by the fsync (~1-2 ms here), the command's own
        intent and log writes included; lingering makes that collision rare. Not when closing
        or when a batch is full."""
        if self.linger_s <= 0:
            return
        deadline = time.monotonic() + self.linger_s
        while not self._closing and len(self._buffer) < self.batch_max and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wake.wait()

    def _take_batch(self) -> None:
        lost = self.counters["dropped"] - self._lost_reported
        if lost and not self._pending:
            self._pending.append(_Record(_iso(time.time()), AuditKind.LOST.value, "", {"records": lost}))
            self._lost_reported += lost
        while self._buffer and len(self._pending) < self.batch_max:
            self._pending.append(self._buffer.popleft())

    async def _load_head(self) -> tuple[int, str]:
        last: Any = await self.redis.xrevrange(self.key, count=1)
        if not last:
            return (-1, GENESIS)
        fields = last[0][1]
        n, d = fields.get(b"n", fields.get("n")), fields.get(b"d", fields.get("d"))
        return (int(n), d.decode() if isinstance(d, bytes) else str(d))

    async def _store_batch(self) -> None:
        self._take_batch()
        if self._head is None:
            self._head = await self._load_head()
        for _attempt in range(8):  # another writer moved the head: re-chain on it
            head = self._head
            entries, since, signed = self._chain(head)
            if not entries:  # only a checkpoint asked for, with nothing new to sign
                self._pending.clear()
                return
            args: list[str | int] = [head[1]]
            for e in entries:
                args += [e.seq, e.digest, json.dumps(e.content(), separators=(",", ":"), ensure_ascii=False)]
            res = await self._script(keys=[self.key], args=args)
            if int(res[0]) == 1:
                self._head = (entries[-1].seq, entries[-1].digest)
                self.counters["stored"] += len(entries)
                self.counters["checkpoints"] += signed
                self._since_checkpoint = since
                if signed:
                    self._last_checkpoint = time.monotonic()
                self._pending.clear()
                return
            d = res[1].decode() if isinstance(res[1], bytes) else str(res[1])
            self._head = (int(res[2]), d)
        raise _Contended(self.key)

    def _chain(self, head: tuple[int, str]) -> tuple[list[AuditEntry], int, int]:
        """The pending records as entries after ``head``; (entries, unsigned count, checkpoints).

        A checkpoint goes in wherever one was asked for and after every ``checkpoint_every``
        other entries, so the signed spacing does not depend on how records were batched.
        """
        seq, prev = head
        since, signed = self._since_checkpoint, 0
        out: list[AuditEntry] = []

        def add(rec: _Record) -> None:
            nonlocal seq, prev
            seq += 1
            content = {"seq": seq, "ts": rec.ts, "kind": rec.kind, "actor": rec.actor, "data": rec.data, "prev": prev}
            digest = entry_digest(content)
            out.append(AuditEntry(seq, rec.ts, rec.kind, rec.actor, rec.data, prev, digest))
            prev = digest

        for rec in self._pending:
            if rec is _CHECKPOINT_MARK:
                if since == 0 or self.identity is None:
                    continue  # nothing new to sign
                add(self._signed_checkpoint(seq, prev))
                since, signed = 0, signed + 1
                continue
            add(rec)
            since += 1
            if self.identity is not None and since >= self.checkpoint_every:
                add(self._signed_checkpoint(seq, prev))
                since, signed = 0, signed + 1
        return out, since, signed

    def _signed_checkpoint(self, seq: int, head: str) -> _Record:
        """A checkpoint record signing the entry ``seq`` whose digest is ``head``."""
        assert self.identity is not None
        signer = self.identity.participant
        sig = self.identity.sign_key.sign(_checkpoint_input(signer, seq, head))
        data = {"signer": signer, "signed_seq": seq, "signed_digest": head, "sig": b64encode(sig)}
        return _Record(_iso(time.time()), AuditKind.CHECKPOINT.value, signer, data)


class _Contended(RedisError):
    """Other writers kept moving the head: the writer backs off and tries again, as after an outage."""


# --- Reading, export -----------------------------------------------------------------------


def parse_since(text: str | None, *, now: float | None = None) -> float | None:
    """``--since``: an ISO time (``2026-12-08T01:00``, UTC unless it says), or an age
    (``90s``, ``15m``, ``2h``, ``7d``); None: from the start. A ValueError names the form."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return (time.time() if now is None else now) - float(text[:-1]) * units[text[-1]]
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        hint = "give an ISO time (2026-12-08T01:00) or an age (90s, 15m, 2h, 7d)"
        raise ValueError(f"--since {text!r}: {hint}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


async def read_stream(
    redis: aioredis.Redis, key: str, *, since: float | None = None, page: int = 1000, max_entries: int = 10_000_000
) -> list[AuditEntry]:
    """The stream's entries from ``since`` (Unix time, by stream id) on, oldest first.

    An entry whose JSON cannot be read comes back with kind ``<unreadable>``, so that
    :func:`verify` reports it where it is instead of the export failing.
    """
    start = f"{int(since * 1000)}-0" if since is not None else "-"
    out: list[AuditEntry] = []
    while len(out) < max_entries:
        rows: Any = await redis.xrange(key, min=start, max="+", count=page)
        for sid, fields in rows:
            sid_s = sid.decode() if isinstance(sid, bytes) else str(sid)
            raw = fields.get(b"e", fields.get("e"))
            try:
                entry = AuditEntry.from_dict({**json.loads(raw), "digest": _text(fields.get(b"d", fields.get("d")))})
                out.append(dataclasses.replace(entry, id=sid_s))
            except (ValueError, TypeError):
                out.append(AuditEntry(-1, "", "<unreadable>", "", {"raw": _text(raw)}, "", "", sid_s))
        if len(rows) < page:
            break
        start = "(" + (rows[-1][0].decode() if isinstance(rows[-1][0], bytes) else str(rows[-1][0]))
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else "" if v is None else str(v)


def render(entries: Iterable[AuditEntry], fmt: ExportFormat) -> str:
    """The export file's text: one JSON object per line, or CSV with ``data`` as JSON."""
    if fmt == "jsonl":
        return "".join(json.dumps(e.to_dict(), ensure_ascii=False, sort_keys=True) + "\n" for e in entries)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for e in entries:
        w.writerow([e.id, e.seq, e.ts, e.kind, e.actor, e.prev, e.digest, json.dumps(dict(e.data), ensure_ascii=False)])
    return buf.getvalue()


def read_export(path: Path, fmt: ExportFormat | None = None) -> list[AuditEntry]:
    """An exported file back as entries (format from ``fmt`` or the suffix; jsonl otherwise).

    A line that is no entry is a ValueError naming the line.
    """
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    text = path.read_text(encoding="utf-8")
    out: list[AuditEntry] = []
    if fmt == "csv":
        rows = csv.DictReader(io.StringIO(text))
        for n, row in enumerate(rows, start=2):
            try:
                out.append(AuditEntry.from_dict({**row, "data": json.loads(row.get("data") or "")}))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
        return out
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(AuditEntry.from_dict(json.loads(line)))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: {exc}") from None
    return out


# --- Verification --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditProblem:
    """One thing wrong, and where: the entry's index in what was checked, its id and seq."""

    index: int
    id: str
    seq: int
    what: Literal["changed", "deleted", "reordered", "chain", "duplicate", "signature", "unreadable"]
    detail: str

    def __str__(self) -> str:
        where = f"entry #{self.index} (seq {self.seq}{', id ' + self.id if self.id else ''})"
        return f"{where}: {self.what}: {self.detail}"


@dataclass(slots=True)
class VerifyReport:
    entries: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints_ok: int = 0
    unsigned_tail: int = 0
    problems: list[AuditProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(entries: Sequence[AuditEntry], public: PublicIdentity | None = None) -> VerifyReport:
    """Check a run of entries (a whole stream, or an export that may start later).

    Order-independent checks, so each kind of tampering is named once where it is: each
    entry's digest against its content (``changed``); seq order in the file (``reordered``);
    gaps in the seq numbers (``deleted``); each ``prev`` against the stored digest of the
    entry one seq before (``chain``: an entry changed *and* its digest recomputed, or forged);
    each checkpoint's signature with ``public`` (``signature``).
    """
    rep = VerifyReport(entries=len(entries))
    if not entries:
        rep.notes.append("no entries")
        return rep
    by_seq: dict[int, int] = {}
    for i, e in enumerate(entries):
        if e.kind == "<unreadable>":
            rep.problems.append(AuditProblem(i, e.id, e.seq, "unreadable", f"stored entry is not JSON: {e.data}"))
            continue
        if entry_digest(e.content()) != e.digest:
            rep.problems.append(AuditProblem(i, e.id, e.seq, "changed", "content does not match its digest"))
        if e.seq in by_seq:
            j = by_seq[e.seq]
            rep.problems.append(AuditProblem(i, e.id, e.seq, "duplicate", f"seq {e.seq} is also entry #{j}"))
        else:
            by_seq[e.seq] = i
    readable = [(i, e) for i, e in enumerate(entries) if e.kind != "<unreadable>"]
    for (_, x), (i, y) in itertools.pairwise(readable):
        if y.seq < x.seq:
            rep.problems.append(AuditProblem(i, y.id, y.seq, "reordered", f"seq {y.seq} comes after seq {x.seq}"))
    seqs = sorted(by_seq)
    rep.first_seq, rep.last_seq = seqs[0], seqs[-1]
    for a, b in itertools.pairwise(seqs):
        if b > a + 1:
            gap = entries[by_seq[b]]
            missing = f"seq {a + 1}" if b == a + 2 else f"seq {a + 1}..{b - 1}"
            rep.problems.append(AuditProblem(by_seq[b], gap.id, b, "deleted", f"{missing} missing before it"))
    for s in seqs:
        e = entries[by_seq[s]]
        if s == 0 and e.prev != GENESIS:
            rep.problems.append(AuditProblem(by_seq[s], e.id, s, "chain", "first entry does not start the chain"))
        before = by_seq.get(s - 1)
        if before is not None and e.prev != entries[before].digest:
            rep.problems.append(
                AuditProblem(
                    by_seq[s],
                    e.id,
                    s,
                    "chain",
                    f"prev does not match the digest of seq {s - 1} (entry #{before}): "
                    "one of them was changed and its digest recomputed",
                )
            )
    if seqs[0] != 0:
        rep.notes.append(f"starts at seq {seqs[0]} (an export --since): its link to earlier entries is not checked")
    last_cp: int | None = None
    for s in seqs:
        e = entries[by_seq[s]]
        if e.kind != AuditKind.CHECKPOINT.value:
            continue
        problem = _check_checkpoint(e, public)
        if problem is None:
            rep.checkpoints_ok += 1
            last_cp = s
        elif problem:
            rep.problems.append(AuditProblem(by_seq[s], e.id, s, "signature", problem))
    if public is None:
        rep.notes.append("checkpoint signatures not checked: no public key")
    elif last_cp is None:
        rep.notes.append("no valid signed checkpoint in these entries")
    rep.unsigned_tail = seqs[-1] - last_cp if last_cp is not None else len(seqs)
    return rep


def _check_checkpoint(e: AuditEntry, public: PublicIdentity | None) -> str | None:
    """None: good; '' : not checkable (no key); else what is wrong."""
    d = e.data
    try:
        signer, sseq, sdig, sig = str(d["signer"]), int(d["signed_seq"]), str(d["signed_digest"]), str(d["sig"])
    except (KeyError, TypeError, ValueError):
        return "checkpoint lacks signer/signed_seq/signed_digest/sig"
    if sseq != e.seq - 1 or sdig != e.prev:
        return "checkpoint signs another head than the entry before it"
    if public is None:
        return ""
    if signer != public.participant:
        return f"signed by {signer!r}, the key given is {public.participant!r}'s"
    try:
        public.verify_key.verify(b64decode(sig, length=64), _checkpoint_input(signer, sseq, sdig))
    except (InvalidSignature, ValueError):
        return f"signature by {signer!r} does not verify"
    return None
