"""A NOTIFY is a doorbell: forged payloads from a role with no grants change nothing an agent
sees, and what reaches an agent is what the database says."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import structlog

from reinitd.server.embedded import Cluster
from reinitd.server.keys import ADMISSION, LISTENER
from tests.support import (
    REINIT,
    Client,
    Sql,
    after_read,
    assert_no_more_events,
    login_role,
    notifies_applied,
    open_stream,
    sample,
    until,
)


@pytest.fixture
async def mallory(postgres: Cluster, conn: asyncpg.Connection) -> AsyncIterator[Sql]:
    """A login role with no grants at all: it can connect, LISTEN and NOTIFY, nothing else."""
    forger: asyncpg.Connection = await asyncpg.connect(await login_role(conn, postgres, "mallory"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await forger.fetch("SELECT * FROM reinitd.workspaces")
        yield Sql(forger)
    finally:
        await forger.close()


def forgeries(workspace_id: uuid.UUID) -> list[str]:
    """Every payload shape mallory might try for a workspace."""
    ws = str(workspace_id)
    other = str(uuid.uuid4())
    return [
        json.dumps({"workspace_id": ws, "reason": "prebuild_claimed", "owner_id": other}),
        json.dumps({"workspace_id": ws, "owner_id": other}),
        json.dumps({"workspace_id": ws, "reason": "claim_failed"}),
        ws,
        ws.upper(),
    ]


def unconfirmed() -> float:
    return sample("reinitd_doorbells_total", outcome="unconfirmed")


async def test_forged_notifies_deliver_nothing_then_the_real_claim_once(
    client: Client, sql: Sql, mallory: Sql
) -> None:
    """JSON, bare-UUID and claim_failed forgeries reach no stream (with or without wait, SSE or
    JSON long-poll) and end none; a real claim afterwards arrives once, with the real owner."""
    agent = await sql.prebuild()
    waiting = await open_stream(client, agent.token)
    legacy = await open_stream(client, agent.token, wait=False)
    long_poll = asyncio.ensure_future(
        client.get(
            REINIT,
            params={"wait": "true", "timeout": "30"},
            headers={"Coder-Session-Token": agent.token, "Accept": "application/json"},
        )
    )
    await notifies_applied(client)
    before = unconfirmed()
    payloads = forgeries(agent.workspace_id) * 40  # a burst: far beyond any queue's bound
    for payload in payloads:
        await mallory.notify(payload)
    await notifies_applied(client)
    assert not long_poll.done()
    assert unconfirmed() >= before + 1  # doorbells that arrive together are read together
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    expected = {
        "workspace_id": str(agent.workspace_id),
        "reason": "prebuild_claimed",
        "owner_id": str(owner),
    }
    assert (await waiting.event()).data == expected
    assert (await legacy.event()).data == expected
    response = await asyncio.wait_for(long_poll, 10)
    assert response.status == 200
    assert await response.json() == expected
    for payload in payloads:  # after the claim: no second event, no other owner
        await mallory.notify(payload)
    await assert_no_more_events(client, waiting, agent.workspace_id)


async def test_forged_claim_failed_while_the_claim_build_runs(
    client: Client, sql: Sql, mallory: Sql
) -> None:
    """A forged claim_failed for a claim whose build still runs sends no error frame; the real
    completion then delivers the event."""
    agent = await sql.prebuild()
    owner = await sql.user()
    build = await sql.claim(agent.workspace_id, owner, complete=False)
    stream = await open_stream(client, agent.token)
    forged = {"workspace_id": str(agent.workspace_id), "reason": "claim_failed"}
    await mallory.notify(json.dumps(forged))
    await notifies_applied(client)
    await sql.complete(build)
    frame = await stream.event()
    assert frame.event == "data"
    assert frame.data is not None
    assert frame.data["owner_id"] == str(owner)


async def test_a_real_failure_rung_by_anyone_ends_waiting_streams_only(
    client: Client, sql: Sql, mallory: Sql
) -> None:
    """A claim build that really failed ends the wait=true stream with the database's error; a
    stream without wait ignores it, however often the doorbell rings."""
    agent = await sql.prebuild()
    build = await sql.claim(agent.workspace_id, await sql.user(), complete=False)
    waiting = await open_stream(client, agent.token)
    legacy = await open_stream(client, agent.token, wait=False)
    await sql.complete(build, "quota exceeded")
    await mallory.notify(str(agent.workspace_id))
    frame = await waiting.event()
    assert frame.event == "error"
    assert frame.data == {"message": "Claim build failed permanently.", "detail": "quota exceeded"}
    assert await waiting.closed() == b""
    await assert_no_more_events(client, legacy, agent.workspace_id)


async def test_unconfirmed_doorbells_are_logged_sparingly(
    client: Client, sql: Sql, mallory: Sql
) -> None:
    """A flood of forged doorbells is counted in full and logged once, with the count."""
    agent = await sql.prebuild()
    await open_stream(client, agent.token)
    await notifies_applied(client)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):  # three separate reads: three unconfirmed doorbells
            await mallory.notify(str(agent.workspace_id))
            await notifies_applied(client)
    lines = [entry for entry in logs if entry["event"] == "doorbell_unconfirmed"]
    assert len(lines) <= 1
    assert all(entry["workspace_id"] == str(agent.workspace_id) for entry in lines)


async def test_doorbells_for_workspaces_nobody_waits_on_cost_no_read(
    client: Client, sql: Sql, mallory: Sql
) -> None:
    """A NOTIFY naming a workspace no stream here waits on is counted, not read."""
    await notifies_applied(client)
    reads = sample("reinitd_reads_total", outcome="ok")
    before = sample("reinitd_doorbells_total", outcome="no_waiters")
    for _ in range(50):
        await mallory.notify(str(uuid.uuid4()))
    await notifies_applied(client)
    assert sample("reinitd_doorbells_total", outcome="no_waiters") == before + 50
    assert sample("reinitd_reads_total", outcome="ok") == reads


async def test_a_transaction_of_claims_is_read_in_batches(
    client: Client, sql: Sql, conn: asyncpg.Connection
) -> None:
    """300 claims committed together become a few batched reads, not 300 queries."""
    agents = [await sql.prebuild(f"batch-{i}") for i in range(300)]
    streams = [await open_stream(client, a.token) for a in agents]
    await notifies_applied(client)
    reads = sample("reinitd_reads_total", outcome="ok")
    owner = await sql.user()
    async with conn.transaction():
        for agent in agents:
            await sql.claim(agent.workspace_id, owner)
    for stream in streams:
        assert (await stream.event()).data is not None
    assert sample("reinitd_reads_total", outcome="ok") - reads <= 30


async def test_a_connect_overlapping_a_listener_reconnect_rings_no_forged_doorbell(
    client: Client, sql: Sql, conn: asyncpg.Connection
) -> None:
    """The listener reconnects between a connect's read and its registration: the catch-up
    re-reads the workspace as a resync does, not as a NOTIFY, so no doorbell the database
    does not back is counted or logged."""
    agent = await sql.prebuild()
    listener = client.app[LISTENER]

    async def reconnect_listener(_workspace_id: uuid.UUID) -> None:
        old = listener.connection
        assert old is not None
        await conn.fetchval("SELECT pg_terminate_backend($1)", old.get_server_pid())
        await until(lambda: listener.connection not in (None, old), timeout=10)

    after_read(client.app[ADMISSION], reconnect_listener)
    before = unconfirmed()
    with structlog.testing.capture_logs() as logs:
        await open_stream(client, agent.token)
        await notifies_applied(client)
    assert unconfirmed() == before
    assert "doorbell_unconfirmed" not in [entry["event"] for entry in logs]
