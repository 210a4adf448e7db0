"""Live state in Redis: latest values, history, change feed, link states, command log.

Why it is shaped like this:

* Values arrive on the event loop at field rate, and a slow or absent Redis must never stall
  the field side. So :meth:`RedisStore.put` only appends to a bounded in-memory buffer and a
  single writer task drains it in batches, one pipelined round trip per batch. When Redis
  is away the batch stays at the head of the buffer and is written once Redis is back; only
  when the buffer overflows are the oldest updates dropped (and counted).
* Everything an operator might want to look at is plain Redis data (hashes and streams)
  under one prefix, so ``redis-cli`` is a sufficient viewer; ``docs/redis-keys.md`` lists
  the keys.
* Operator commands go through a stream with a consumer group and are acknowledged only
  after their outcome is logged, so a gateway that dies mid-command handles the request
  again on restart instead of forgetting it.
* Exactly once across a crash: before a command goes to the field its *intent* is written
  (and, with ``appendfsync always``, on disk) in ``P:cmd:intents``; the outcome removes it
  in the same MULTI as the log entry, the reply and the XACK. An intent found at start-up is
  a command cut by a crash: the core resolves it from the device's status and logs it, and
  never sends it again (``gateway.runtime``, docs/redis-keys.md).

Key layout (``P`` = ``{redis.key_prefix}:{lab.name}``), see :class:`StoreKeys`::

    P:point:{name}       HASH    latest value, quality, timestamps, cause, unit, device
    P:hist:{name}        STREAM  history of one point (MAXLEN ~ history_maxlen)
    P:changes            STREAM  change feed of all points (MAXLEN ~ changes_maxlen)
    P:device:{name}      HASH    link state, since, reason, reconnects
    P:cmd:requests       STREAM  operator command requests, consumer group "mgms"
    P:cmd:log            STREAM  one entry per finished command
    P:cmd:reply:{id}     LIST    the JSON outcome of one request (expires after 300 s)
    P:cmd:intents        HASH    request id -> JSON intent of a command on its way to the field
    P:cmd:done:{id}      STRING  the JSON outcome of a finished command (expires after a day)
    P:stats              HASH    counters
    P:meta               HASH    started_at, config, version, pid of the running gateway
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any, Protocol, Self, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from gateway import __version__
from gateway.config import LabConfig, Point
from gateway.errors import StoreError
from gateway.points import DoublePoint, PointUpdate, Quality, now

__all__ = [
    "COMMAND_GROUP",
    "DONE_TTL_S",
    "REPLY_TTL_S",
    "CommandIntent",
    "CommandOutcomeLike",
    "CommandRecord",
    "CommandRequestEntry",
    "CommandResult",
    "DeviceLink",
    "HistoryEntry",
    "RedisStore",
    "StoreKeys",
    "StoredValue",
    "encode_value",
]

log = logging.getLogger(__name__)
_INVALID = int(Quality.INVALID)

#: Consumer group that reads ``P:cmd:requests``.
COMMAND_GROUP = "mgms"
#: Seconds a command reply list lives, so a CLI that gave up does not leave it forever.
REPLY_TTL_S = 300
#: Seconds the outcome of a finished command stays readable by its request id
#: (``P:cmd:done:{id}``): what lets a caller that re-asks after a crash (a resumed activation)
#: get the outcome instead of a second execution.
DONE_TTL_S = 86_400
#: Default consumer name; one gateway per lab, so a stable name finds its own pending entries.
DEFAULT_CONSUMER = "gateway"

#: Errors after which Redis is assumed away for a while: back off and retry, never give up.
_TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)

#: Anything Redis-related a read or a one-off write may raise; turned into StoreError.
_ANY_REDIS: tuple[type[BaseException], ...] = (*_TRANSIENT, RedisError)

_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 5.0


def reraise_lost_cancel() -> None:
    """Re-raise a cancellation that redis-py swallowed.

    Seen with redis-py 8.1 on Python 3.11: a task cancelled while a command was answered
    with an error reply (XGROUP CREATE -> BUSYGROUP) gets the ResponseError instead of the
    CancelledError, and a loop around it then never ends. The task still counts the request
    in ``cancelling()``, so each loop here checks it once per round.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _backoff(attempt: int) -> float:
    """Capped exponential backoff with jitter, 0.1 s .. 5 s; jitter spreads reconnect storms."""
    cap = min(_BACKOFF_MAX_S, _BACKOFF_MIN_S * 2 ** max(0, attempt - 1))
    return random.uniform(max(_BACKOFF_MIN_S, cap / 2), cap)


# ---------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True, slots=True)
class StoreKeys:
    """Every key the gateway writes, in one place (the CLI and the docs use the same names)."""

    prefix: str

    @classmethod
    def for_lab(cls, config: LabConfig) -> StoreKeys:
        return cls(f"{config.redis.key_prefix}:{config.lab.name}")

    def point(self, name: str) -> str:
        return f"{self.prefix}:point:{name}"

    def hist(self, name: str) -> str:
        return f"{self.prefix}:hist:{name}"

    def device(self, name: str) -> str:
        return f"{self.prefix}:device:{name}"

    def cmd_reply(self, request_id: str) -> str:
        return f"{self.prefix}:cmd:reply:{request_id}"

    @property
    def changes(self) -> str:
        return f"{self.prefix}:changes"

    @property
    def cmd_requests(self) -> str:
        return f"{self.prefix}:cmd:requests"

    @property
    def cmd_log(self) -> str:
        return f"{self.prefix}:cmd:log"

    @property
    def cmd_intents(self) -> str:
        return f"{self.prefix}:cmd:intents"

    def cmd_done(self, request_id: str) -> str:
        return f"{self.prefix}:cmd:done:{request_id}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def meta(self) -> str:
        return f"{self.prefix}:meta"


# ---------------------------------------------------------------------------------------
# Encoding: Redis holds text; these keep numbers exact (repr) and None distinguishable ("").


def _bulk(s: str) -> bytes:
    """One RESP bulk string."""
    b = s.encode()
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _pack(*args: str) -> bytes:
    """One RESP command (array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def _flat(d: Mapping[str, str]) -> list[str]:
    return [x for kv in d.items() for x in kv]


def _xadd_prefix(key: str, maxlen: int, nargs: int, *fields: str) -> bytes:
    """The constant start of an ``XADD key MAXLEN ~ maxlen * <fields>...`` of nargs arguments."""
    head = ("XADD", key, "MAXLEN", "~", str(maxlen), "*", *fields)
    return b"*%d\r\n" % nargs + b"".join(_bulk(a) for a in head)


_B_Q = _bulk("q")
_B_SRC = _bulk("src")
_B_RCV = _bulk("rcv")
_B_ST = _bulk("st")
#: appended to a history/change entry whose ``src`` is the gateway's receive time, not the
#: device's time tag (PointUpdate.time_substituted); entries with the device's time go without
_B_SRC_FROM_RECEIVE = _bulk("src_from") + _bulk("receive")


def _recount(prefix: bytes, extra: int) -> bytes:
    """An XADD prefix (its ``*N`` header counts the arguments) for ``extra`` more arguments."""
    head = prefix.index(b"\r\n")
    return b"*%d" % (int(prefix[1:head]) + extra) + prefix[head:]


# With probes on an entry is ``v q src rcv st`` (10 arguments after the key part), without
# them ``v q src`` (6); the XADD prefixes carry the argument count, so it is fixed per store.
_XADD_HEAD = 6  # XADD key MAXLEN ~ n *
_ENTRY_ARGS_PROBED = 10
_ENTRY_ARGS_BARE = 6


def _tail_probed(v: str, q: int, u: PointUpdate, st_b: bytes) -> bytes:
    """The value-and-after part of a history/change entry, with the adapter and store hops."""
    return b"".join((
        _bulk(v), _B_Q, _bulk(str(q)), _B_SRC, _bulk(_enc_ts(u.source_time)),
        _B_RCV, _bulk(repr(u.receive_time)), _B_ST, st_b,
    ))  # fmt: skip


def _tail_bare(v: str, q: int, u: PointUpdate, st_b: bytes) -> bytes:
    """The same without the hops (probes off): value, quality and the device's own time tag."""
    return b"".join((_bulk(v), _B_Q, _bulk(str(q)), _B_SRC, _bulk(_enc_ts(u.source_time))))


def _stamp_now() -> tuple[bytes, dict[str, str]]:
    """The store hop of a batch: one clock read, as a bulk string and as the hash field."""
    st = repr(now())
    return _bulk(st), {"store_ts": st}


def _stamp_none() -> tuple[bytes, dict[str, str]]:
    """Probes off: no clock read, no field."""
    return b"", {}


def _fields(d: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    """redis-py's stubs want their own key type; the data is plain text either way."""
    return {k: v for k, v in d.items()}


def _s(x: Any) -> str:
    """Redis replies are bytes unless the client decodes; accept both."""
    return x.decode() if isinstance(x, bytes) else str(x)


def _enc_value(v: float | int | bool | None) -> str:
    """A value as the store writes it: "" for none, bools as 1/0, ints plain, floats by repr."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(int(v))  # int() strips IntEnum names
    return repr(float(v))


encode_value = _enc_value


def _enc_ts(t: float | None) -> str:
    return "" if t is None else repr(float(t))


def _source_from(u: PointUpdate) -> str:
    """Whose clock ``source_ts`` is: ``device`` (its time tag), ``receive`` (the value came
    untagged and the gateway's receive time stands in), empty without a source time."""
    if u.source_time is None:
        return ""
    return "receive" if u.time_substituted else "device"


def _dec_ts(s: str | None) -> float | None:
    return None if s is None or s == "" else float(s)


def _dec_value(s: str | None, kind: str) -> float | int | bool | None:
    if s is None or s == "":
        return None
    if kind == "single":
        return float(s) != 0
    if kind == "double":
        return int(float(s))
    return float(s)


def _numeric(v: float | int | bool | None) -> float | None:
    return None if v is None else float(v)


def _double_text(v: float | int | bool | None) -> str:
    if v is None or isinstance(v, bool):
        return ""
    try:
        return DoublePoint(int(v)).name.lower()
    except ValueError:
        return ""


def _flags(q: int) -> str:
    return ",".join(Quality(q).flags())


def _decode_fields(raw: Mapping[Any, Any] | Sequence[Any] | None) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return {_s(k): _s(v) for k, v in raw.items()}
    items = list(raw)
    return {_s(items[i]): _s(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def stream_entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """XREADGROUP/XRANGE replies differ between RESP2 (lists) and RESP3 (maps); flatten them."""
    if not reply:
        return []
    if isinstance(reply, Mapping):  # RESP3 XREAD: {stream: [entries]}
        reply = [[k, v] for k, v in reply.items()]
    out: list[tuple[str, dict[str, str]]] = []
    first = reply[0]
    if isinstance(first, list | tuple) and len(first) == 2 and isinstance(first[1], list):
        # [[stream, [(id, fields), ...]], ...]
        for _stream, entries in reply:
            for sid, raw in entries:
                out.append((_s(sid), _decode_fields(raw) if raw is not None else {}))
        return out
    for sid, raw in reply:  # XRANGE: [(id, fields), ...]
        out.append((_s(sid), _decode_fields(raw) if raw is not None else {}))
    return out


def _stream_ts(stream_id: str) -> float:
    """A stream id starts with the Redis clock in ms: when the entry was added."""
    return int(stream_id.split("-", 1)[0]) / 1000.0


# ---------------------------------------------------------------------------------------
# What comes back


@dataclass(frozen=True, slots=True)
class StoredValue:
    """The latest value of one point as held in ``P:point:{name}``.

    ``recv_ts`` (the adapter got it) is written with probes on or off, since ``mgms watch``
    shows a value's age from it; ``store_ts`` is a probe hop only and reads 0.0 when the
    gateway ran with probes off.
    """

    point: str
    value: float | int | bool | None
    quality: Quality
    source_ts: float | None
    recv_ts: float
    store_ts: float
    cause: str
    unit: str
    device: str
    quantity: str = ""
    text: str | None = None  # double points: off / on / intermediate / indeterminate
    #: whose time ``source_ts`` is: "device", "receive" (value came untagged), "" (none)
    source_ts_from: str = ""

    @property
    def flags(self) -> list[str]:
        return self.quality.flags()

    @property
    def time_substituted(self) -> bool:
        """``source_ts`` is the gateway's receive time: the device sent no time tag."""
        return self.source_ts_from == "receive"

    @classmethod
    def from_hash(cls, point: str, h: Mapping[str, str], kind: str) -> StoredValue:
        return cls(
            point=point,
            value=_dec_value(h.get("value"), kind),
            quality=Quality(int(h.get("quality", "0"))),
            source_ts=_dec_ts(h.get("source_ts")),
            recv_ts=float(h.get("recv_ts", "0") or 0),
            store_ts=float(h.get("store_ts", "0") or 0),
            cause=h.get("cause", ""),
            unit=h.get("unit", ""),
            device=h.get("device", ""),
            quantity=h.get("quantity", ""),
            text=h.get("text"),
            source_ts_from=h.get("source_ts_from", ""),
        )


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One entry of ``P:hist:{name}`` or ``P:changes``; ``id`` is the stream id.

    ``recv_ts`` and ``store_ts`` are probe hops: 0.0 in entries written with probes off (the
    stream id still tells when Redis added the entry, to the millisecond).
    """

    id: str
    point: str
    value: float | int | bool | None
    quality: Quality
    source_ts: float | None
    recv_ts: float
    store_ts: float
    #: ``source_ts`` is the gateway's receive time (the value came untagged), not the device's
    time_substituted: bool = False

    @classmethod
    def from_fields(cls, sid: str, point: str, f: Mapping[str, str], kind: str) -> HistoryEntry:
        return cls(
            id=sid,
            point=f.get("point", point),
            value=_dec_value(f.get("v"), kind),
            quality=Quality(int(f.get("q", "0"))),
            source_ts=_dec_ts(f.get("src")),
            recv_ts=float(f.get("rcv", "0") or 0),
            store_ts=float(f.get("st", "0") or 0),
            time_substituted=f.get("src_from") == "receive",
        )


@dataclass(frozen=True, slots=True)
class DeviceLink:
    """Link state of one device as held in ``P:device:{name}``."""

    device: str
    state: str
    since: float | None
    reason: str
    reconnects: int


class CommandResult(enum.StrEnum):
    """How a command ended; the names match :attr:`gateway.errors.CommandError.result`."""

    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    TIMEOUT = "timeout"
    INVALID = "invalid"
    FAILED = "failed"
    #: refused unsent: the request waited longer than ``commands.request_validity_s``
    EXPIRED = "expired"
    #: cut by a gateway crash and not confirmed by the device's status afterwards; not re-sent
    INTERRUPTED = "interrupted"


#: Version of the intent record; a reader refuses none (unknown keys are kept in ``extra``).
INTENT_VERSION = 1


@dataclass(frozen=True, slots=True)
class CommandIntent:
    """A command on its way to the field: written and acknowledged by Redis before the
    adapter sends anything, removed with the outcome (``P:cmd:intents``, one JSON per
    request id).

    It holds what a restarted gateway needs to find out what happened without sending again:
    the request (id, control point, engineering value as text, who asked, the request stream
    entry to acknowledge), the status point that confirms it and that point's value and
    quality just before (a status already at the requested value proves nothing), and when
    it was requested and written. ``extra`` carries keys of later versions (e.g. a request's
    signature and role) through a reader that does not know them.
    """

    request_id: str
    point: str
    value: str
    requested_by: str
    status_point: str
    status_value: str = ""  # as in P:point:{name} ``value``; "" = not known
    status_quality: int | None = None
    stream_id: str = ""  # "" = not from P:cmd:requests (e.g. a flexibility activation)
    requested_ts: float | None = None
    written_ts: float = field(default_factory=now)
    version: int = INTENT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> str:
        d: dict[str, Any] = {
            "v": self.version,
            "id": self.request_id,
            "point": self.point,
            "value": self.value,
            "by": self.requested_by,
            "status_point": self.status_point,
            "status_value": self.status_value,
            "status_quality": self.status_quality,
            "stream_id": self.stream_id,
            "requested_ts": self.requested_ts,
            "written_ts": self.written_ts,
        }
        return json.dumps({**self.extra, **d}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> CommandIntent:
        d = dict(json.loads(text))
        known = {
            "v", "id", "point", "value", "by", "status_point", "status_value", "status_quality",
            "stream_id", "requested_ts", "written_ts",
        }  # fmt: skip
        q = d.get("status_quality")
        return cls(
            request_id=str(d["id"]),
            point=str(d.get("point", "")),
            value=str(d.get("value", "")),
            requested_by=str(d.get("by", "")),
            status_point=str(d.get("status_point", "")),
            status_value=str(d.get("status_value", "")),
            status_quality=int(q) if q is not None else None,
            stream_id=str(d.get("stream_id", "")),
            requested_ts=_opt_float(d.get("requested_ts")),
            written_ts=_opt_float(d.get("written_ts")) or 0.0,
            version=int(d.get("v", INTENT_VERSION)),
            extra={k: v for k, v in d.items() if k not in known},
        )


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True, slots=True)
class CommandRequestEntry:
    """A command request read from ``P:cmd:requests``.

    ``value`` is the text the operator gave; parsing it for the point (and refusing it as
    ``invalid``) is the command executor's job, because only it knows the point's rules.
    ``redelivered`` is true for a request that an earlier run had received but not finished.
    """

    request_id: str
    point: str
    value: str
    requested_by: str
    stream_id: str
    requested_ts: float
    redelivered: bool = False


class CommandOutcomeLike(Protocol):
    """What :meth:`RedisStore.log_command` needs of an outcome (the core's CommandOutcome fits)."""

    request_id: str
    point: str
    value: Any
    requested_by: str
    result: str
    reason: str
    sent_ts: float | None
    ack_ts: float | None
    confirm_ts: float | None


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """The outcome of one command, as logged in ``P:cmd:log`` and pushed to the reply list."""

    request_id: str
    point: str
    value: str
    requested_by: str
    result: CommandResult
    reason: str = ""
    requested_ts: float | None = None
    sent_ts: float | None = None
    ack_ts: float | None = None
    confirm_ts: float | None = None
    duration_ms: float | None = None
    log_id: str = field(default="", compare=False)  # stream id once read back from the log

    @classmethod
    def for_request(
        cls, request: CommandRequestEntry, result: CommandResult | str, **kw: Any
    ) -> CommandRecord:
        return cls(
            request_id=request.request_id,
            point=request.point,
            value=request.value,
            requested_by=request.requested_by,
            result=CommandResult(result),
            requested_ts=request.requested_ts,
            **kw,
        )

    @classmethod
    def from_outcome(cls, o: CommandOutcomeLike) -> CommandRecord:
        """Copy an outcome object of the command executor into a record for the log."""
        value = o.value if isinstance(o.value, str) else _enc_value(o.value)
        try:
            result, reason = CommandResult(str(o.result)), o.reason
        except ValueError:  # e.g. still "pending": logging it must not fail
            result, reason = CommandResult.FAILED, f"ended as {o.result!r}: {o.reason}"
        return cls(
            request_id=o.request_id,
            point=o.point,
            value=value,
            requested_by=o.requested_by,
            result=result,
            reason=reason,
            requested_ts=getattr(o, "requested_ts", None),
            sent_ts=o.sent_ts,
            ack_ts=o.ack_ts,
            confirm_ts=o.confirm_ts,
            duration_ms=getattr(o, "duration_ms", None),
        )

    def __post_init__(self) -> None:
        # Sent to the end (confirmation, else the device's ack), unless the caller measured it.
        if self.duration_ms is None and self.sent_ts is not None:
            end = self.confirm_ts if self.confirm_ts is not None else self.ack_ts
            if end is not None:
                object.__setattr__(self, "duration_ms", (end - self.sent_ts) * 1000.0)

    def to_fields(self) -> dict[str, str]:
        return {
            "id": self.request_id,
            "point": self.point,
            "value": self.value,
            "by": self.requested_by,
            "result": self.result.value,
            "reason": self.reason,
            "requested_ts": _enc_ts(self.requested_ts),
            "sent_ts": _enc_ts(self.sent_ts),
            "ack_ts": _enc_ts(self.ack_ts),
            "confirm_ts": _enc_ts(self.confirm_ts),
            "duration_ms": _enc_ts(self.duration_ms),
        }

    @classmethod
    def from_fields(cls, f: Mapping[str, str], log_id: str = "") -> CommandRecord:
        return cls(
            request_id=f.get("id", ""),
            point=f.get("point", ""),
            value=f.get("value", ""),
            requested_by=f.get("by", ""),
            result=CommandResult(f.get("result", "failed")),
            reason=f.get("reason", ""),
            requested_ts=_dec_ts(f.get("requested_ts")),
            sent_ts=_dec_ts(f.get("sent_ts")),
            ack_ts=_dec_ts(f.get("ack_ts")),
            confirm_ts=_dec_ts(f.get("confirm_ts")),
            duration_ms=_dec_ts(f.get("duration_ms")),
            log_id=log_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what the reply list holds), e.g. for a CLI to print."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["result"] = self.result.value
        if not self.log_id:
            del d["log_id"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> CommandRecord:
        d = json.loads(text)
        d["result"] = CommandResult(d["result"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------
# Replies of the writer's pipelines


#: a backlog is written in batches of up to this many times ``batch_max``
_CATCH_UP = 4
#: the writer yields to the event loop after encoding this many updates of a batch
_ENCODE_SLICE = 2_000

_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"


class _BadReply(RedisConnectionError):
    """A reply the writer's scanner cannot read: the connection is dropped and the batch retried."""


# RESP2/RESP3 types whose whole reply is one line, and the aggregate types (by their first byte)
_LINE_TYPES = frozenset(b"+:_,#(")
_BULK_TYPES = frozenset(b"$=")
_AGG_TYPES = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2, ord("|"): 2}


async def _read_replies(
    reader: asyncio.StreamReader, n_replies: int, *, unwrap_at: int | None = None
) -> tuple[list[Any], bool]:
    """Scan ``n_replies`` RESP replies from ``reader``: ``None`` per success, ResponseError per
    error, and whether the stream ended exactly after the last reply (else the caller drops
    the connection, whose next reply would be out of step).

    ``unwrap_at``: the reply at that index is an ``EXEC`` array whose elements count as
    top-level replies (one result per queued command); if ``EXEC`` fails as a whole
    (``EXECABORT``), its error stands for every remaining reply.

    The writer's commands answer with ids, integers or errors, and it only needs to know
    which failed. Reading them with redis-py costs an ``asyncio.timeout`` and a parser call
    per reply, which at ~4,000 replies per batch was the largest single cost of ingest
    (py-spy, docs/scale.md); here they are scanned chunk by chunk straight off the stream.
    """
    results: list[Any] = []
    buf = b""
    pos = 0
    pending = 1  # elements still to read of the current top-level reply (aggregates add)
    top_error: Exception | None = None
    at_top = True  # the next element starts a top-level reply
    top_is_push = False  # RESP3 out-of-band push (">"): not a reply to our commands
    while len(results) < n_replies:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            chunk = await reader.read(1 << 18)
            if not chunk:
                raise _BadReply("connection closed while reading replies")
            buf = buf[pos:] + chunk
            pos = 0
            continue
        kind = buf[pos]
        error: Exception | None = None
        if at_top and unwrap_at is not None and len(results) == unwrap_at:
            unwrap_at = None
            if kind == 0x2A:  # "*": the EXEC array; its elements are the replies
                count = int(buf[pos + 1 : nl])
                pos = nl + 2
                if count != n_replies - len(results):
                    failed = ResponseError(f"EXEC answered {count} results for {n_replies - len(results)} commands")
                    if count >= 0:
                        raise _BadReply(str(failed))
                    results.extend([failed] * (n_replies - len(results)))  # null: aborted
                    break
                continue
            if kind == 0x2D:  # "-": EXECABORT, nothing of the transaction ran
                failed = ResponseError(buf[pos + 1 : nl].decode("utf-8", "replace"))
                pos = nl + 2
                results.extend([failed] * (n_replies - len(results)))
                break
            raise _BadReply(f"unexpected EXEC reply type {chr(kind)!r}")
        if kind in _LINE_TYPES:
            pos = nl + 2
        elif kind == 0x2D:  # "-" error
            error = ResponseError(buf[pos + 1 : nl].decode("utf-8", "replace"))
            pos = nl + 2
        elif kind in _BULK_TYPES or kind == 0x21:  # "$", "=", "!" bulk (error)
            length = int(buf[pos + 1 : nl])
            if length < 0:  # RESP2 null
                pos = nl + 2
            else:
                end = nl + 2 + length + 2
                while len(buf) < end:
                    chunk = await reader.read(max(1 << 16, end - len(buf)))
                    if not chunk:
                        raise _BadReply("connection closed while reading replies")
                    buf += chunk
                if kind == 0x21:
                    error = ResponseError(buf[nl + 2 : end - 2].decode("utf-8", "replace"))
                pos = end
        elif kind in _AGG_TYPES:
            if at_top and kind == 0x3E:  # ">"
                top_is_push = True
            count = int(buf[pos + 1 : nl])
            pos = nl + 2
            if count > 0:
                pending += count * _AGG_TYPES[kind]
        else:
            raise _BadReply(f"unexpected reply type {chr(kind)!r}")
        at_top = False
        pending -= 1
        if error is not None and top_error is None:
            top_error = error  # (inside an aggregate: the whole reply counts as failed)
        if pending == 0:
            if not top_is_push:
                results.append(top_error)
            pending, top_error, at_top, top_is_push = 1, None, True, False
            if len(results) % 1024 == 0:
                # let the field side run now and then during a big batch
                await asyncio.sleep(0)
    return results, pos == len(buf)


# ---------------------------------------------------------------------------------------
# The store


@dataclass(slots=True)
class _PointInfo:
    """What the writer needs per point, computed once instead of per update."""

    name: str
    kind: str
    deadband: float
    static: dict[str, str]
    point_key: str
    hist_key: str
    hist_prefix: bytes = b""  # RESP of "XADD hist MAXLEN ~ n * v", see _write_batch
    change_prefix: bytes = b""  # RESP of "XADD changes MAXLEN ~ n * point name v"


class _Refused(Exception):
    """Internal: Redis answered but refused every command of a batch (OOM, MISCONF, LOADING)."""


_RETRY_BATCH: tuple[type[BaseException], ...] = (*_TRANSIENT, _Refused)
_CANNOT_NOW: tuple[type[BaseException], ...] = (*_ANY_REDIS, StoreError)


class RedisStore:
    """Writes the gateway's state to Redis and reads it back; see the module docstring.

    ``client`` may be any ``redis.asyncio.Redis`` (tests pass their own); without one the
    store builds a client from ``url`` or ``config.redis.url`` and closes it in :meth:`close`.
    The buffered writer runs between :meth:`start` and :meth:`close`; the command and read
    methods work without it (the CLI uses them that way).

    ``config.probes.enabled`` picks the entry encoding once, here: with probes off the writer
    reads no clock per batch and writes no ``rcv``/``st``/``store_ts`` field, rather than
    testing a flag per value.
    """

    def __init__(
        self,
        config: LabConfig,
        client: aioredis.Redis | None = None,
        *,
        url: str | None = None,
    ) -> None:
        self.config = config
        self.settings = config.redis
        self.keys = StoreKeys.for_lab(config)
        if client is None:
            url = url or config.redis.url
            if url is None:
                raise ValueError(
                    "no Redis url: start gateway.services.RedisServer and pass its url"
                )
            client = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=5.0,
                socket_connect_timeout=2.0,
                # one quick retry covers a pooled connection that died with a Redis restart;
                # longer outages are handled by our own backoff loops
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.2), 1),
            )
            self._owns_client = True
        else:
            self._owns_client = False
        self.redis: aioredis.Redis = client

        self.probes = config.probes.enabled
        self._entry_args = _ENTRY_ARGS_PROBED if self.probes else _ENTRY_ARGS_BARE
        self._tail = _tail_probed if self.probes else _tail_bare
        self._stamp = _stamp_now if self.probes else _stamp_none
        self._points: dict[str, _PointInfo] = {p.name: self._info(p) for p in config.points}
        self._cap = self.settings.buffer_max
        self._batch_max = self.settings.batch_max

        self._buf: collections.deque[PointUpdate] = collections.deque()
        self._inflight: list[PointUpdate] = []
        self._enqueued = 0  # updates ever put()
        self._done = 0  # updates written, dropped or failed: no longer waiting
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

        self._last_hist: dict[str, tuple[float | None, int]] = {}
        self._flags_cache: dict[int, str] = {}
        self._unknown_warned: set[str] = set()

        # link states and counters are coalesced and ride along with the next batch
        self._pending_links: dict[str, dict[str, str]] = {}
        self._link_ups: collections.Counter[str] = collections.Counter()
        self._stats_total: collections.Counter[str] = collections.Counter()
        self._stats_pending: collections.Counter[str] = collections.Counter()
        self._side_gen = 0  # bumped whenever a link state or counter is queued
        self._side_written = 0

        self._drop_log_at = 0.0
        self._drops_unlogged = 0
        self._error_log_at = 0.0

        self._group_ready = False
        self._cmd_inflight: set[str] = set()
        # told of each request refused here, before execution (the gateway's audit trail)
        self.on_refused: Callable[[CommandRequestEntry, str, str], None] | None = None

    @classmethod
    def from_url(cls, config: LabConfig, url: str) -> RedisStore:
        return cls(config, url=url)

    def _info(self, p: Point | None, name: str = "") -> _PointInfo:
        if p is not None:
            name = p.name
        hist_key = self.keys.hist(name)
        return _PointInfo(
            name=name,
            kind=p.address.kind if p is not None else "measured",
            deadband=p.deadband if p is not None else 0.0,
            static={
                "unit": p.unit if p is not None else "",
                "device": p.device if p is not None else "",
                "quantity": p.quantity if p is not None else "",
            },
            point_key=self.keys.point(name),
            hist_key=hist_key,
            hist_prefix=_xadd_prefix(
                hist_key, self.settings.history_maxlen, _XADD_HEAD + self._entry_args, "v"
            ),
            change_prefix=_xadd_prefix(
                self.keys.changes,
                self.settings.changes_maxlen,
                _XADD_HEAD + 2 + self._entry_args,
                "point",
                name,
                "v",
            ),
        )

    def _kind(self, name: str) -> str:
        info = self._points.get(name)
        return info.kind if info is not None else "measured"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer task. Does not need Redis to be up (it will wait for it)."""
        if self._closed:
            raise StoreError("store is closed")
        if self._writer is None:
            self._writer = asyncio.create_task(self._run_writer(), name="redis-store-writer")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is buffered (waiting at most ``timeout_s``), stop, release the client."""
        if self._closed:
            return
        if self._writer is not None:
            try:
                await self.flush(timeout_s)
            except StoreError as exc:
                log.warning("closing the store with data not written: %s", exc)
        elif self._buf:
            log.warning("store closed before start(): %d buffered updates discarded", len(self._buf))
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._owns_client:
            await self.redis.aclose()

    async def aclose(self) -> None:
        """Same as :meth:`close` (the name redis-py and contextlib.aclosing use)."""
        await self.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def ping(self) -> bool:
        """True if Redis answers right now (for health reports; the writer does not need it)."""
        try:
            return bool(await self.redis.ping())
        except _ANY_REDIS:
            return False

    # -- the hot path ---------------------------------------------------------------------

    def put(self, update: PointUpdate) -> None:
        """Queue one value for Redis. Never blocks and never raises for Redis trouble.

        When the buffer is full the oldest queued update is dropped: for live state the
        newest value matters most, and the count shows up in ``updates_dropped``. (A batch
        already handed to Redis is not taken back; if that write fails, the batch returns to
        the head of the buffer and is the first to go.)
        """
        if self._closed:
            self._drop(1)
            self._done += 1
            self._enqueued += 1
            return
        if len(self._buf) + len(self._inflight) >= self._cap and self._buf:
            self._buf.popleft()
            self._done += 1
            self._drop(1)
        self._buf.append(update)
        self._enqueued += 1
        self._wake.set()

    def _drop(self, n: int) -> None:
        self._count("updates_dropped", n)
        self._drops_unlogged += n
        t = time.monotonic()
        if t - self._drop_log_at >= 1.0:
            log.warning(
                "Redis store buffer full (%d): dropped %d oldest update(s) since last report",
                self._cap,
                self._drops_unlogged,
            )
            self._drop_log_at = t
            self._drops_unlogged = 0

    def _count(self, name: str, n: int = 1) -> None:
        self._stats_total[name] += n
        self._stats_pending[name] += n
        self._side_gen += 1
        self._wake.set()

    @property
    def buffered(self) -> int:
        """Updates waiting for Redis (including a batch being written)."""
        return len(self._buf) + len(self._inflight)

    def stats(self) -> dict[str, int]:
        """Counters of this process since start (``P:stats`` has them summed over runs)."""
        return dict(self._stats_total)

    async def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every update, link state and counter queued so far is in Redis.

        Raises StoreError after ``timeout_s`` (e.g. Redis still away); nothing is discarded.
        """
        if self._writer is None:
            raise StoreError("flush() needs start() first")
        target, side = self._enqueued, self._side_gen

        async def done() -> None:
            while self._done < target or self._side_written < side:
                if self._writer is None or self._writer.done():
                    raise StoreError("the store writer is not running")
                self._progress.clear()
                await self._progress.wait()

        try:
            await asyncio.wait_for(done(), timeout_s)
        except TimeoutError:
            raise StoreError(
                f"flush: {target - self._done} update(s) not written to Redis within {timeout_s:g} s"
            ) from None

    # -- the writer -----------------------------------------------------------------------

    async def _run_writer(self) -> None:
        """Drain the buffer forever; on Redis trouble keep the batch and back off."""
        failures = 0
        down_since = 0.0
        while True:
            reraise_lost_cancel()
            if not self._buf and self._side_written >= self._side_gen:
                self._progress.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            # Behind (a backlog of more than two batches): catch up with bigger batches. One
            # batch is one round trip and one fsync, so throughput is at most batch / round
            # trip; at 100 IEC 104 stations x 20k updates/s a 2,000-update batch fell behind
            # and an 8,000-update one kept up (docs/scale.md). Not while Redis is failing: a
            # batch held for a retry is not trimmed when the buffer overflows, so it stays small.
            backlog = len(self._buf)
            catch_up = _CATCH_UP if backlog > 2 * self._batch_max and not failures else 1
            n = min(self._batch_max * catch_up, backlog)
            batch = [self._buf.popleft() for _ in range(n)]
            self._inflight = batch
            try:
                await self._write_batch(batch)
            except _RETRY_BATCH as exc:
                self._inflight = []
                self._requeue(batch)
                failures += 1
                if failures == 1:
                    down_since = time.monotonic()
                    log.warning("Redis unavailable (%s); buffering, retrying", exc)
                else:
                    log.debug("Redis still unavailable (%s), attempt %d", exc, failures)
                self._progress.set()
                await asyncio.sleep(_backoff(failures))
                continue
            except Exception:
                # A bug or an unexpected reply: retrying the same batch would loop forever.
                log.exception("Redis store: dropping a batch of %d update(s) after an error", n)
                self._inflight = []
                self._done += n
                self._count("write_errors", n)
                self._progress.set()
                await asyncio.sleep(1.0)  # no hot loop if the bug is in the side data
                continue
            self._inflight = []
            self._done += n
            if failures:
                log.info(
                    "Redis reachable again after %.1f s; %d update(s) buffered",
                    time.monotonic() - down_since,
                    len(self._buf),
                )
                failures = 0
                self._count("reconnects")
            self._progress.set()

    def _requeue(self, batch: list[PointUpdate]) -> None:
        """Put a failed batch back at the head; trim the oldest if new puts overfilled us."""
        self._buf.extendleft(reversed(batch))
        excess = len(self._buf) - self._cap
        if excess > 0:
            for _ in range(excess):
                self._buf.popleft()
            self._done += excess
            self._drop(excess)

    async def _write_batch(self, batch: list[PointUpdate]) -> None:
        """One pipelined round trip: history/changes XADDs, one HSET per point, counters.

        The commands are packed into RESP by hand and sent as one write on one pooled
        connection; redis-py's generic per-command packing cost more CPU than Redis spent
        executing them, and that CPU is the event loop's, which the field side needs.
        """
        keys = self.keys
        st_b, stamp = self._stamp()
        tail_of = self._tail
        parts: list[bytes] = []
        add = parts.append
        n_cmds = 0
        new_last: dict[str, tuple[float | None, int]] = {}
        latest: dict[str, tuple[_PointInfo, PointUpdate, str, int]] = {}
        suppressed = 0
        for i, u in enumerate(batch):
            if i % _ENCODE_SLICE == _ENCODE_SLICE - 1:
                await asyncio.sleep(0)  # a big batch must not hold up the field side while encoding
            name = u.point
            info = self._points.get(name)
            if info is None:
                info = self._info(None, name)
                self._points[name] = info
                if name not in self._unknown_warned:
                    self._unknown_warned.add(name)
                    log.warning("storing a value for point %r, which is not in the config", name)
            v = _enc_value(u.value)
            q = int(u.quality)
            num = _numeric(u.value)
            if num is not None and not math.isfinite(num):
                # NaN/Inf is no measurement (the runtime flags it already; a direct caller
                # too): invalid, and never compared for deadband (nothing is >= a NaN)
                q |= _INVALID
                num = None
            latest[name] = (info, u, v, q)
            prev = new_last.get(name) or self._last_hist.get(name)
            if prev is not None and prev[1] == q:
                pv = prev[0]
                changed = (
                    (num is None) != (pv is None)
                    if num is None or pv is None
                    else abs(num - pv) >= info.deadband
                )
                if not changed:
                    suppressed += 1
                    continue
            new_last[name] = (num, q)
            # XADD hist MAXLEN ~ n * v . q . src . [rcv . st .]   and the same to the change
            # feed with the point name first: the value-and-after part is shared
            tail = tail_of(v, q, u, st_b)
            if u.time_substituted:  # rare (GI answers): the entry says whose time src is
                tail += _B_SRC_FROM_RECEIVE
                add(_recount(info.hist_prefix, 2))
                add(tail)
                add(_recount(info.change_prefix, 2))
                add(tail)
            else:
                add(info.hist_prefix)
                add(tail)
                add(info.change_prefix)
                add(tail)
            n_cmds += 2
        for info, u, v, q in latest.values():
            flags = self._flags_cache.get(q)
            if flags is None:
                flags = self._flags_cache[q] = _flags(q)
            mapping = {
                "value": v,
                "quality": str(q),
                "flags": flags,
                "source_ts": _enc_ts(u.source_time),
                "source_ts_from": _source_from(u),
                "recv_ts": repr(u.receive_time),
                **stamp,
                "cause": str(u.cause),
                **info.static,
            }
            if info.kind == "double":
                mapping["text"] = _double_text(u.value)
            add(_pack("HSET", info.point_key, *_flat(mapping)))
            n_cmds += 1
        # side data: snapshot now, forget only what this round trip actually wrote
        links = dict(self._pending_links)
        for device, lf in links.items():
            add(_pack("HSET", keys.device(device), *_flat(lf)))
            n_cmds += 1
        pending_stats = collections.Counter(self._stats_pending)
        stats = collections.Counter(pending_stats)
        if batch:
            stats["updates_stored"] += len(batch)
        if suppressed:
            stats["deadband_suppressed"] += suppressed
        for stat, n in stats.items():
            if n:
                add(_pack("HINCRBY", keys.stats, stat, str(n)))
                n_cmds += 1
        side_gen = self._side_gen
        if n_cmds == 0:
            self._side_written = side_gen
            return
        results = await self._roundtrip(b"".join(parts), n_cmds)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors and len(errors) == len(results):
            raise _Refused(errors[0])
        # committed
        self._last_hist.update(new_last)
        if batch:
            self._stats_total["updates_stored"] += len(batch)
        if suppressed:
            self._stats_total["deadband_suppressed"] += suppressed
        self._stats_pending.subtract(pending_stats)
        self._stats_pending = +self._stats_pending  # drop zero entries
        for device, lf in links.items():
            if self._pending_links.get(device) is lf:
                del self._pending_links[device]
        self._side_written = side_gen
        if errors:
            self._count("write_errors", len(errors))
            t = time.monotonic()
            if t - self._error_log_at >= 1.0:
                self._error_log_at = t
                log.error("Redis refused %d of %d commands: %s", len(errors), len(results), errors[0])

    async def _roundtrip(self, payload: bytes, n_replies: int) -> list[Any]:
        """Send packed commands as one transaction in one write and read their replies;
        errors become values.

        ``MULTI``/``EXEC`` is for durability cost as much as for atomicity: with
        ``appendfsync always`` Redis fsyncs its AOF once per event-loop turn that wrote
        something, and it reads a big pipeline 16 KiB per turn, so a plain pipelined batch
        of ~2,000 updates paid dozens of fsyncs; queued commands write nothing until
        ``EXEC``, which appends the whole batch for one fsync. A batch is now stored
        entirely or not at all.

        Successful replies come back as ``None`` (the writer only looks at errors). Any
        failure mid-way (connection lost, cancelled, timeout) drops the connection, so a
        half-read reply stream never goes back into the pool.
        """
        wrapped = b"".join((_MULTI, payload, _EXEC))
        total = 2 * n_replies + 1  # +OK, +QUEUED per command, then EXEC's n results
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(wrapped)
            reader = getattr(conn, "_reader", None)
            parser = getattr(conn, "_parser", None)
            if isinstance(reader, asyncio.StreamReader) and not getattr(parser, "_buffer", b""):
                try:
                    timeout = getattr(conn, "socket_timeout", None) or 5.0
                    async with asyncio.timeout(timeout + n_replies * 0.001):
                        results, clean = await _read_replies(reader, total, unwrap_at=n_replies + 1)
                except BaseException:
                    await conn.disconnect()
                    raise
                if not clean:
                    log.warning("Redis sent more than the replies expected; reconnecting")
                    await conn.disconnect()
            else:
                results = await self._read_replies_slow(conn, n_replies)
        finally:
            await pool.release(conn)
        multi, queued, executed = results[0], results[1 : n_replies + 1], results[n_replies + 1 :]
        if multi is not None:
            return [multi] * n_replies
        return [q if q is not None else e for q, e in zip(queued, executed, strict=True)]

    @staticmethod
    async def _read_replies_slow(conn: Any, n_replies: int) -> list[Any]:
        """The transaction's replies through redis-py (a connection without a plain
        StreamReader), in the shape :func:`_read_replies` gives them."""
        results: list[Any] = []
        for i in range(n_replies + 1):  # MULTI's +OK and one +QUEUED per command
            try:
                await conn.read_response()
                results.append(None)
            except ResponseError as exc:
                results.append(exc)
            if i % 512 == 511:
                await asyncio.sleep(0)
        try:
            executed = await conn.read_response()
        except ResponseError as exc:  # EXECABORT: nothing ran
            return [*results, *([exc] * n_replies)]
        if not isinstance(executed, list) or len(executed) != n_replies:
            failed = ResponseError(f"EXEC answered {executed!r:.80} for {n_replies} commands")
            return [*results, *([failed] * n_replies)]
        return [*results, *(r if isinstance(r, Exception) else None for r in executed)]

    # -- device links, counters, meta -------------------------------------------------------

    async def set_link_state(
        self,
        device: str,
        state: str | enum.Enum,
        reason: str = "",
        since: float | None = None,
        reconnects: int | None = None,
    ) -> None:
        """Record a device's link state in ``P:device:{name}``.

        Queued like values (and written with the next batch) so a Redis outage never stalls
        whoever reports link changes; only the newest state per device is kept meanwhile.
        ``reconnects`` defaults to the number of times the link came up again after the
        first time in this process.
        """
        s = str(state.value if isinstance(state, enum.Enum) else state)
        if s == "up":
            self._link_ups[device] += 1
        if reconnects is None:
            reconnects = max(0, self._link_ups[device] - 1)
        self._pending_links[device] = {
            "state": s,
            "since": _enc_ts(since if since is not None else now()),
            "reason": reason,
            "reconnects": str(reconnects),
        }
        self._side_gen += 1
        self._wake.set()

    async def write_device_stats(self, device: str, counters: Mapping[str, int | str]) -> None:
        """Put an adapter's counters (reconnects, negative confirmations, drops...) into
        ``P:device:{name}`` as ``stat.<name>`` fields, for an operator's HGETALL.

        Best effort: a snapshot that cannot be written now is simply replaced by the next.
        """
        if not counters:
            return
        try:
            await self.redis.hset(
                self.keys.device(device), mapping=_fields({f"stat.{k}": str(v) for k, v in counters.items()})
            )
        except _ANY_REDIS as exc:
            log.debug("device stats of %s not written: %s", device, exc)

    async def incr_stat(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` in ``P:stats``; queued, written with the next batch."""
        self._count(name, n)

    async def write_meta(self, config_file: str | None = None, **extra: str | int | float) -> None:
        """Describe the running gateway in ``P:meta`` (overwrites the previous run's entry)."""
        mapping: dict[str, str] = {
            "started_at": repr(now()),
            "config": config_file if config_file is not None else self.config.source,
            "version": __version__,
            "pid": str(os.getpid()),
            "host": socket.gethostname(),
            "lab": self.config.lab.name,
            **{k: str(v) for k, v in extra.items()},
        }
        try:
            await self.redis.hset(self.keys.meta, mapping=_fields(mapping))
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot write {self.keys.meta}: {exc}") from exc

    # -- reading ----------------------------------------------------------------------------

    async def latest(self, name: str) -> StoredValue | None:
        """The latest stored value of a point, or None if none was stored yet."""
        try:
            raw = await self.redis.hgetall(self.keys.point(name))
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read {name}: {exc}") from exc
        if not raw:
            return None
        return StoredValue.from_hash(name, _decode_fields(raw), self._kind(name))

    async def latest_all(self) -> dict[str, StoredValue]:
        """Latest values of every point in Redis (configured or not), by point name."""
        pattern = self.keys.point("*")
        plen = len(self.keys.point(""))
        try:
            names = sorted({_s(k)[plen:] async for k in self.redis.scan_iter(pattern, count=1000)})
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.keys.point(name))
            raws = await pipe.execute()
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read latest values: {exc}") from exc
        return {
            name: StoredValue.from_hash(name, _decode_fields(raw), self._kind(name))
            for name, raw in zip(names, raws, strict=True)
            if raw
        }

    async def history(self, name: str, count: int = 100) -> list[HistoryEntry]:
        """The last ``count`` history entries of a point, oldest first."""
        try:
            raw = await self.redis.xrevrange(self.keys.hist(name), count=count)
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read history of {name}: {exc}") from exc
        kind = self._kind(name)
        return [HistoryEntry.from_fields(sid, name, f, kind) for sid, f in reversed(stream_entries(raw))]

    async def changes_tail(self) -> str:
        """Id of the newest change-feed entry ("0-0" if empty): start :meth:`changes` here."""
        try:
            raw = await self.redis.xrevrange(self.keys.changes, count=1)
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read {self.keys.changes}: {exc}") from exc
        entries = stream_entries(raw)
        return entries[0][0] if entries else "0-0"

    async def changes(self, after: str, *, block_ms: int = 1000, count: int = 1000) -> list[HistoryEntry]:
        """Change-feed entries after stream id ``after`` (blocking up to ``block_ms``), oldest first.

        The same read an operator does with ``XREAD BLOCK``: pass the last entry's ``id``
        back in to follow the feed without polling.
        """
        try:
            raw = await self.redis.xread({self.keys.changes: after}, block=block_ms, count=count)
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read {self.keys.changes}: {exc}") from exc
        out = []
        for sid, f in stream_entries(raw):
            name = f.get("point", "")
            out.append(HistoryEntry.from_fields(sid, name, f, self._kind(name)))
        return out

    async def link(self, device: str) -> DeviceLink | None:
        """The stored link state of a device."""
        try:
            raw = await self.redis.hgetall(self.keys.device(device))
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read link state of {device}: {exc}") from exc
        if not raw:
            return None
        h = _decode_fields(raw)
        return DeviceLink(
            device=device,
            state=h.get("state", ""),
            since=_dec_ts(h.get("since")),
            reason=h.get("reason", ""),
            reconnects=int(h.get("reconnects", "0") or 0),
        )

    async def read_stats(self) -> dict[str, int]:
        """``P:stats`` as stored (summed over every run of the gateway)."""
        try:
            raw = await self.redis.hgetall(self.keys.stats)
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read stats: {exc}") from exc
        return {k: int(v) for k, v in _decode_fields(raw).items()}

    # -- commands ---------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing.

        The group starts at id 0, so requests added before any gateway ever ran are not
        silently skipped; callers who fear stale requests use ``max_age_s``.
        """
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.keys.cmd_requests, COMMAND_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            reraise_lost_cancel()  # this is where redis-py was seen to swallow one
        self._group_ready = True

    async def submit_command(
        self,
        point: str,
        value: float | int | bool | str,
        by: str = "operator",
        request_id: str | None = None,
    ) -> str:
        """Ask the gateway to operate ``point``; returns the request id for :meth:`wait_reply`.

        Numbers are sent as text (bools as 1/0), exactly as an operator would type them into
        ``redis-cli XADD``. Only the XADD: the gateway creates its consumer group at id 0 (so a
        request added before it ever ran is still read), and the operator's Redis user may
        append to the request stream but not create groups (docs/security.md).
        """
        rid = request_id or uuid.uuid4().hex
        text = value if isinstance(value, str) else _enc_value(value)
        try:
            await self.redis.xadd(
                self.keys.cmd_requests,
                _fields({"point": point, "value": text, "by": by, "id": rid}),
            )
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot submit command for {point}: {exc}") from exc
        return rid

    async def wait_reply(self, request_id: str, timeout_s: float) -> CommandRecord | None:
        """Wait for the outcome of a submitted request; None if none came within ``timeout_s``.

        Blocks in slices of at most one second so a socket timeout never fires first and a
        Redis restart in between is ridden out.
        """
        key = self.keys.cmd_reply(request_id)
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            reraise_lost_cancel()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                got = await self.redis.blpop([key], timeout=max(0.01, min(1.0, remaining)))
            except _TRANSIENT:
                attempt += 1
                await asyncio.sleep(min(_backoff(attempt), max(0.0, deadline - time.monotonic())))
                continue
            except RedisError as exc:
                raise StoreError(f"cannot wait for reply {request_id}: {exc}") from exc
            if got:
                return CommandRecord.from_json(got[1])

    async def command_requests(
        self,
        consumer: str = DEFAULT_CONSUMER,
        *,
        block_ms: int = 1000,
        count: int = 10,
        claim_idle_ms: int = 0,
        max_age_s: float | None = None,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[CommandRequestEntry]:
        """Operator requests, for the command executor; runs until the store is closed.

        First the requests an earlier run received but never finished (its pending entries,
        taken over from any consumer idle for ``claim_idle_ms``), then new ones. A request is
        acknowledged only by :meth:`log_command`, so one that was being executed when the
        gateway died comes back here after a restart. Requests without ``point`` or
        ``value``, and those older than ``max_age_s``, are logged as ``invalid`` here and
        not yielded. Redis outages are ridden out with backoff.

        ``stop`` ends the stream within ``block_ms`` once set, between two requests: the
        graceful way. Cancelling the consuming task works too (see reraise_lost_cancel for
        why that needed care).
        """
        key = self.keys.cmd_requests
        pending = True
        pending_from = "0"
        attempt = 0
        while not self._closed and not (stop is not None and stop.is_set()):
            reraise_lost_cancel()
            try:
                if pending:
                    if pending_from == "0":
                        self._group_ready = False
                        await self._ensure_group()
                        await self._claim(consumer, claim_idle_ms)
                    reply = await self.redis.xreadgroup(
                        COMMAND_GROUP, consumer, {key: pending_from}, count=count
                    )
                    entries = stream_entries(reply)
                    if not entries:
                        pending = False
                        continue
                    pending_from = entries[-1][0]
                else:
                    reply = await self.redis.xreadgroup(
                        COMMAND_GROUP, consumer, {key: ">"}, count=count, block=block_ms
                    )
                    entries = stream_entries(reply)
                attempt = 0
            except _TRANSIENT as exc:
                attempt += 1
                log.warning("command requests: Redis unavailable (%s), retrying", exc)
                await asyncio.sleep(_backoff(attempt))
                pending, pending_from = True, "0"  # a lost XREADGROUP reply leaves entries pending
                continue
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # stream or group deleted under us
                    pending, pending_from = True, "0"
                    continue
                raise StoreError(f"cannot read {key}: {exc}") from exc
            for sid, f in entries:
                if sid in self._cmd_inflight:
                    continue
                try:
                    req = await self._admit(sid, f, redelivered=pending, max_age_s=max_age_s)
                except _CANNOT_NOW as exc:
                    # it stays pending in Redis and comes back with the next pending scan
                    log.warning("command request %s: cannot handle it now (%s)", sid, exc)
                    pending, pending_from = True, "0"
                    break
                if req is not None:
                    self._cmd_inflight.add(sid)
                    yield req

    async def _claim(self, consumer: str, min_idle_ms: int) -> None:
        """Take over pending requests of other consumers (a renamed or dead gateway)."""
        start = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                self.keys.cmd_requests, COMMAND_GROUP, consumer, min_idle_ms,
                start_id=start, count=100,
            )  # fmt: skip
            # (not justid: redis-py then drops the cursor we need to page on)
            nxt = _s(reply[0])
            if nxt in ("0-0", start):
                return
            start = nxt

    async def _admit(
        self, sid: str, f: dict[str, str], *, redelivered: bool, max_age_s: float | None
    ) -> CommandRequestEntry | None:
        """Turn a stream entry into a request, or log it as invalid and acknowledge it."""
        req = CommandRequestEntry(
            request_id=f.get("id") or sid,
            point=f.get("point", ""),
            value=f.get("value", ""),
            requested_by=f.get("by", "") or "unknown",
            stream_id=sid,
            requested_ts=_stream_ts(sid),
            redelivered=redelivered,
        )
        if not f:  # entry trimmed or deleted while pending: nothing left to do
            await self.redis.xack(self.keys.cmd_requests, COMMAND_GROUP, sid)
            return None
        reason, result = "", CommandResult.INVALID
        if not req.point:
            reason = "request has no 'point' field"
        elif "value" not in f:
            reason = "request has no 'value' field"
        elif max_age_s is not None and now() - req.requested_ts > max_age_s:
            # The field may have moved on since (someone else operated the breaker): a request
            # that waited longer than its validity, e.g. while the gateway was down, is not sent.
            reason = f"request is {now() - req.requested_ts:.1f} s old (valid for {max_age_s:g} s); not sent"
            result = CommandResult.EXPIRED
        if not reason:
            return req
        log.warning("command request %s refused: %s", req.request_id, reason)
        if self.on_refused is not None:
            self.on_refused(req, result.value, reason)
        await self.log_command(CommandRecord.for_request(req, result, reason=reason), req)
        return None

    async def write_intent(self, intent: CommandIntent, *, timeout_s: float = 5.0) -> None:
        """Write a command's intent and return only once Redis acknowledged it.

        Called right before the command goes to the field: with ``appendfsync always`` an
        acknowledged HSET is on disk, so a gateway killed from here on finds it at restart.
        Transient outages are retried for ``timeout_s`` (HSET of the same record is
        idempotent); then StoreError, and the caller must not send.
        """
        deadline = time.monotonic() + timeout_s
        attempt = 0
        doc = intent.to_json()
        while True:
            reraise_lost_cancel()
            try:
                await self.redis.hset(self.keys.cmd_intents, intent.request_id, doc)
                return
            except _TRANSIENT as exc:
                attempt += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreError(
                        f"cannot write the intent of {intent.request_id}: Redis unavailable ({exc})"
                    ) from exc
                await asyncio.sleep(min(_backoff(attempt), left))
            except RedisError as exc:
                raise StoreError(f"cannot write the intent of {intent.request_id}: {exc}") from exc

    async def pending_intents(self) -> list[CommandIntent]:
        """Intents without an outcome: commands a crashed run had on their way to the field.

        An entry that cannot be read is logged and skipped (left in Redis for a person).
        """
        try:
            raw = cast(dict[str, str], await self.redis.hgetall(self.keys.cmd_intents))
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read {self.keys.cmd_intents}: {exc}") from exc
        out: list[CommandIntent] = []
        for rid, doc in raw.items():
            try:
                out.append(CommandIntent.from_json(doc))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("intent %s in %s unreadable (%s); left for a person", rid, self.keys.cmd_intents, exc)
        return sorted(out, key=lambda i: i.written_ts)

    async def finished_command(self, request_id: str) -> CommandRecord | None:
        """The logged outcome of ``request_id`` if it finished within :data:`DONE_TTL_S`."""
        try:
            doc = await self.redis.get(self.keys.cmd_done(request_id))
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read the outcome of {request_id}: {exc}") from exc
        return None if doc is None else CommandRecord.from_json(doc)

    async def log_command(
        self,
        outcome: CommandRecord | CommandOutcomeLike,
        request: CommandRequestEntry | str | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> str:
        """Log a finished command, push its reply, and acknowledge its request: atomically.

        One MULTI/EXEC, so a request is never acknowledged without its log entry (which
        would lose it) nor logged twice by a clean run. The same transaction removes the
        command's intent (``P:cmd:intents``; a no-op for one that never had one) and keeps the
        outcome by request id for :data:`DONE_TTL_S` (``P:cmd:done:{id}``). Redis outages are retried for up to
        ``timeout_s``; then StoreError, and the request stays pending for the next run.
        ``request`` is the entry from :meth:`command_requests` (or its stream id); without
        it nothing is acknowledged (a command that did not come from the stream). Returns
        the log entry's stream id.
        """
        record = outcome if isinstance(outcome, CommandRecord) else CommandRecord.from_outcome(outcome)
        stream_id = request.stream_id if isinstance(request, CommandRequestEntry) else request
        keys = self.keys
        reply_key = keys.cmd_reply(record.request_id)
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            reraise_lost_cancel()
            try:
                pipe = self.redis.pipeline(transaction=True)
                pipe.xadd(keys.cmd_log, _fields(record.to_fields()))
                doc = record.to_json()
                pipe.rpush(reply_key, doc)
                pipe.expire(reply_key, REPLY_TTL_S)
                pipe.set(keys.cmd_done(record.request_id), doc, ex=DONE_TTL_S)
                pipe.hdel(keys.cmd_intents, record.request_id)
                if stream_id:
                    pipe.xack(keys.cmd_requests, COMMAND_GROUP, stream_id)
                results = await pipe.execute()
                break
            except _TRANSIENT as exc:
                attempt += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreError(
                        f"cannot log command {record.request_id}: Redis unavailable ({exc})"
                    ) from exc
                await asyncio.sleep(min(_backoff(attempt), left))
            except RedisError as exc:
                raise StoreError(f"cannot log command {record.request_id}: {exc}") from exc
        if stream_id:
            self._cmd_inflight.discard(stream_id)
        return _s(results[0])

    async def command_log(self, count: int = 20) -> list[CommandRecord]:
        """The last ``count`` finished commands, oldest first."""
        try:
            raw = await self.redis.xrevrange(self.keys.cmd_log, count=count)
        except _ANY_REDIS as exc:
            raise StoreError(f"cannot read the command log: {exc}") from exc
        return [CommandRecord.from_fields(f, sid) for sid, f in reversed(stream_entries(raw))]
