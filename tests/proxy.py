"""A TCP proxy between reinitd and PostgreSQL that drops, refuses or blackholes on demand."""

from __future__ import annotations

import asyncio
import contextlib


class _Link:
    """One proxied connection: two pumps, and a switch that swallows bytes."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.blackholed = False
        self.tasks: list[asyncio.Task[None]] = []

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.blackholed:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not self.blackholed:
                writer.close()

    def abort(self) -> None:
        for writer in (self.client, self.server):
            if writer.transport is not None:
                writer.transport.abort()


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards to the target.

    - `refuse = True`: new connections are closed at once (the server is "unreachable").
    - `drop_all()`: every open connection is reset (a network blip, a killed backend).
    - `blackhole_all()`: open connections stay up but carry nothing (dead but quiet).
    - `freeze()`: a partition: open connections carry nothing, and neither do those opened
      until `thaw()`; their sockets stay open, so nothing tells the client. After `thaw()` new
      connections go through, while those of the partition stay silent, as connections to a
      host that failed over do (only a timeout frees whoever waits on one).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.refuse = False
        self.frozen = False
        self.links: set[_Link] = set()
        self.accepted = 0
        self.url = ""  # a database URL through this proxy, set by whoever knows the target
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        link = _Link(writer, up_writer)
        link.blackholed = self.frozen
        self.links.add(link)
        link.tasks = [
            asyncio.create_task(link.pump(reader, up_writer)),
            asyncio.create_task(link.pump(up_reader, writer)),
        ]
        try:
            await asyncio.gather(*link.tasks)
        finally:
            self.links.discard(link)

    def drop_all(self) -> None:
        for link in list(self.links):
            link.abort()

    def blackhole_all(self) -> None:
        for link in self.links:
            link.blackholed = True

    def freeze(self) -> None:
        self.frozen = True
        self.blackhole_all()

    def thaw(self) -> None:
        self.frozen = False

    async def close(self) -> None:
        self.drop_all()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
