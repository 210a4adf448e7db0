"""``mgms audit`` and ``ams audit``: export the audit trail and verify it (gateway/audit.py).

Both programs share this code; each says how to find its stream (a :class:`AuditTarget`:
key prefix, Redis url, the public key that checks the checkpoints) from its own config, so
the two CLIs keep one line each for it.

Exit codes as the CLIs': 0 verified (or exported); 1 the trail has problems (each printed,
with the entry's index, seq and stream id); 2 bad input (file, arguments); 3 Redis unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.audit import AuditEntry, ExportFormat, audit_key, parse_since, read_export, read_stream, render, verify
from gateway.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from gateway.semantic.security import PublicIdentity

__all__ = ["AuditTarget", "add_audit_command", "public_key_near"]


@dataclass(frozen=True, slots=True)
class AuditTarget:
    """Where one participant's audit stream is, and who signs it."""

    prefix: str
    redis_url: str | None
    public: PublicIdentity | None


TargetFn = Callable[[argparse.Namespace], AuditTarget]


def public_key_near(identity_file: str | Path | None) -> PublicIdentity | None:
    """The participant's public key: ``NAME.pub`` next to its ``NAME.key`` (as ``mgms keys``
    writes them), else derived from the private key file if this account may read it."""
    from gateway.semantic.security import load_private_identity, load_public_identity

    if not identity_file:
        return None
    pub = Path(identity_file).with_suffix(".pub")
    try:
        return load_public_identity(pub) if pub.exists() else load_private_identity(identity_file).public
    except ConfigError:
        return None


def add_audit_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
    target: TargetFn,
) -> None:
    """Add ``audit export`` and ``audit verify``; ``common`` adds the program's --config etc."""
    p = sub.add_parser("audit", help="export or verify the tamper-evident audit trail (P:audit)")
    audit = p.add_subparsers(dest="audit_cmd", required=True, metavar="ACTION")
    q = audit.add_parser("export", help="write the audit entries as JSON lines or CSV")
    common(q)
    q.add_argument("--since", help="from this time on: ISO (2026-12-08T01:00, UTC) or an age (90s, 15m, 2h, 7d)")
    q.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="default jsonl")
    q.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    q.set_defaults(func=lambda a: _export(a, target))
    q = audit.add_parser(
        "verify",
        help="check the chain and the checkpoint signatures, of the live stream or of an exported FILE",
    )
    common(q)
    q.add_argument("file", nargs="?", metavar="FILE", help="an exported file (.jsonl or .csv); default: the stream")
    q.add_argument("--format", choices=["jsonl", "csv"], help="of FILE (default: from its suffix)")
    q.add_argument("--since", help="the live stream from this time on (as for export)")
    q.add_argument(
        "--public-key",
        metavar="FILE.pub",
        help="the signer's public key (default: the .pub next to the config's messaging identity)",
    )
    q.set_defaults(func=lambda a: _verify(a, target))


async def _entries(args: argparse.Namespace, tgt: AuditTarget) -> list[AuditEntry]:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    if tgt.redis_url is None:
        raise StoreError("no Redis to read the audit stream from: is the service running? (or give --redis-url)")
    client = aioredis.Redis.from_url(tgt.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0)
    try:
        return await read_stream(client, audit_key(tgt.prefix), since=parse_since(args.since))
    except RedisError as exc:
        raise StoreError(f"cannot read {audit_key(tgt.prefix)}: {exc}") from exc
    finally:
        await client.aclose()


def _no_config(args: argparse.Namespace) -> bool:
    if getattr(args, "config", None):
        return False
    print("error: give the config (--config/-c FILE); `verify FILE --public-key KEY.pub` needs none", file=sys.stderr)
    return True


def _export(args: argparse.Namespace, target: TargetFn) -> int:
    if _no_config(args):
        return 2
    try:
        entries = asyncio.run(_entries(args, target(args)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fmt: ExportFormat = args.format
    text = render(entries, fmt)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"{len(entries)} entries -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _verify(args: argparse.Namespace, target: TargetFn) -> int:
    from gateway.semantic.security import load_public_identity

    if not (args.file and args.public_key) and _no_config(args):
        return 2
    tgt = target(args) if getattr(args, "config", None) else None
    public = load_public_identity(args.public_key) if args.public_key else tgt.public if tgt else None
    try:
        if args.file:
            entries = read_export(Path(args.file), args.format)
            where = args.file
        else:
            assert tgt is not None
            entries = asyncio.run(_entries(args, tgt))
            where = audit_key(tgt.prefix)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rep = verify(entries, public)
    for problem in rep.problems:
        print(problem)
    for note in rep.notes:
        print(f"note: {note}")
    span = f" (seq {rep.first_seq}..{rep.last_seq})" if rep.entries else ""
    signer = f" by {public.participant}" if public is not None else ""
    verdict = "OK" if rep.ok else f"{len(rep.problems)} problem(s)"
    print(
        f"{where}: {rep.entries} entries{span}, {rep.checkpoints_ok} checkpoint(s) verified{signer}, "
        f"{rep.unsigned_tail} after the last one: {verdict}"
    )
    return 0 if rep.ok else 1
