"""Test helpers for both tiers: a strict SSE frame reader, SQL API shortcuts, bounded waits,
and starting reinitd apps and processes (the server-process helpers serve `bench` too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import unittest.mock
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from reinitd.server.admission import Admission, Ticket
from reinitd.server.embedded import Cluster, free_port
from reinitd.server.hub import End, Hub, Subscription
from reinitd.server.keys import DOORBELL, HUB, READINESS
from reinitd.server.store import Admitted, Store
from reinitd.server.stream import Stream as ServerStream
from reinitd.wire import REINIT_PATH

REINIT = REINIT_PATH

# docs/protocol.md §4.6, byte for byte: an event line, at most one data line, a blank line;
# no comments.
_FRAME = re.compile(rb"event: (data|ping|error)\n(?:data: ([^\n]+)\n)?\n")
_EVENT_KEYS = (["workspace_id", "reason", "owner_id"], ["workspace_id", "reason"])


class FrameError(AssertionError):
    """The server sent bytes that Coder's strict client would reject."""


@dataclass(frozen=True)
class Frame:
    event: str
    data: dict[str, Any] | None


def parse_frame(raw: bytes) -> Frame:
    """Parse one frame, failing on anything docs/protocol.md §4.6 does not allow."""
    match = _FRAME.fullmatch(raw)
    if match is None:
        raise FrameError(f"not a valid frame: {raw!r}")
    event, data = match.group(1).decode(), match.group(2)
    if event == "ping":
        if data is not None:
            raise FrameError(f"ping with data: {raw!r}")
        return Frame("ping", None)
    if data is None:
        raise FrameError(f"{event} frame without data: {raw!r}")
    parsed = json.loads(data)
    if json.dumps(parsed, separators=(",", ":")).encode() != data:
        raise FrameError(f"data is not compact JSON: {data!r}")
    if event == "data" and list(parsed) not in _EVENT_KEYS:
        raise FrameError(f"event keys out of order or unexpected: {list(parsed)}")
    return Frame(event, parsed)


class SseReader:
    """An open reinit SSE response, read frame by frame with bounded waits."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def frame(self, timeout: float = 5.0) -> Frame:
        raw = await asyncio.wait_for(self.response.content.readuntil(b"\n\n"), timeout)
        if not raw.endswith(b"\n\n"):
            raise EOFError(f"stream ended: {raw!r}")
        return parse_frame(raw)

    async def event(self, timeout: float = 5.0) -> Frame:
        """The next non-ping frame."""
        async with asyncio.timeout(timeout):
            while (frame := await self.frame(timeout)).event == "ping":
                pass
        return frame

    async def closed(self, timeout: float = 5.0) -> bytes:
        """Wait for the server to end the stream; returns what came before the end."""
        return await asyncio.wait_for(self.response.content.read(), timeout)


@dataclass(frozen=True)
class Provisioned:
    workspace_id: uuid.UUID
    agent_id: uuid.UUID
    token: str


class Sql:
    """The SQL API (docs/protocol.md §2.3), as the provisioning system and DBAs call it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def prebuild(self, name: str = "pb", pool: str | None = None) -> Provisioned:
        if pool is None:  # the one-argument call, as before pools
            row = await self.conn.fetchrow("SELECT * FROM reinitd.create_prebuild($1)", name)
        else:
            row = await self.conn.fetchrow(
                "SELECT * FROM reinitd.create_prebuild($1, $2)", name, pool
            )
        assert row is not None
        return Provisioned(row["workspace_id"], row["agent_id"], row["agent_token"])

    async def workspace(self, owner: uuid.UUID, name: str = "ws") -> Provisioned:
        row = await self.conn.fetchrow(
            "SELECT * FROM reinitd.create_workspace($1, $2)", name, owner
        )
        assert row is not None
        return Provisioned(row["workspace_id"], row["agent_id"], row["agent_token"])

    async def user(self) -> uuid.UUID:
        value: uuid.UUID = await self.conn.fetchval(
            "SELECT reinitd.create_user($1)", f"user-{uuid.uuid4().hex[:12]}"
        )
        return value

    async def claim(
        self, workspace_id: uuid.UUID, owner: uuid.UUID, *, complete: bool = True
    ) -> uuid.UUID:
        value: uuid.UUID = await self.conn.fetchval(
            "SELECT reinitd.claim_prebuild($1, $2, $3)", workspace_id, owner, complete
        )
        return value

    async def complete(self, build_id: uuid.UUID, error: str | None = None) -> None:
        await self.conn.execute("SELECT reinitd.complete_build($1, $2)", build_id, error)

    async def start_build(self, workspace_id: uuid.UUID, initiator: uuid.UUID) -> uuid.UUID:
        value: uuid.UUID = await self.conn.fetchval(
            "SELECT reinitd.start_build($1, $2)", workspace_id, initiator
        )
        return value

    async def notify(self, payload: str) -> None:
        await self.conn.execute("SELECT pg_notify('prebuild_claimed', $1)", payload)


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll a condition with a bound: for state with no event to await."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


def sample(name: str, **labels: str) -> float:
    """Current value of a metric sample in this process (0 when never touched)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class ServerProcess:
    """A server subprocess (`reinitd serve`, or a benchmark baseline), its stdout and stderr
    in one file."""

    process: asyncio.subprocess.Process
    url: str
    port: int
    log_path: Path

    def log_events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


async def python_module(
    *argv: str, env: dict[str, str] | None = None, **kwargs: Any
) -> asyncio.subprocess.Process:
    """`python -m ARGV` as a subprocess (stdin closed unless given; other streams as given)."""
    kwargs.setdefault("stdin", asyncio.subprocess.DEVNULL)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", *argv, env=env if env is not None else dict(os.environ), **kwargs
    )


async def reinitd_process(
    *args: str, env: dict[str, str] | None = None, **kwargs: Any
) -> asyncio.subprocess.Process:
    """`python -m reinitd ARGS` as a subprocess (stdin closed; other streams as given)."""
    return await python_module("reinitd", *args, env=env, **kwargs)


def serve_args(port: int, *extra: str) -> list[str]:
    """`reinitd serve` arguments as the tests run it: a given port, JSON logs."""
    return ["serve", "--port", str(port), "--log-format", "json", *extra]


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 15) -> None:
    """SIGTERM (the server's clean stop, which also stops an embedded PostgreSQL), then
    SIGKILL if it has not exited within `timeout`."""
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()


# Printed on stderr by every `reinitd serve` process once it accepts connections.
SERVING = b"reinitd: serving on "


async def wait_ready(
    url: str,
    process: asyncio.subprocess.Process,
    timeout: float = 30,
    *,
    path: str = "/readyz",
    workers: int = 1,
    log_path: Path | None = None,
) -> None:
    """Poll `path` until 200 and, with several workers, until the log at `log_path` shows each
    of them serving (one request reaches only one worker); fail at once if the process exits
    first."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            serving = workers == 1 or (
                log_path is not None
                and (await asyncio.to_thread(log_path.read_bytes)).count(SERVING) >= workers
            )
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}{path}") as response:
                    if response.status == 200 and serving:
                        return
            await asyncio.sleep(0.05)


@asynccontextmanager
async def python_server(
    argv: Sequence[str],
    port: int,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    ready_path: str = "/readyz",
    workers: int = 1,
    timeout: float = 30,
    stop_timeout: float = 15,
) -> AsyncIterator[ServerProcess]:
    """`python -m ARGV`, a server on 127.0.0.1:`port` with its output in `log_path`: yielded
    once ready (see `wait_ready`), stopped afterwards."""
    with log_path.open("wb") as log_file:
        process = await python_module(
            *argv, env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", port, log_path)
    try:
        try:
            await wait_ready(
                server.url, process, timeout, path=ready_path, workers=workers, log_path=log_path
            )
        except (RuntimeError, TimeoutError) as exc:
            problem = str(exc) or f"not ready within {timeout} s"
            output = await asyncio.to_thread(log_path.read_text, errors="replace")
            raise RuntimeError(f"{problem}: {output}") from None
        yield server
    finally:
        await stop_process(process, stop_timeout)


@asynccontextmanager
async def server_process(
    database_url: str,
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    workers: int = 1,
    timeout: float = 30,
    stop_timeout: float = 15,
) -> AsyncIterator[ServerProcess]:
    """Start `python -m reinitd serve` (on a free port unless given, `--workers` when more
    than one); wait until every worker serves and /readyz answers; stop it afterwards."""
    port = port or free_port()
    if workers > 1:
        args = ("--workers", str(workers), *args)
    async with python_server(
        ["reinitd", *serve_args(port, *args)],
        port,
        log_dir / f"serve-{port}-{uuid.uuid4().hex[:6]}.log",
        env={**os.environ, "DATABASE_URL": database_url, **(env or {})},
        workers=workers,
        timeout=timeout,
        stop_timeout=stop_timeout,
    ) as server:
        yield server


async def readyz_status(client: Client, expected: int = 200, timeout: float = 10) -> dict[str, str]:
    """Poll /readyz (its answer is cached for a second) until it answers `expected`."""
    async with asyncio.timeout(timeout):
        while (response := await client.get("/readyz")).status != expected:
            await asyncio.sleep(0.1)
    body: dict[str, str] = await response.json()
    return body


async def get_reinit(
    http: aiohttp.ClientSession, base_url: str, token: str, *, wait: bool = True
) -> aiohttp.ClientResponse:
    """GET the reinit endpoint of a server process as an agent does."""
    return await http.get(
        f"{base_url}{REINIT}",
        params={"wait": "true"} if wait else {},
        headers={"Coder-Session-Token": token},
    )


Client = TestClient[web.Request, web.Application]
ServerFactory = Callable[..., Awaitable[Client]]


def claimed(workspace_id: uuid.UUID, owner: uuid.UUID) -> dict[str, str]:
    """The event data a claim of `workspace_id` for `owner` is delivered as."""
    return {"workspace_id": str(workspace_id), "reason": "prebuild_claimed", "owner_id": str(owner)}


async def open_stream(
    client: TestClient[web.Request, web.Application],
    token: str,
    *,
    wait: bool = True,
    headers: dict[str, str] | None = None,
) -> SseReader:
    """GET the reinit endpoint as an agent does and check the stream's headers."""
    response = await client.get(
        REINIT,
        params={"wait": "true"} if wait else {},
        headers={"Coder-Session-Token": token, **(headers or {})},
    )
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    return SseReader(response)


async def notifies_applied(client: TestClient[web.Request, web.Application]) -> None:
    """Every NOTIFY committed before this call has reached the listener (its own probe NOTIFY,
    committed later, came back) and has been read and applied by the doorbell."""
    app = client.app
    assert await app[READINESS].probe() == []
    await asyncio.wait_for(app[DOORBELL].idle(), 10)


async def assert_no_more_events(
    client: TestClient[web.Request, web.Application], stream: SseReader, workspace_id: object
) -> None:
    """Nothing but pings is left for the stream once every NOTIFY so far has been applied:
    its subscription is ended and everything it still wrote is read to the end."""
    await notifies_applied(client)
    for sub in client.app[HUB].snapshot():
        if sub.workspace_id == workspace_id:
            sub.end(End("test"))
    rest = await stream.closed()
    frames = [parse_frame(raw + b"\n\n") for raw in rest.split(b"\n\n") if raw]
    assert [frame.event for frame in frames] == ["ping"] * len(frames), rest


async def login_role(
    conn: asyncpg.Connection, postgres: Cluster, prefix: str, member_of: str | None = None
) -> str:
    """A new login role with a password (the embedded cluster requires one), optionally in a
    group role; returns its URL for the `reinitd` database."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    statement = await conn.fetchval(
        "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)", name, password
    )
    await conn.execute(statement)
    if member_of is not None:
        await conn.execute(
            await conn.fetchval(
                "SELECT format('GRANT %I TO %I', $1::text, $2::text)", member_of, name
            )
        )
    return f"postgresql://{name}:{password}@127.0.0.1:{postgres.port}/reinitd"


def bare_admission(hub: Hub) -> Admission:
    """An Admission with no database behind it: for streams built by hand (attach_stream)."""
    return Admission(
        unittest.mock.Mock(),
        hub,
        unittest.mock.Mock(),
        max_streams=10,
        max_streams_per_agent=10,
    )


AfterRead = Callable[[uuid.UUID], Awaitable[None]]


class HookedStore:
    """An admission's store with `hook` awaited between a connect's read (token and builds)
    and its registration: where a test puts a claim, a reconnect or a stall."""

    def __init__(self, inner: Store, hook: AfterRead) -> None:
        self.inner = inner
        self.hook = hook

    async def admit_many(self, token_hashes: Sequence[bytes]) -> list[Admitted | None]:
        found = await self.inner.admit_many(token_hashes)
        await asyncio.gather(*(self.hook(a.workspace_id) for a in found if a is not None))
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def after_read(admission: Admission, hook: AfterRead) -> None:
    """From now on, `hook` runs between each connect's read and its registration."""
    store = admission.reads.store
    inner = store.inner if isinstance(store, HookedStore) else store
    admission.reads.store = HookedStore(inner, hook)


def attach_stream(
    admission: Admission, hub: Hub, transport: asyncio.Transport, write_timeout: float = 1.0
) -> Subscription:
    """A stream on `transport` as a take-over leaves it: a ticket holding a process slot and a
    subscription, handed to the server Stream that became the transport's protocol. Returns the
    subscription."""
    admission._take_process_slot()
    ticket = Ticket(admission)
    ticket.subscription = hub.subscribe(uuid.uuid4(), wait=True)
    ticket.open("sse", "r1")
    stream = ServerStream(transport, ticket, None, write_timeout=write_timeout)
    transport.set_protocol(stream)
    ticket.hand_over(stream)
    ticket.subscription.attach(stream)
    return ticket.subscription
