"""Through a real transaction-pooling PgBouncer (Debian 12's 1.18, without prepared-statement
support): concurrent admissions, replicas and restarts; a LISTEN URL behind it is caught."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog

from reinitd.errors import SettingError
from reinitd.server import app as app_module
from reinitd.server.app import HOT_QUERIES
from reinitd.server.database import STATEMENT_CACHE_SIZE, statement_cache_size
from reinitd.server.embedded import Cluster, free_port
from reinitd.server.keys import POOL
from reinitd.settings import SERVE, resolve
from tests.support import (
    REINIT,
    ServerFactory,
    ServerProcess,
    Sql,
    SseReader,
    claimed,
    get_reinit,
    login_role,
    open_stream,
    readyz_status,
    server_process,
    until,
)

PGBOUNCER = shutil.which("pgbouncer", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin")
# default_pool_size below reinitd's own pool (10): clients really share server connections.
CONFIG = """\
[databases]
reinitd = host=127.0.0.1 port={pg_port} dbname=reinitd

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
pool_mode = transaction
default_pool_size = 5
max_client_conn = 500
auth_type = scram-sha-256
auth_file = {folder}/users.txt
logfile = {folder}/pgbouncer.log
"""


@dataclass(frozen=True)
class Bouncer:
    """One login role (in reinitd_server), through PgBouncer (`url`) and straight (`direct`)."""

    url: str
    direct: str


async def _accepting(port: int, process: asyncio.subprocess.Process, log: Path) -> None:
    async with asyncio.timeout(10):
        while True:
            if process.returncode is not None:
                output = await asyncio.to_thread(log.read_text)
                raise RuntimeError(f"pgbouncer exited with {process.returncode}: {output}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return


def _configure(folder: Path, pg_port: int, port: int, user: str, password: str) -> dict[str, Any]:
    """Write the ini and the auth_file; returns how to start pgbouncer (never as root, which
    it refuses: as nobody then, owning the folder)."""
    (folder / "users.txt").write_text(f'"{user}" "{password}"\n')
    (folder / "pgbouncer.ini").write_text(CONFIG.format(pg_port=pg_port, port=port, folder=folder))
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    for path in (folder, *folder.iterdir()):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@pytest.fixture
async def bouncer(postgres: Cluster, conn: asyncpg.Connection) -> AsyncIterator[Bouncer]:
    """pgbouncer in transaction mode before the session's PostgreSQL, started here with a
    generated ini and a SCRAM login from an auth_file holding the role's password."""
    if PGBOUNCER is None:
        pytest.skip("pgbouncer is not installed: apt-get install pgbouncer (.ci/run does, as root)")
    direct = await login_role(conn, postgres, "bouncer", "reinitd_server")
    parts = urllib.parse.urlsplit(direct)
    user, password = parts.username or "", parts.password or ""
    folder = Path(tempfile.mkdtemp(prefix="reinitd-pgbouncer-"))
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        PGBOUNCER,
        "-q",
        str(folder / "pgbouncer.ini"),
        stdin=asyncio.subprocess.DEVNULL,
        **_configure(folder, postgres.port, port, user, password),
    )
    try:
        await _accepting(port, process, folder / "pgbouncer.log")
        yield Bouncer(f"postgresql://{user}:{password}@127.0.0.1:{port}/reinitd", direct)
    finally:
        process.terminate()
        await process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def troubles(server: ServerProcess) -> list[dict[str, Any]]:
    return [e for e in server.log_events() if e["level"] in ("warning", "error", "critical")]


def test_pooler_setting_chooses_the_statement_cache() -> None:
    """REINITD_DATABASE_POOLER: none keeps asyncpg's statement cache, transaction drops it, and
    anything else is refused naming the variable."""
    assert resolve(SERVE, {}, {})["database_pooler"] == "none"
    assert statement_cache_size("none") == STATEMENT_CACHE_SIZE
    chosen = resolve(SERVE, {}, {"REINITD_DATABASE_POOLER": "transaction"})["database_pooler"]
    assert statement_cache_size(chosen) == 0
    with pytest.raises(SettingError, match="REINITD_DATABASE_POOLER='pgbouncer': expected one of"):
        resolve(SERVE, {}, {"REINITD_DATABASE_POOLER": "pgbouncer"})


@pytest.mark.parametrize(("pooler", "prepared"), [("none", len(HOT_QUERIES)), ("transaction", 0)])
async def test_pooled_connections_come_with_the_hot_statements_prepared(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, pooler: str, prepared: int
) -> None:
    """Each pooled connection prepares the connect and claim-read statements when it opens
    (the first claim read on it pays no Parse); behind a transaction pooler it prepares none,
    and runs no warm-up at all (a warmed backend is not the next query's)."""
    warmed: list[asyncpg.Connection] = []

    async def warm(conn: asyncpg.Connection) -> None:
        warmed.append(conn)
        await real_warm(conn)

    real_warm = app_module._warm
    monkeypatch.setattr(app_module, "_warm", warm)
    client = await make_server(database_pooler=pooler)
    hot = [query for query, _ in HOT_QUERIES]
    async with client.app[POOL].acquire() as conn:
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = ANY($1::text[])", hot
        )
    assert found == prepared
    assert bool(warmed) == bool(prepared)


async def test_a_hundred_agents_connect_at_once_through_pgbouncer(
    bouncer: Bouncer, make_server: ServerFactory, sql: Sql
) -> None:
    """100 concurrent wait=true connects through a transaction pooler all get their stream (no
    `prepared statement "__asyncpg_stmt_N__" does not exist`), then their claim."""
    client = await make_server(
        database_url=bouncer.url, listen_database_url=bouncer.direct, database_pooler="transaction"
    )
    agents = [await sql.prebuild(f"pb{i}") for i in range(100)]
    responses = await asyncio.gather(
        *(
            client.get(REINIT, params={"wait": "true"}, headers={"Coder-Session-Token": a.token})
            for a in agents
        )
    )
    assert Counter(r.status for r in responses) == {200: 100}
    owner = await sql.user()
    for agent in agents:
        await sql.claim(agent.workspace_id, owner)
    for agent, response in zip(agents, responses, strict=True):
        assert (await SseReader(response).event()).data == claimed(agent.workspace_id, owner)


async def test_replicas_and_restarts_through_pgbouncer_start_and_serve(
    bouncer: Bouncer, sql: Sql, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A second replica, then a restart, through one PgBouncer: migrations and queries never
    meet a statement another process left on a server connection
    (DuplicatePreparedStatementError), and claims reach both replicas."""
    env = {"REINITD_DATABASE_POOLER": "transaction", "REINITD_LISTEN_DATABASE_URL": bouncer.direct}
    owner = await sql.user()
    async with (
        server_process(bouncer.url, tmp_path, env=env) as first,
        server_process(bouncer.url, tmp_path, env=env) as second,
    ):
        agents = [await sql.prebuild() for _ in range(2)]
        streams = []
        for agent, server in zip(agents, (first, second), strict=True):
            response = await get_reinit(http, server.url, agent.token)
            assert response.status == 200, await response.text()
            streams.append(SseReader(response))
        for agent, stream in zip(agents, streams, strict=True):
            await sql.claim(agent.workspace_id, owner)
            assert (await stream.event()).data == claimed(agent.workspace_id, owner)
        assert troubles(first) == troubles(second) == []
    async with server_process(bouncer.url, tmp_path, env=env, port=first.port) as restarted:
        agent = await sql.prebuild()
        response = await get_reinit(http, restarted.url, agent.token)
        assert response.status == 200, await response.text()
        await sql.claim(agent.workspace_id, owner)
        assert (await SseReader(response).event()).data == claimed(agent.workspace_id, owner)
        assert troubles(restarted) == []


async def test_a_listen_url_through_pgbouncer_is_reported_and_never_ready(
    bouncer: Bouncer, make_server: ServerFactory, sql: Sql
) -> None:
    """LISTEN through a transaction pooler hears nothing: `listener_deaf` at ERROR naming
    PgBouncer within seconds, /readyz 503, claims still arrive (the re-read after
    each replacement); with the listen URL fixed the server is ready and hears claims."""
    with structlog.testing.capture_logs() as logs:
        client = await make_server(
            database_url=bouncer.url, listen_database_url=bouncer.url, database_pooler="transaction"
        )
        agent = await sql.prebuild()
        stream = await open_stream(client, agent.token)
        await until(lambda: any(e["event"] == "listener_deaf" for e in logs), timeout=15)
        deaf = next(e for e in logs if e["event"] == "listener_deaf")
        assert deaf["log_level"] == "error"
        assert "transaction-pooling PgBouncer" in deaf["hint"]
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert "listener" in (await ready.json())["detail"]  # not connected, or did not hear
        owner = await sql.user()
        await sql.claim(agent.workspace_id, owner)
        assert (await stream.event(timeout=30)).data == claimed(agent.workspace_id, owner)
        assert (await client.get("/readyz")).status == 503

    fixed = await make_server(
        database_url=bouncer.url, listen_database_url=bouncer.direct, database_pooler="transaction"
    )
    await readyz_status(fixed, 200)
    other = await sql.prebuild()
    stream = await open_stream(fixed, other.token)
    await sql.claim(other.workspace_id, owner)
    assert (await stream.event()).data == claimed(other.workspace_id, owner)
