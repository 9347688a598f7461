"""High availability: a multi-host URL with target_session_attrs=read-write rides through the
promotion of a real streaming standby (pg_basebackup -R), and no claim is lost."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest
import structlog

from reinitd.server.embedded import SUPERUSER, Cluster, free_port
from reinitd.server.keys import LISTENER
from reinitd.server.migration import migrate
from tests.support import (
    ServerFactory,
    Sql,
    assert_no_more_events,
    claimed,
    open_stream,
    readyz_status,
    until,
)

# The embedded cluster's pg_hba.conf has no line for replication connections.
REPLICATION_HBA = "host replication all 127.0.0.1/32 scram-sha-256\n"


@dataclass(frozen=True)
class Pair:
    """A primary and its streaming hot standby (same roles, same passwords)."""

    primary: Cluster
    standby: Cluster

    @property
    def url(self) -> str:
        """Both hosts, the writable one chosen at every connect."""
        passfile = quote(str(self.primary.passfile), safe="/")
        return (
            f"postgresql://{SUPERUSER}@127.0.0.1:{self.primary.port},127.0.0.1:"
            f"{self.standby.port}/reinitd?passfile={passfile}&target_session_attrs=read-write"
        )


def _run(cluster: Cluster, *argv: str) -> None:
    """A PostgreSQL binary run as the cluster runs its own (never as root)."""
    cluster._check(cluster._run(*argv), argv[0])


def _primary(root: Path, bindir: Path) -> Cluster:
    primary = Cluster(root=root, bindir=bindir, port=free_port(), fsync=False)
    primary.init()
    with (primary.datadir / "pg_hba.conf").open("a") as hba:
        hba.write(REPLICATION_HBA)
    primary.start()
    return primary


def _standby(primary: Cluster, root: Path) -> Cluster:
    """pg_basebackup -R of the primary, started on a port of its own: it streams at once."""
    standby = Cluster(root=root, bindir=primary.bindir, port=free_port(), fsync=False)
    root.mkdir()
    shutil.copy(primary.passfile, standby.passfile)
    # In the conninfo (which -R writes into primary_conninfo), not a passfile: an unprivileged
    # fallback user could not read ours.
    password = primary._passwords()[SUPERUSER]
    conninfo = f"host=127.0.0.1 port={primary.port} user={SUPERUSER} password={password}"
    _run(standby, "pg_basebackup", "-D", str(standby.datadir), "-R", "-c", "fast", "-d", conninfo)
    standby.start()
    return standby


@pytest.fixture
def pair(postgres: Cluster) -> Iterator[Pair]:
    """A fresh migrated primary (the session cluster's binaries) and its streaming standby,
    both stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="reinitd-test-ha-"))
    os.chmod(root, 0o755)  # traversable by an unprivileged PostgreSQL user  # noqa: S103
    started: list[Cluster] = []
    try:
        started.append(_primary(root / "primary", postgres.bindir))
        asyncio.run(_migrated(started[0]))
        started.append(_standby(started[0], root / "standby"))
        yield Pair(*started)
    finally:
        for cluster in started:
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def _migrated(cluster: Cluster) -> None:
    await migrate(await cluster.ensure_database())


@pytest.fixture
async def primary_conn(pair: Pair) -> AsyncIterator[asyncpg.Connection]:
    conn: asyncpg.Connection = await asyncpg.connect(pair.primary.dsn("reinitd"))
    try:
        yield conn
    finally:
        await conn.close()


async def _replayed(pair: Pair, primary: asyncpg.Connection) -> None:
    """Everything the primary committed so far has been replayed by the standby."""
    lsn = await primary.fetchval("SELECT pg_current_wal_lsn()")
    standby: asyncpg.Connection = await asyncpg.connect(pair.standby.dsn("reinitd"))
    try:
        async with asyncio.timeout(10):
            while not await standby.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", lsn):
                await asyncio.sleep(0.02)
    finally:
        await standby.close()


PRESENT = "SELECT agent_id FROM reinitd.agent_presence"


async def test_waiting_agents_get_claims_across_a_standby_promotion(
    pair: Pair, primary_conn: asyncpg.Connection, make_server: ServerFactory
) -> None:
    """Primary stopped, standby promoted: agents waiting since before get every claim once —
    committed just before the stop, on the new primary at once, and after /readyz recovers —
    and the new primary's agent_presence shows them again."""
    client = await make_server(database_url=pair.url)
    sql = Sql(primary_conn)
    agents = [await sql.prebuild(name) for name in ("before", "during", "after")]
    streams = [await open_stream(client, agent.token) for agent in agents]
    owner = await sql.user()
    await sql.claim(agents[0].workspace_id, owner)  # heard before the stop, or re-read after
    await _replayed(pair, primary_conn)
    await primary_conn.close()

    await asyncio.to_thread(pair.primary.stop, "fast")
    promote = ("pg_ctl", "promote", "-w", "-D", str(pair.standby.datadir))
    await asyncio.to_thread(_run, pair.standby, *promote)
    new_primary: asyncpg.Connection = await asyncpg.connect(pair.standby.dsn("reinitd"))
    try:
        await Sql(new_primary).claim(agents[1].workspace_id, owner)
        for agent, stream in zip(agents[:2], streams, strict=False):
            assert (await stream.event(timeout=15)).data == claimed(agent.workspace_id, owner)
        await readyz_status(client, 200, timeout=15)
        # The promoted standby never had the unlogged presence rows: the replica re-asserts
        # what it holds (the three streams are still open).
        async with asyncio.timeout(5):
            while {r["agent_id"] for r in await new_primary.fetch(PRESENT)} != {
                a.agent_id for a in agents
            }:
                await asyncio.sleep(0.05)
        await Sql(new_primary).claim(agents[2].workspace_id, owner)
        assert (await streams[2].event()).data == claimed(agents[2].workspace_id, owner)
    finally:
        await new_primary.close()
    for agent, stream in zip(agents, streams, strict=True):
        await assert_no_more_events(client, stream, agent.workspace_id)


async def test_no_writable_host_is_waited_out_not_a_crash(
    pair: Pair, primary_conn: asyncpg.Connection, make_server: ServerFactory
) -> None:
    """Every host up and none writable (primary fenced read-only, standby in recovery): the
    listener retries with one-line warnings, never crashes, and hears claims once writes
    come back."""
    client = await make_server(database_url=pair.url)
    sql = Sql(primary_conn)
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    listener = client.app[LISTENER]
    assert listener.connection is not None
    with structlog.testing.capture_logs() as logs:
        await primary_conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await primary_conn.execute("SELECT pg_reload_conf()")
        await primary_conn.execute(
            "SELECT pg_terminate_backend($1)", listener.connection.get_server_pid()
        )
        await until(
            lambda: sum("target attribute" in str(e.get("error")) for e in logs) >= 2,
            timeout=10,
            what="listener_connect_failed naming target_session_attrs",
        )
        await primary_conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await primary_conn.execute("SELECT pg_reload_conf()")
        await until(lambda: listener.connected, timeout=15, what="listener back")
    refused = [e for e in logs if "target attribute" in str(e.get("error"))]
    assert {e["event"] for e in refused} == {"listener_connect_failed"}
    assert "task_crashed" not in {e["event"] for e in logs}
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)
