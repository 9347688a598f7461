"""Every way PostgreSQL turns the server away is an outage (a 503 with Retry-After, one log
line per interval, no traceback); refused requests are counted in full but logged bounded;
X-Request-ID is the client's only behind a trusted proxy."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog

from reinitd.server.embedded import Cluster
from reinitd.server.keys import POOL
from reinitd.server.migration import migrate
from tests.support import (
    REINIT,
    Client,
    ServerFactory,
    login_role,
    sample,
    server_process,
    until,
)


def _role(url: str) -> str:
    name = urllib.parse.urlsplit(url).username
    assert name is not None
    return name


async def _alter(conn: asyncpg.Connection, statement: str, *names: str) -> None:
    """Run a DDL statement with its identifiers quoted by format()."""
    await conn.execute(await conn.fetchval(f"SELECT format($1, {_args(names)})", statement, *names))


def _args(names: tuple[str, ...]) -> str:
    return ", ".join(f"${i}::text" for i in range(2, len(names) + 2))


async def _terminate_pool(conn: asyncpg.Connection, client: Client, role: str) -> None:
    """End the pool's backends (an administrator's pg_terminate_backend) and wait until the
    pool has seen it, so that the next request has to open a new connection."""
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE usename = $1 AND application_name = 'reinitd'",
        role,
    )
    holders: list[Any] = client.app[POOL]._holders  # type: ignore[attr-defined]
    await until(
        lambda: all(h._con is None or h._con.is_closed() for h in holders),
        what="the pool noticed its terminated connections",
    )


async def _refused(client: Client, count: int = 8) -> list[aiohttp.ClientResponse]:
    """`count` new wait=true requests (a well-formed token: it needs the database)."""
    return [
        await client.get(
            REINIT,
            params={"wait": "true"},
            headers={"Coder-Session-Token": str(uuid.uuid4())},
        )
        for _ in range(count)
    ]


def _assert_outage(
    answers: list[aiohttp.ClientResponse],
    logs: Sequence[MutableMapping[str, Any]],
    *,
    kind: str,
    sqlstate: str | None,
    level: str,
    errors_before: float,
) -> None:
    """Every answer a 503 with Retry-After; no 500 counted; no traceback; exactly one
    `database_unavailable` line, of this kind and level."""
    assert [a.status for a in answers] == [503] * len(answers)
    assert all(a.headers["Retry-After"] == "5" for a in answers)
    assert sample("reinitd_responses_total", status="500") == errors_before
    assert not [entry for entry in logs if entry.get("exc_info")], logs
    lines = [entry for entry in logs if entry["event"] == "database_unavailable"]
    assert len(lines) == 1, lines
    assert (lines[0]["kind"], lines[0]["sqlstate"], lines[0]["log_level"]) == (
        kind,
        sqlstate,
        level,
    )


async def _expect_outage(client: Client, kind: str, sqlstate: str, level: str) -> None:
    """New wait=true requests now: each a 503 of this outage (see _assert_outage), counted."""
    errors_before = sample("reinitd_responses_total", status="500")
    outages_before = sample("reinitd_database_outages_total", kind=kind)
    with structlog.testing.capture_logs() as logs:
        answers = await _refused(client)
    _assert_outage(
        answers, logs, kind=kind, sqlstate=sqlstate, level=level, errors_before=errors_before
    )
    assert sample("reinitd_database_outages_total", kind=kind) == outages_before + len(answers)
    assert (await answers[0].json())["message"] == "Service unavailable."


@pytest.fixture
async def role_url(conn: asyncpg.Connection, postgres: Cluster) -> AsyncIterator[str]:
    """A login role of its own in reinitd_server (what these tests alter), dropped after."""
    url = await login_role(conn, postgres, "refused", "reinitd_server")
    try:
        yield url
    finally:
        role = _role(url)
        await _alter(conn, "ALTER ROLE %I LOGIN CONNECTION LIMIT -1", role)
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )


@pytest.mark.parametrize(
    "case",
    [
        ("ALTER ROLE %I CONNECTION LIMIT 0", "overloaded", "53300", "warning"),
        ("ALTER ROLE %I NOLOGIN", "not_allowed", "28000", "error"),
        (f"ALTER ROLE %I PASSWORD '{uuid.uuid4().hex}'", "not_allowed", "28P01", "error"),
    ],
    ids=["connection_limit_0", "nologin", "password_changed"],
)
async def test_a_login_the_role_is_refused_is_a_503_not_a_500(
    make_server: ServerFactory,
    conn: asyncpg.Connection,
    role_url: str,
    case: tuple[str, str, str, str],
) -> None:
    """The server's role altered under it (CONNECTION LIMIT 0: 53300; NOLOGIN: 28000; a new
    password: 28P01), the pool's connections terminated: every new wait=true request gets a
    503 with Retry-After, one line at WARNING (or ERROR when an operator must act), counted
    by kind, no traceback, no 500."""
    statement, kind, sqlstate, level = case
    client = await make_server(database_url=role_url)
    assert (await _refused(client, 1))[0].status == 401  # the database answers
    role = _role(role_url)
    await _alter(conn, statement, role)
    await _terminate_pool(conn, client, role)
    await _expect_outage(client, kind, sqlstate, level)


@contextlib.asynccontextmanager
async def _own_database(postgres: Cluster, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A migrated database of its own (ALTER DATABASE must not touch the shared one), dropped
    afterwards whatever state the test left it in."""
    name = f"reinitd_refusal_{uuid.uuid4().hex[:8]}"
    await _alter(conn, "CREATE DATABASE %I", name)
    try:
        owner = postgres.dsn(name)
        await migrate(owner)
        yield name
    finally:
        for statement in (
            "ALTER DATABASE %I ALLOW_CONNECTIONS true",
            "DROP DATABASE IF EXISTS %I WITH (FORCE)",
        ):
            with contextlib.suppress(asyncpg.PostgresError):
                await _alter(conn, statement, name)


async def test_a_database_that_refuses_connections_or_is_gone_is_a_503(
    make_server: ServerFactory, conn: asyncpg.Connection, postgres: Cluster, role_url: str
) -> None:
    """ALTER DATABASE … ALLOW_CONNECTIONS false with its backends terminated (55000), then the
    database renamed away (3D000): every new request a 503, one ERROR line per cause, no
    traceback, no 500."""
    async with _own_database(postgres, conn) as name:
        url = urllib.parse.urlsplit(role_url)._replace(path=f"/{name}").geturl()
        client = await make_server(database_url=url)
        assert (await _refused(client, 1))[0].status == 401
        await _alter(conn, "ALTER DATABASE %I ALLOW_CONNECTIONS false", name)
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await _terminate_pool(conn, client, _role(role_url))
        await _expect_outage(client, "not_allowed", "55000", "error")
        gone = f"{name}_gone"
        await _alter(conn, "ALTER DATABASE %I RENAME TO %I", name, gone)
        try:
            await _expect_outage(client, "not_allowed", "3D000", "error")
        finally:
            await _alter(conn, "ALTER DATABASE %I RENAME TO %I", gone, name)


@contextlib.asynccontextmanager
async def _locked(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """The table every token lookup reads, locked by a DBA (a migration running)."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE reinitd.workspace_agents IN ACCESS EXCLUSIVE MODE")
        yield


async def test_a_backend_terminated_mid_query_is_a_503(
    make_server: ServerFactory, conn: asyncpg.Connection, role_url: str, database_url: str
) -> None:
    """pg_terminate_backend on the backend running a request's query (57P01): that request
    gets 503 with Retry-After, logged once as `terminated` at WARNING, no traceback."""
    client = await make_server(database_url=role_url)
    role = _role(role_url)
    errors_before = sample("reinitd_responses_total", status="500")
    admin: asyncpg.Connection = await asyncpg.connect(database_url)
    try:
        with structlog.testing.capture_logs() as logs:
            async with _locked(conn):
                pending = asyncio.ensure_future(_refused(client, 1))
                waiting: list[int] = []

                async def blocked() -> bool:
                    waiting[:] = (
                        await admin.fetchval(
                            "SELECT array_agg(pid) FROM pg_stat_activity "
                            "WHERE usename = $1 AND wait_event_type = 'Lock'",
                            role,
                        )
                        or []
                    )
                    return bool(waiting)

                async with asyncio.timeout(10):
                    while not await blocked():
                        await asyncio.sleep(0.02)
                for pid in waiting:
                    await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                answers = await asyncio.wait_for(pending, 10)
    finally:
        await admin.close()
    _assert_outage(
        answers,
        logs,
        kind="terminated",
        sqlstate="57P01",
        level="warning",
        errors_before=errors_before,
    )


@pytest.mark.parametrize(
    ("setting", "sqlstate"), [("lock_timeout", "55P03"), ("statement_timeout", "57014")]
)
async def test_a_query_timeout_set_in_postgresql_is_a_503(
    make_server: ServerFactory,
    conn: asyncpg.Connection,
    role_url: str,
    setting: str,
    sqlstate: str,
) -> None:
    """The role's lock_timeout (55P03) or statement_timeout (57014) ends a request's query
    held by a DBA's lock: 503 with Retry-After, logged once as `timed_out`, no traceback."""
    await _alter(conn, f"ALTER ROLE %I SET {setting} = '200ms'", _role(role_url))
    client = await make_server(database_url=role_url)  # its sessions take the setting
    errors_before = sample("reinitd_responses_total", status="500")
    with structlog.testing.capture_logs() as logs:
        async with _locked(conn):
            answers = await _refused(client, 4)
    _assert_outage(
        answers,
        logs,
        kind="timed_out",
        sqlstate=sqlstate,
        level="warning",
        errors_before=errors_before,
    )


async def test_a_flood_of_unknown_tokens_is_counted_in_full_and_logged_bounded(
    database_url: str, tmp_path: Path
) -> None:
    """2 000 requests with distinct unknown tokens: all 401, the refusal counter moves by
    2 000 (seen on /metrics), and the log grows by a handful of lines, not 2 000."""
    count = 2000
    async with (
        server_process(database_url, tmp_path) as server,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http,
    ):

        async def refusals() -> float:
            async with http.get(f"{server.url}/metrics") as response:
                text = await response.text()
            found = re.search(r'reinitd_refusals_total\{reason="unknown_token"\} (\S+)', text)
            assert found is not None
            return float(found.group(1))

        async def guess() -> int:
            async with http.get(
                f"{server.url}{REINIT}",
                params={"wait": "true"},
                headers={"Coder-Session-Token": str(uuid.uuid4())},
            ) as response:
                return response.status

        before = await refusals()
        lines_before = len(server.log_path.read_bytes().splitlines())
        statuses = await asyncio.gather(*(guess() for _ in range(count)))
        assert set(statuses) == {401}
        assert await refusals() == before + count
        added = server.log_path.read_bytes().splitlines()[lines_before:]
    assert len(added) <= 5, added


async def test_a_client_request_id_is_logged_beside_ours_unless_trusted(
    make_server: ServerFactory,
) -> None:
    """By default a client's X-Request-ID is not the request id (the server makes its own) but
    is logged as client_request_id; with --trust-request-id it is the request id."""
    for trusted in (False, True):
        client = await make_server(trust_request_id=trusted)
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            response = await client.get(
                REINIT, headers={"X-Request-ID": "other-stream-id", "Coder-Session-Token": "x"}
            )
        assert response.status == 401
        lines = [entry for entry in logs if entry["event"] == "request_refused"]
        request_id = response.headers["X-Request-ID"]
        if trusted:
            assert request_id == "other-stream-id"
            assert "client_request_id" not in lines[0]
        else:
            assert re.fullmatch(r"[0-9a-f]{16}", request_id)
            assert lines[0]["client_request_id"] == "other-stream-id"
