"""Benchmark client process: holds many reinit streams over raw sockets and times them.

Driven by the harness over stdin/stdout, one JSON object per line:
  {"cmd": "open", "url": ..., "agents": [[token, workspace_id], ...], "sources": [...]}
  {"cmd": "idle", "url": ..., "count": N, "sources": [...]}   connect, then send nothing
  {"cmd": "listen", "dsn": ...}          a raw asyncpg LISTEN: the latency floor
  {"cmd": "events"}                      first-event receipt times, per workspace
  {"cmd": "wait_events", "count": N, "timeout": S}
  {"cmd": "stats"}                       open / closed / error counts, streams and idle
  {"cmd": "pause"}                       stop reading every stream (the kernel still takes
                                         what comes): a server's stop measured without
                                         this process's reaction to it on the same cores
  {"cmd": "close"}                       close every stream and idle connection
  {"cmd": "exit"}
Times are CLOCK_MONOTONIC, comparable across processes on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import sys
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import asyncpg

EVENT_MARK = b"event: data\n"
CONNECT_BATCH = 200  # connects started per loop iteration
RETRY_DELAY = 0.5  # seconds before an agent refused by a full worker tries again
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class _Events:
    """How many first events arrived, and a latch for the harness's `wait_events`."""

    def __init__(self) -> None:
        self.seen = 0
        self.want = 1 << 62
        self.reached = asyncio.Event()


EVENTS = _Events()


class Waiter(asyncio.Protocol):
    """One agent: sends the request, notes the headers' arrival and the first event."""

    __slots__ = (
        "buffer",
        "closed",
        "done",
        "event_at",
        "headers_at",
        "refusal",
        "request",
        "started",
        "status",
        "transport",
        "workspace_id",
    )

    def __init__(
        self, request: bytes, workspace_id: str, started: float, done: Callable[[], None]
    ) -> None:
        self.done = done  # called once: headers arrived, or the connection closed first
        self.request = request
        self.workspace_id = workspace_id
        self.started = started
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.headers_at = 0.0
        self.event_at = 0.0
        self.status = 0
        self.refusal = ""
        self.closed = False

    def __call__(self) -> Waiter:
        """Its own protocol factory (for create_connection)."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.headers_at:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.headers_at = now
            self.status = int(self.buffer[9:12])
            if self.status != 200:  # the refusal's JSON message, for the error samples
                self.refusal = self.buffer[end + 4 : end + 200].decode(errors="replace")
            self.done()
            data = self.buffer[end + 4 :]
            self.buffer = b""
        if not self.event_at:
            window = self.buffer[-16:] + data
            if EVENT_MARK in window:
                self.event_at = now
                self.buffer = b""
                EVENTS.seen += 1
                if EVENTS.seen >= EVENTS.want:
                    EVENTS.reached.set()
            else:
                self.buffer = window[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.headers_at:
            self.done()


class Idle(asyncio.Protocol):
    """A connection that never sends a byte; notes whether the server closed it."""

    __slots__ = ("closed", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


def _socket(source: str) -> socket.socket:
    """A non-blocking TCP socket bound to `source`, its port picked at connect()."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Pick the source port at connect(), not bind(): bind(port 0) scans every port in
        # use and made the load generator, not the server, the bottleneck.
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LoadGen:
    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        self.idle: list[Idle] = []
        self.errors: list[str] = []
        self.floor: dict[str, float] = {}
        self.listen_conn: asyncpg.Connection | None = None

    async def open(
        self,
        url: str,
        agents: list[list[str]],
        sources: list[str],
        *,
        timeout: float = 120.0,  # noqa: ASYNC109 -- a command's bound, sent by the harness
        waiting: int | None = None,
        retries: int = 0,
    ) -> dict[str, Any]:
        """Open a `wait=true` stream per agent: all at once (a storm), or with at most
        `waiting` requests awaiting their headers at a time (agents arriving steadily). An
        agent refused by a full server (503 `Too many open streams.`) tries again, up to
        `retries` times, on a new connection (which SO_REUSEPORT may hash to another worker),
        as a real agent would. Time to first byte counts from an attempt's connect."""
        host, port = _address(url)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        paced = asyncio.Semaphore(waiting or len(agents) or 1)
        current: dict[int, Waiter] = {}
        retried: set[int] = set()

        async def connect(i: int, token: str, workspace_id: str) -> None:
            request = (
                f"GET /api/v2/workspaceagents/me/reinit?wait=true HTTP/1.1\r\n"
                f"Host: {host}\r\nCoder-Session-Token: {token}\r\n\r\n"
            ).encode()
            for attempt in range(retries + 1):
                async with paced:
                    answered = loop.create_future()

                    def done(answered: asyncio.Future[None] = answered) -> None:
                        if not answered.done():
                            answered.set_result(None)

                    waiter = Waiter(request, workspace_id, time.monotonic(), done)
                    try:
                        sock = _socket(sources[i % len(sources)])
                    except OSError as exc:
                        self.errors.append(f"socket: {exc}")
                        return
                    try:
                        await loop.sock_connect(sock, (host, port))
                        await loop.create_connection(waiter, sock=sock)
                    except OSError as exc:
                        sock.close()
                        self.errors.append(f"connect: {exc}")
                        return
                    except BaseException:  # cancelled at the timeout
                        sock.close()
                        raise
                    current[i] = waiter
                    await answered
                if waiter.status != HTTPStatus.SERVICE_UNAVAILABLE or attempt == retries:
                    return
                retried.add(i)
                del current[i]
                if waiter.transport is not None:
                    waiter.transport.abort()
                await asyncio.sleep(RETRY_DELAY)

        # A real agent sends its request the moment its connection is up. Starting every
        # connect in one loop iteration blocked this process for seconds (10 s for 19 000
        # socket() and connect() calls on cores shared with the servers): connections the
        # kernel had completed sat unwritten. So connects start a batch per iteration.
        tasks: list[asyncio.Future[None]] = []
        for start in range(0, len(agents), CONNECT_BATCH):
            chunk = enumerate(agents[start : start + CONNECT_BATCH], start)
            tasks += [asyncio.ensure_future(connect(i, t, w)) for i, (t, w) in chunk]
            await asyncio.sleep(0)
        _, unanswered = await asyncio.wait(
            tasks, timeout=max(0.0, started + timeout - time.monotonic())
        )
        for task in unanswered:
            task.cancel()
        batch = list(current.values())
        self.waiters.extend(batch)
        done = [w for w in batch if w.headers_at]
        ttfb = [w.headers_at - w.started for w in done]
        last = max((w.headers_at for w in done), default=started)
        bad = [w for w in batch if not w.headers_at or w.status != HTTPStatus.OK]
        registered = sum(1 for w in done if w.status == HTTPStatus.OK)
        return {
            "requested": len(agents),
            "registered": registered,
            # every agent without its stream: refused, closed, failed to connect, or unanswered
            "errors": len(agents) - registered,
            "error_samples": self.errors[:5]
            + [f"status {w.status} {w.refusal}".strip() for w in bad[:5]]
            + [f"no answer within {timeout:g} s"] * min(5, len(unanswered)),
            "retried": len(retried),
            "elapsed_s": last - started,
            "ttfb_p50_s": _percentile(ttfb, 0.50),
            "ttfb_p99_s": _percentile(ttfb, 0.99),
            "ttfb_max_s": max(ttfb, default=float("nan")),
            "events": sum(1 for w in batch if w.event_at),
            "started_at": started,
        }

    async def open_idle(
        self, url: str, count: int, sources: list[str], connect_timeout: float = 10.0
    ) -> dict[str, Any]:
        """Open `count` connections that send nothing, all at once; a connect that takes
        longer than `connect_timeout` (a full accept queue drops SYNs) is given up."""
        address = _address(url)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        outcomes = {"connected": 0, "timed_out": 0, "failed": 0}
        samples: list[str] = []

        async def connect(i: int) -> None:
            try:
                sock = _socket(sources[i % len(sources)])
            except OSError as exc:
                outcomes["failed"] += 1
                samples.append(f"socket: {exc}")
                return
            try:
                async with asyncio.timeout(connect_timeout):
                    await loop.sock_connect(sock, address)
                _transport, idle = await loop.create_connection(Idle, sock=sock)
            except TimeoutError:
                sock.close()
                outcomes["timed_out"] += 1
                return
            except OSError as exc:
                sock.close()
                outcomes["failed"] += 1
                samples.append(f"connect: {exc}")
                return
            outcomes["connected"] += 1
            self.idle.append(idle)

        await asyncio.gather(*(connect(i) for i in range(count)))
        return {
            "requested": count,
            **outcomes,
            "error_samples": samples[:5],
            "elapsed_s": time.monotonic() - started,
        }

    async def listen(self, dsn: str) -> dict[str, Any]:
        self.listen_conn = await asyncpg.connect(dsn)

        def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            now = time.monotonic()
            workspace_id = json.loads(str(payload))["workspace_id"]
            self.floor.setdefault(workspace_id, now)

        await self.listen_conn.add_listener("prebuild_claimed", on_notify)
        return {"listening": True}

    async def wait_events(
        self,
        count: int,
        timeout: float,  # noqa: ASYNC109 -- a command's bound, sent by the harness
    ) -> dict[str, Any]:
        """Reply once `count` streams have their first event (or at the timeout)."""
        EVENTS.want = count
        if EVENTS.seen < count:
            EVENTS.reached.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(EVENTS.reached.wait(), timeout)
        EVENTS.want = 1 << 62
        return {"seen": EVENTS.seen}

    def events(self) -> dict[str, Any]:
        return {
            "events": {w.workspace_id: w.event_at for w in self.waiters if w.event_at},
            "floor": self.floor,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "open": sum(1 for w in self.waiters if not w.closed),
            "closed": sum(1 for w in self.waiters if w.closed),
            "errors": len(self.errors),
            "idle_open": sum(1 for c in self.idle if not c.closed),
            "idle_closed": sum(1 for c in self.idle if c.closed),
        }

    def pause(self) -> dict[str, Any]:
        paused = 0
        for waiter in self.waiters:
            if waiter.transport is not None and not waiter.closed:
                waiter.transport.pause_reading()
                paused += 1
        return {"paused": paused}

    def close(self) -> dict[str, Any]:
        transports = [c.transport for c in self.waiters] + [c.transport for c in self.idle]
        for transport in transports:
            if transport is not None:
                transport.abort()
        count = len(self.waiters) + len(self.idle)
        self.waiters, self.idle, self.errors = [], [], []
        EVENTS.seen = 0
        return {"closed": count}


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gen = LoadGen()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**28)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "exit":
            break
        if cmd == "open":
            reply = await gen.open(**request)
        elif cmd == "idle":
            reply = await gen.open_idle(**request)
        elif cmd == "listen":
            reply = await gen.listen(**request)
        elif cmd == "events":
            reply = gen.events()
        elif cmd == "wait_events":
            reply = await gen.wait_events(**request)
        elif cmd == "stats":
            reply = gen.stats()
        elif cmd == "pause":
            reply = gen.pause()
        elif cmd == "close":
            reply = gen.close()
        else:
            reply = {"error": f"unknown command {cmd}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    if gen.listen_conn is not None:
        await gen.listen_conn.close()


if __name__ == "__main__":
    asyncio.run(main())
