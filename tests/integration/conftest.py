"""Integration fixtures: one real PostgreSQL per test session, and reinitd apps served against
it."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from reinitd.server import internals
from reinitd.server.app import create_app, make_runner
from reinitd.server.embedded import Cluster, ensure_cluster
from reinitd.server.keys import LISTENER
from reinitd.server.migration import migrate
from reinitd.settings import serve_settings
from tests.proxy import TcpProxy
from tests.support import ServerFactory, Sql

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


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


class GuardedTestServer(TestServer):
    """aiohttp's TestServer, serving through reinitd's own runner (the connection budget).
    `_make_runner` is aiohttp's, the one private name the tests use (reinitd.server.internals
    lists it; tests/unit/test_internals.py checks it)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return make_runner(self.app, **kwargs)


# How a test server uses reinitd.server.internals: `auto` (every private path today's
# aiohttp and asyncpg allow), `public` (--internals public: the public fallbacks), `unguarded`
# (as if the start-up check had failed for every name: aiohttp's own server too).
INTERNALS_MODES = ("auto", "public", "unguarded")


@pytest.fixture
def internals_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`auto` unless a test parametrizes it (indirectly) with one of INTERNALS_MODES."""
    mode: str = getattr(request, "param", "auto")
    if mode == "unguarded":
        failed = internals.Paths(
            guard=False, takeover=False, fast_notify=False, problems=("turned off by a test",)
        )
        monkeypatch.setattr(internals, "check", lambda: failed)
    return mode


@pytest.fixture
def make_server(
    aiohttp_client: ClientFactory, database_url: str, internals_mode: str
) -> ServerFactory:
    """Start a reinitd app on a free port; keyword arguments override Settings fields."""

    async def start(**overrides: Any) -> TestClient[web.Request, web.Application]:
        settings = serve_settings(
            **{
                "database_url": database_url,
                "probe_interval": 0.5,
                "write_timeout": 2.0,
                "internals": "public" if internals_mode == "public" else "auto",
            }
            | overrides
        )
        server = GuardedTestServer(create_app(settings))
        await server.start_server()
        # No connection limit: tests hold hundreds of streams open at once.
        client = await aiohttp_client(server, connector=aiohttp.TCPConnector(limit=0))
        await asyncio.wait_for(client.app[LISTENER].wait_connected(), 10)
        return client

    return start


@pytest.fixture
async def client(make_server: ServerFactory) -> TestClient[web.Request, web.Application]:
    return await make_server()


@pytest.fixture
async def proxy(postgres: Cluster) -> AsyncIterator[TcpProxy]:
    """A fault-injecting TCP proxy in front of the session's PostgreSQL (`url` goes through it)."""
    tcp = await TcpProxy("127.0.0.1", postgres.port).start()
    tcp.url = postgres.dsn("reinitd", port=tcp.port)
    try:
        yield tcp
    finally:
        await tcp.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
