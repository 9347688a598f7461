"""Fixtures: one real PostgreSQL per test session, and reinitd apps served against it."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from reinitd.server.app import create_app, server_options
from reinitd.server.embedded import Cluster, ensure_cluster
from reinitd.server.hub import End
from reinitd.server.keys import DOORBELL, HUB, LISTENER, READINESS
from reinitd.server.migration import migrate
from reinitd.settings import serve_settings
from tests.support import REINIT, Sql, Stream, parse_frame

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
ServerFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A throwaway cluster (fsync off) for the whole session, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="reinitd-test-pg-"))
    os.chmod(root, 0o755)  # traversable by an unprivileged PostgreSQL user  # noqa: S103
    cluster = ensure_cluster(root, fsync=False)
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def _create_database(cluster: Cluster) -> str:
    dsn = await cluster.ensure_database()
    await migrate(dsn)
    return dsn


@pytest.fixture(scope="session")
def database_url(postgres: Cluster) -> str:
    return asyncio.run(_create_database(postgres))


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection: asyncpg.Connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def sql(conn: asyncpg.Connection) -> Sql:
    return Sql(conn)


@pytest.fixture
def make_server(aiohttp_client: ClientFactory, database_url: str) -> ServerFactory:
    """Start a reinitd app on a free port; keyword arguments override Settings fields."""

    async def start(**overrides: Any) -> TestClient[web.Request, web.Application]:
        settings = serve_settings(
            **{"database_url": database_url, "probe_interval": 0.5, "write_timeout": 2.0}
            | overrides
        )
        server = TestServer(create_app(settings))
        # TestServer takes the server's options here (not in its constructor), and always
        # sets handler_cancellation=True itself, as reinitd does.
        options = server_options(settings)
        assert options.pop("handler_cancellation") is True
        await server.start_server(**options)
        # No connection limit: tests hold hundreds of streams open at once.
        client = await aiohttp_client(server, connector=aiohttp.TCPConnector(limit=0))
        await asyncio.wait_for(client.app[LISTENER].wait_connected(), 10)
        return client

    return start


@pytest.fixture
async def client(make_server: ServerFactory) -> TestClient[web.Request, web.Application]:
    return await make_server()


async def open_stream(
    client: TestClient[web.Request, web.Application],
    token: str,
    *,
    wait: bool = True,
    headers: dict[str, str] | None = None,
) -> Stream:
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
    return Stream(response)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def settle(client: TestClient[web.Request, web.Application]) -> None:
    """Every NOTIFY committed before this call has reached the listener (its own probe NOTIFY,
    committed later, came back) and has been read and applied by the doorbell."""
    app = client.app
    assert await app[READINESS].probe() == []
    await asyncio.wait_for(app[DOORBELL].idle(), 10)


async def assert_no_more_events(
    client: TestClient[web.Request, web.Application], stream: Stream, workspace_id: object
) -> None:
    """Nothing but pings is left for the stream once every NOTIFY so far has been applied:
    its subscription is ended and everything it still wrote is read to the end."""
    await settle(client)
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
