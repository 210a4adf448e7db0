"""The line-based control channel every simulator offers for fault injection (loopback TCP).

One command per line, one answer line (``ok ...`` or ``err <reason>``); ``quit`` closes the
connection, ``help`` lists the commands (``help NAME`` says what one does). The transport is
the same for every protocol, so it lives here once; each simulator says only what its
commands do (:meth:`LineControlServer.handle`) and lists them in :attr:`COMMANDS`, which
``help`` answers from - so the list a user sees cannot drift from a docstring.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from typing import ClassVar

__all__ = ["LineControlServer"]

_log = logging.getLogger(__name__)


class LineControlServer(abc.ABC):
    """A small TCP server that turns each line into a call of :meth:`handle`.

    :attr:`COMMANDS` is ``(usage, what it does)`` per command a subclass handles; ``help`` and
    ``quit`` are answered here for every simulator.
    """

    COMMANDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    BUILTIN: ClassVar[tuple[tuple[str, str], ...]] = (
        ("help [NAME]", "list the commands, or say what NAME does"),
        ("quit", "close this control connection"),
    )

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    @abc.abstractmethod
    async def handle(self, words: list[str]) -> str:
        """Run one command (already split, never empty); the answer without its newline."""

    @classmethod
    def help_text(cls, words: list[str]) -> str:
        """The answer to ``help`` (one line: every usage, ``|``-separated) or ``help NAME``."""
        every = (*cls.COMMANDS, *cls.BUILTIN)
        if len(words) == 1:
            return "ok commands: " + " | ".join(usage for usage, _ in every)
        name = words[1].lower()
        for usage, what in every:
            if usage.split()[0] == name:
                return f"ok {usage}: {what}"
        return f"err no command {name!r}; `help` lists them"

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        _log.info("control channel on %s:%d", self._host, self.port)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for w in list(self._clients):
            w.close()
        await server.wait_closed()

    async def __aenter__(self) -> LineControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while line := await reader.readline():
                words = line.decode("utf-8", "replace").split()
                if not words:
                    continue
                if words[0] == "quit":
                    writer.write(b"ok bye\n")
                    break
                answer = self.help_text(words) if words[0].lower() == "help" else await self.handle(words)
                writer.write((answer + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
