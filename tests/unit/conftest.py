"""Unit fixtures: a scripted fake reinit server for the agent side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from reinitd.wire import REINIT_PATH

# One answer per request: raw SSE bytes for a 200 stream, or a whole response (a refusal).
Answer = bytes | web.Response
FakeServer = Callable[[Sequence[Answer]], Awaitable[str]]


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeServer]:
    """Start a server that answers the reinit path with the given answers, one per request,
    in order; the last stream stays open. Returns its base URL."""
    servers: list[TestServer] = []

    async def start(answers: Sequence[Answer]) -> str:
        remaining = list(answers)

        async def handler(request: web.Request) -> web.StreamResponse:
            answer = remaining.pop(0) if remaining else b""
            if isinstance(answer, web.Response):
                return answer
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(answer)
            if not remaining:
                await asyncio.sleep(3600)  # the last stream stays open until the test ends
            return response

        app = web.Application()
        app.router.add_get(REINIT_PATH, handler)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


RawAnswer = Callable[[bytes], bytes]


class RawServer:
    """A bare TCP server on one address that records the first bytes of every connection (an
    HTTP request head, or a TLS hello) and answers each with `answer(first_bytes)`, then closes
    it; `arrived` is set at every connection."""

    def __init__(self, answer: RawAnswer) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.times: list[float] = []
        self.arrived = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1") -> RawServer:
        self._server = await asyncio.start_server(self._serve, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.read(65536)
        self.heads.append(head)
        self.times.append(asyncio.get_running_loop().time())
        self.arrived.set()
        writer.write(self.answer(head))
        await writer.drain()
        writer.close()

    async def requests(self, count: int, timeout: float = 10.0) -> None:
        """Wait, with a bound, until `count` connections have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.heads) < count:
                self.arrived.clear()
                await self.arrived.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


RawServerFactory = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServerFactory]:
    """Start `RawServer`s (on 127.0.0.1 unless a host is given); closed after the test."""
    started: list[RawServer] = []

    async def start(answer: RawAnswer, host: str = "127.0.0.1") -> RawServer:
        server = await RawServer(answer).start(host)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


def redirect_to(location: str, status: int = 302) -> bytes:
    return (
        f"HTTP/1.1 {status} Found\r\nLocation: {location}\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def event_stream(body: bytes) -> bytes:
    """A 200 event stream carrying `body`, ended when the connection closes."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    return head + body
