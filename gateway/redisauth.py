"""Who a client is on a service's Redis: a user and its secret, kept out of every URL shown.

The embedded Redis of ``mgms run`` and ``ams run`` has ACL users (``gateway``, ``operator``,
``viewer``, ``auditor``; ``ams``, ``viewer``; :mod:`gateway.services`) and writes their
secrets to ``<data dir>/<name>/secrets/redis-<user>.secret`` (mode 0600), next to the
credential-free ``redis.url``. A command picks the user it needs - ``mgms command`` the
operator, ``mgms watch`` and ``ams status`` the viewer - so it can do that and no more.

Who to be, the first that applies (:func:`client_url`):

1. the command line: ``--redis-url`` (a URL may carry ``user:secret@``, as tests pass it),
   with ``--redis-user`` and ``--redis-secret-file``;
2. the config: ``redis.url`` with ``redis.user`` and ``redis.password_file`` /
   ``redis.password_env`` (:class:`gateway.config.RedisAuth`);
3. the running service's embedded Redis: its ``redis.url`` and the secret file of the
   command's user.

A URL given without credentials that is the data dir's ``redis.url`` (a second AMS worker:
``--redis-url $(cat .ams/ams/redis.url)``) takes its secret from the data dir as in 3.
The URLs built here carry the secret: give them to a client, show :func:`display_url`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config import RedisAuth
from gateway.services import ServiceError, display_url, read_redis_secret, redis_secret_path, url_with_credentials

__all__ = [
    "add_redis_user_arguments",
    "client_url",
    "default_user_is_open",
    "display_url",
    "service_url",
    "warn_if_open",
]


def add_redis_user_arguments(p: argparse.ArgumentParser, *, user: str) -> None:
    """``--redis-user`` and ``--redis-secret-file`` of a command whose default user is ``user``."""
    p.add_argument(
        "--redis-user",
        metavar="USER",
        help=f"Redis user (default: {user} of the embedded Redis, or the config's redis.user)",
    )
    p.add_argument(
        "--redis-secret-file",
        metavar="FILE",
        help="file holding that user's secret (default: DATA_DIR/<name>/secrets/redis-<user>.secret)",
    )


def _has_credentials(url: str) -> bool:
    parts = urlsplit(url)
    return parts.password is not None or parts.username is not None


def _with_secret_file(url: str, user: str, file: Path) -> str:
    return url_with_credentials(url, user, read_redis_secret(file))


def _with_settings(url: str, settings: RedisAuth) -> str:
    """``url`` with the config's user and secret (a legacy ``requirepass`` Redis: no user)."""
    try:
        secret = settings.password()
    except (LookupError, OSError, ValueError) as exc:
        raise ServiceError(f"redis: cannot read the secret: {exc}") from None
    if secret is None:
        return url
    return url_with_credentials(url, settings.user or "default", secret)


def _marker(state_dir: Path) -> str | None:
    marker = state_dir / "redis.url"
    try:
        return marker.read_text().strip() or None
    except OSError:
        return None


def client_url(args: argparse.Namespace, settings: RedisAuth, state_dir: Path, *, user: str) -> str | None:
    """The URL (with credentials) a command connects with as ``user``; None if there is no Redis.

    See the module docstring for the order. Raises :class:`ServiceError` naming the file when
    a secret cannot be read (the service is not running, or the file is not ours to read).
    """
    name = getattr(args, "redis_user", None) or user
    secret_file = getattr(args, "redis_secret_file", None)
    given = getattr(args, "redis_url", None)
    embedded = _marker(state_dir)
    if given:
        url = str(given)
        if _has_credentials(url):
            return url
        if secret_file:
            return _with_secret_file(url, name, Path(secret_file))
        if url == embedded:
            return _with_secret_file(url, name, redis_secret_path(state_dir / "secrets", name))
        return url
    if settings.url is not None:
        if getattr(args, "redis_user", None) and not secret_file:
            raise ServiceError(
                "--redis-user with the config's redis.url needs --redis-secret-file (the config's secret is "
                f"{settings.user or 'its'} user's)"
            )
        if secret_file:
            return _with_secret_file(
                settings.url, getattr(args, "redis_user", None) or settings.user or name, Path(secret_file)
            )
        return _with_settings(settings.url, settings)
    if embedded is None:
        return None
    return _with_secret_file(
        embedded, name, Path(secret_file) if secret_file else redis_secret_path(state_dir / "secrets", name)
    )


def service_url(args: argparse.Namespace, settings: RedisAuth, state_dir: Path, *, user: str) -> str | None:
    """The Redis a service (``mgms run``, ``ams run``) uses, with credentials; None: start its own."""
    if not getattr(args, "redis_url", None) and settings.url is None:
        return None
    return client_url(args, settings, state_dir, user=user)


async def default_user_is_open(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the Redis at ``url`` answers PING with no credentials at all (``default`` on, nopass).

    A fresh connection that sends nothing but PING: it needs no permission of ours and says
    exactly what any local process would get.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname is None:
        return False  # TLS and unix sockets: not probed here
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 6379), timeout_s)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return line.startswith(b"+PONG")


async def warn_if_open(url: str, logger: str) -> bool:
    """Log a warning when the Redis at ``url`` lets anyone in as ``default`` without a password."""
    if not await default_user_is_open(url):
        return False
    logging.getLogger(logger).warning(
        "Redis at %s lets any local process in without a password (user default on nopass): anyone can "
        "write command requests and erase the gateway's state; give it ACL users and turn default off "
        "(docs/security.md)",
        display_url(url),
    )
    return True
