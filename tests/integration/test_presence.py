"""The database sees its agents (docs/protocol.md §8): presence, ready claims and delivery
receipts, on the real PostgreSQL and real `serve` processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from reinitd.server.claim import PREBUILDS_USER_ID
from reinitd.server.embedded import Cluster
from reinitd.server.keys import LISTENER, PRESENCE
from tests.proxy import TcpProxy
from tests.support import (
    REINIT,
    Client,
    ServerFactory,
    Sql,
    claimed,
    get_reinit,
    login_role,
    open_stream,
    server_process,
)

FRESH = 2.0  # the contract: a change is in the database within 2 s


async def within(
    seconds: float, read: Callable[[], Awaitable[Any]], want: Callable[[Any], bool]
) -> Any:
    """Poll `read()` until `want` holds of its result; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = await read()
        if want(value):
            return value
        assert time.monotonic() < deadline, f"not within {seconds} s: {value!r}"
        await asyncio.sleep(0.05)


def presence_of(conn: asyncpg.Connection, agent_id: uuid.UUID) -> Callable[[], Awaitable[Any]]:
    async def read() -> list[asyncpg.Record]:
        return await conn.fetch(
            "SELECT * FROM reinitd.agent_presence WHERE agent_id = $1", agent_id
        )

    return read


@pytest.mark.parametrize(
    ("mode", "wait"), [("sse", True), ("sse", False), ("json", True), ("json", False)]
)
async def test_presence_appears_and_disappears_within_two_seconds(
    client: Client, sql: Sql, conn: asyncpg.Connection, mode: str, wait: bool
) -> None:
    """A waiting request (stream or long-poll, with or without wait) is in agent_presence within
    2 s, with its workspace, mode and wait, and gone within 2 s of its connection ending."""
    agent = await sql.prebuild()
    headers = {"Coder-Session-Token": agent.token}
    params = {"wait": "true"} if wait else {}
    if mode == "json":
        headers["Accept"] = "application/json"
        params["timeout"] = "60"
    request = asyncio.create_task(client.get(REINIT, params=params, headers=headers))
    rows = await within(FRESH + 1, presence_of(conn, agent.agent_id), lambda rows: len(rows) == 1)
    row = rows[0]
    assert (row["workspace_id"], row["mode"], row["wait"]) == (agent.workspace_id, mode, wait)
    assert row["replica"] == client.app[PRESENCE].replica
    started = time.monotonic()
    if mode == "sse":
        (await request).close()
    else:
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
    await within(FRESH + 1, presence_of(conn, agent.agent_id), lambda rows: rows == [])
    assert time.monotonic() - started < FRESH


async def test_ready_prebuilds_lists_prebuilds_whose_agent_listens(
    client: Client, sql: Sql, conn: asyncpg.Connection
) -> None:
    """ready_prebuilds: only prebuilds of the pool with an agent present, longest waiting first;
    a claimed one leaves it."""
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    listening = [await sql.prebuild(pool=pool) for _ in range(2)]
    silent = await sql.prebuild(pool=pool)
    streams = [await open_stream(client, agent.token) for agent in listening]

    async def ready() -> list[asyncpg.Record]:
        return await conn.fetch(
            "SELECT * FROM reinitd.ready_prebuilds WHERE pool = $1 ORDER BY waiting_since", pool
        )

    rows = await within(FRESH + 1, ready, lambda rows: len(rows) == 2)
    assert [r["workspace_id"] for r in rows] == [a.workspace_id for a in listening]
    assert all(r["agents"] == 1 for r in rows)
    assert silent.workspace_id not in {r["workspace_id"] for r in rows}
    owner = await sql.user()
    claimed_ws = await conn.fetchval("SELECT reinitd.claim_ready_prebuild($1, $2)", pool, owner)
    assert claimed_ws == listening[0].workspace_id  # the longest waiting
    assert (await streams[0].event()).data == claimed(listening[0].workspace_id, owner)
    rows = await ready()
    assert [r["workspace_id"] for r in rows] == [listening[1].workspace_id]


async def test_fifty_concurrent_claimers_take_twenty_distinct_prebuilds(
    client: Client, sql: Sql, conn: asyncpg.Connection, database_url: str
) -> None:
    """50 callers of claim_ready_prebuild at once on a pool of 20 ready prebuilds: 20 distinct
    workspaces and 30 NULLs, and every claimed agent hears its claim."""
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    agents = [await sql.prebuild(pool=pool) for _ in range(20)]
    streams = {a.workspace_id: await open_stream(client, a.token) for a in agents}
    await within(
        FRESH + 1,
        lambda: conn.fetchval("SELECT count(*) FROM reinitd.ready_prebuilds WHERE pool = $1", pool),
        lambda n: n == 20,
    )
    owners = [await sql.user() for _ in range(50)]
    callers = [await asyncpg.connect(database_url) for _ in range(50)]
    try:
        start = asyncio.Event()

        async def claim(caller: asyncpg.Connection, owner: uuid.UUID) -> uuid.UUID | None:
            await start.wait()
            value: uuid.UUID | None = await caller.fetchval(
                "SELECT reinitd.claim_ready_prebuild($1, $2)", pool, owner
            )
            return value

        tasks = [asyncio.create_task(claim(c, o)) for c, o in zip(callers, owners, strict=True)]
        start.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        await asyncio.gather(*(c.close() for c in callers))
    won = [r for r in results if r is not None]
    assert len(won) == 20
    assert set(won) == set(streams)
    assert results.count(None) == 30
    for workspace_id in won:
        frame = await streams[workspace_id].event()
        assert frame.data is not None
        assert frame.data["workspace_id"] == str(workspace_id)


async def test_a_claim_held_open_does_not_block_another(
    client: Client, sql: Sql, conn: asyncpg.Connection, database_url: str
) -> None:
    """One session's claim, not yet committed, holds its workspace: a second caller takes the
    other one at once, a third gets NULL at once (SKIP LOCKED: nobody waits on a lock)."""
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    agents = [await sql.prebuild(pool=pool) for _ in range(2)]
    _streams = [await open_stream(client, a.token) for a in agents]
    await within(
        FRESH + 1,
        lambda: conn.fetchval("SELECT count(*) FROM reinitd.ready_prebuilds WHERE pool = $1", pool),
        lambda n: n == 2,
    )
    holder = await asyncpg.connect(database_url)
    other = await asyncpg.connect(database_url)
    try:
        await other.execute("SET lock_timeout = '200ms'")  # any wait on a lock would fail
        held = holder.transaction()
        await held.start()
        first = await holder.fetchval(
            "SELECT reinitd.claim_ready_prebuild($1, $2)", pool, await sql.user()
        )
        started = time.monotonic()
        second = await other.fetchval(
            "SELECT reinitd.claim_ready_prebuild($1, $2)", pool, await sql.user()
        )
        third = await other.fetchval(
            "SELECT reinitd.claim_ready_prebuild($1, $2)", pool, await sql.user()
        )
        assert time.monotonic() - started < 1.0
        assert {first, second} == {a.workspace_id for a in agents}
        assert third is None
        await held.rollback()  # the held workspace is ready again
        fourth = await other.fetchval(
            "SELECT reinitd.claim_ready_prebuild($1, $2)", pool, await sql.user()
        )
        assert fourth == first
    finally:
        await holder.close()
        await other.close()


@pytest.mark.parametrize(
    ("pool", "owner", "message"),
    [
        (None, "user", "pool must not be empty"),
        ("  ", "user", "pool must not be empty"),
        ("default", "nobody", "is not a user who can claim"),
        ("default", "prebuilds", "is not a user who can claim"),
        ("default", None, "is not a user who can claim"),
    ],
)
async def test_a_dbas_mistakes_get_a_clear_error(
    sql: Sql, conn: asyncpg.Connection, pool: str | None, owner: str | None, message: str
) -> None:
    """claim_ready_prebuild refuses a NULL or empty pool and an owner who cannot claim, with a
    message that says so (even when no prebuild is ready)."""
    owners = {"user": await sql.user(), "nobody": uuid.uuid4(), "prebuilds": PREBUILDS_USER_ID}
    with pytest.raises(asyncpg.InvalidParameterValueError, match=message):
        await conn.fetchval(
            "SELECT reinitd.claim_ready_prebuild($1, $2)", pool, owners.get(owner or "")
        )


async def test_create_prebuild_keeps_one_argument_calls_and_names_pools(
    conn: asyncpg.Connection,
) -> None:
    """create_prebuild('x') lands in the default pool; a pool may be named; an empty one is
    refused."""
    one = await conn.fetchrow("SELECT * FROM reinitd.create_prebuild('x')")
    two = await conn.fetchrow("SELECT * FROM reinitd.create_prebuild('y', 'gpu')")
    assert one is not None
    assert two is not None
    pools = await conn.fetch(
        "SELECT id, pool FROM reinitd.workspaces WHERE id = ANY($1::uuid[])",
        [one["workspace_id"], two["workspace_id"]],
    )
    assert {r["id"]: r["pool"] for r in pools} == {
        one["workspace_id"]: "default",
        two["workspace_id"]: "gpu",
    }
    with pytest.raises(asyncpg.InvalidParameterValueError, match="pool must not be empty"):
        await conn.fetch("SELECT * FROM reinitd.create_prebuild('z', '')")


def receipts_of(conn: asyncpg.Connection, workspace_id: uuid.UUID) -> Callable[[], Awaitable[Any]]:
    async def read() -> list[asyncpg.Record]:
        return await conn.fetch(
            "SELECT * FROM reinitd.deliveries WHERE workspace_id = $1 ORDER BY delivered_at",
            workspace_id,
        )

    return read


async def test_receipts_for_notify_and_seeded_deliveries(
    client: Client, sql: Sql, conn: asyncpg.Connection
) -> None:
    """A stream that hears the claim (notify) and one that connects after it (seeded) each
    leave a receipt naming the agent, the claim build and this replica, within 2 s."""
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    owner = await sql.user()
    build = await sql.claim(agent.workspace_id, owner)
    await stream.event()
    late = await open_stream(client, agent.token)
    await late.event()
    rows = await within(FRESH + 1, receipts_of(conn, agent.workspace_id), lambda r: len(r) == 2)
    assert [(r["path"], r["kind"], r["build_id"], r["agent_id"]) for r in rows] == [
        ("notify", "event", build, agent.agent_id),
        ("seeded", "event", build, agent.agent_id),
    ]
    assert {r["replica"] for r in rows} == {client.app[PRESENCE].replica}
    assert all(r["after_build"] is not None and r["after_build"].total_seconds() < 5 for r in rows)


async def test_a_long_polls_answer_leaves_a_receipt(
    client: Client, sql: Sql, conn: asyncpg.Connection
) -> None:
    """A JSON long-poll answered with the claim is a delivery too."""
    agent = await sql.prebuild()
    owner = await sql.user()
    build = await sql.claim(agent.workspace_id, owner)
    response = await client.get(
        REINIT,
        params={"wait": "true"},
        headers={"Coder-Session-Token": agent.token, "Accept": "application/json"},
    )
    assert response.status == 200
    rows = await within(FRESH + 1, receipts_of(conn, agent.workspace_id), lambda r: len(r) == 1)
    assert (rows[0]["path"], rows[0]["kind"], rows[0]["build_id"]) == ("seeded", "event", build)


async def test_an_error_frame_leaves_an_error_receipt(
    client: Client, sql: Sql, conn: asyncpg.Connection
) -> None:
    """A claim build that fails ends a waiting stream with an error frame: an `error` receipt
    with that build."""
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    build = await sql.claim(agent.workspace_id, await sql.user(), complete=False)
    await sql.complete(build, "terraform apply failed")
    frame = await stream.frame()
    assert frame.event == "error"
    rows = await within(FRESH + 1, receipts_of(conn, agent.workspace_id), lambda r: len(r) == 1)
    assert (rows[0]["kind"], rows[0]["path"], rows[0]["build_id"]) == ("error", "notify", build)


async def test_a_resync_delivery_leaves_a_resync_receipt(
    make_server: ServerFactory, proxy: TcpProxy, sql: Sql, conn: asyncpg.Connection
) -> None:
    """A claim announced while the listener was down reaches the agent by the resync after the
    reconnect: its receipt says `resync`."""
    client = await make_server(listen_database_url=proxy.url)
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    listener = client.app[LISTENER]
    proxy.refuse = True
    proxy.drop_all()
    await within(5, lambda: asyncio.sleep(0, not listener.connected), bool)
    build = await sql.claim(agent.workspace_id, await sql.user())  # announced to nobody
    proxy.refuse = False
    await stream.event(timeout=15)
    rows = await within(FRESH + 1, receipts_of(conn, agent.workspace_id), lambda r: len(r) == 1)
    assert (rows[0]["path"], rows[0]["build_id"]) == ("resync", build)


async def test_receipts_made_during_an_outage_are_written_after_it(
    make_server: ServerFactory, proxy: TcpProxy, sql: Sql, conn: asyncpg.Connection
) -> None:
    """The server's queries go through a proxy that is cut right after a delivery: the receipt
    waits in memory and reaches the database once it is back; presence is re-asserted."""
    client = await make_server(database_url=proxy.url)
    presence = client.app[PRESENCE]
    presence.interval = 3600.0  # this test flushes by hand, around the outage
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    await presence.flush()
    build = await sql.claim(agent.workspace_id, await sql.user())
    await stream.event()
    proxy.refuse = True
    proxy.drop_all()
    await presence.flush()  # fails: the database is away
    assert presence.pending_receipts == 1
    await conn.execute("DELETE FROM reinitd.presence WHERE agent_id = $1", agent.agent_id)
    proxy.refuse = False
    await presence.flush()
    rows = await receipts_of(conn, agent.workspace_id)()
    assert [(r["path"], r["build_id"]) for r in rows] == [("notify", build)]
    assert len(await presence_of(conn, agent.agent_id)()) == 1  # everything re-asserted


async def test_a_crash_emptied_presence_is_reasserted(
    make_server: ServerFactory, sql: Sql, conn: asyncpg.Connection
) -> None:
    """The unlogged tables emptied under a live replica (what a crash or a promotion does):
    within one renewal the replica has told the database everything again."""
    client = await make_server(presence_ttl=1.5)
    agent = await sql.prebuild()
    _stream = await open_stream(client, agent.token)
    await within(FRESH + 1, presence_of(conn, agent.agent_id), lambda rows: len(rows) == 1)
    await conn.execute("TRUNCATE reinitd.replicas, reinitd.presence")
    await within(FRESH + 1, presence_of(conn, agent.agent_id), lambda rows: len(rows) == 1)


async def test_a_killed_replica_leaves_and_a_stopped_one_leaves_at_once(
    database_url: str, tmp_path: Path, sql: Sql, conn: asyncpg.Connection
) -> None:
    """`serve` killed with SIGKILL: its rows leave agent_presence once its TTL runs out (here
    3 s); stopped with SIGTERM: at once, from the table as well."""
    killed_agent, stopped_agent = await sql.prebuild(), await sql.prebuild()
    async with (
        server_process(database_url, tmp_path, "--presence-ttl", "3") as killed,
        server_process(database_url, tmp_path) as stopped,
        aiohttp.ClientSession() as http,
    ):
        held = [
            await get_reinit(http, killed.url, killed_agent.token),
            await get_reinit(http, stopped.url, stopped_agent.token),
        ]
        for agent in (killed_agent, stopped_agent):
            await within(FRESH + 1, presence_of(conn, agent.agent_id), lambda rows: len(rows) == 1)
        killed.process.send_signal(signal.SIGKILL)
        await killed.process.wait()
        gone_after = time.monotonic()
        await within(10, presence_of(conn, killed_agent.agent_id), lambda rows: rows == [])
        assert time.monotonic() - gone_after <= 3 + 0.5
        stopped.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(stopped.process.wait(), 15)
        assert await presence_of(conn, stopped_agent.agent_id)() == []
        # gone from the table too, not only from the view (no foreign key cascades them)
        leftover = "SELECT count(*) FROM reinitd.presence WHERE agent_id = $1"
        assert await conn.fetchval(leftover, stopped_agent.agent_id) == 0
        for response in held:
            response.close()


async def test_the_operator_reads_and_claims_and_the_server_cannot(
    client: Client, conn: asyncpg.Connection, postgres: Cluster
) -> None:
    """reinitd_operator reads the three views and calls claim_ready_prebuild; reinitd_server
    can do neither claim nor provision, nor read the receipts' table or token hashes."""
    operator = await asyncpg.connect(await login_role(conn, postgres, "op", "reinitd_operator"))
    server = await asyncpg.connect(await login_role(conn, postgres, "srv", "reinitd_server"))
    try:
        for view in ("agent_presence", "ready_prebuilds", "deliveries"):
            await operator.fetch(f"SELECT * FROM reinitd.{view} LIMIT 1")  # noqa: S608
        owner = await operator.fetchval("SELECT reinitd.create_user($1)", uuid.uuid4().hex)
        assert (
            await operator.fetchval(
                "SELECT reinitd.claim_ready_prebuild($1, $2)", uuid.uuid4().hex, owner
            )
            is None
        )
        for statement in (
            f"SELECT reinitd.claim_ready_prebuild('default', '{owner}')",
            "SELECT * FROM reinitd.create_prebuild('x', 'default')",
            "SELECT * FROM reinitd.delivery_receipts",
            "SELECT * FROM reinitd.presence",
            "SELECT token_hash FROM reinitd.workspace_agents",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await server.fetch(statement)
    finally:
        await operator.close()
        await server.close()


async def test_old_receipts_are_pruned_by_retention(conn: asyncpg.Connection) -> None:
    """prune_deliveries removes receipts older than the retention and keeps the rest; a
    retention under a minute is refused."""
    workspace = uuid.uuid4()
    await conn.execute(
        "SELECT reinitd.record_deliveries('r', $1, $2, $3, $4, $5, $6)",
        [workspace, workspace],
        [uuid.uuid4(), uuid.uuid4()],
        [None, None],
        ["event", "event"],
        ["notify", "notify"],
        [8 * 86400.0, 60.0],
    )
    gone = await conn.fetchval("SELECT reinitd.prune_deliveries(interval '7 days')")
    assert gone >= 1
    left = await conn.fetch("SELECT * FROM reinitd.deliveries WHERE workspace_id = $1", workspace)
    assert len(left) == 1
    with pytest.raises(asyncpg.InvalidParameterValueError, match="at least a minute"):
        await conn.fetchval("SELECT reinitd.prune_deliveries(interval '1 second')")


async def test_a_long_dead_replicas_rows_are_deleted_by_the_living(
    client: Client, conn: asyncpg.Connection
) -> None:
    """A replica expired for over a minute (killed long ago) is invisible in agent_presence, and
    the next report of any live replica deletes its rows."""
    dead = f"dead:{uuid.uuid4().hex[:6]}"
    await conn.execute(
        "INSERT INTO reinitd.replicas (replica, started_at, reported_at, expires_at)"
        " VALUES ($1, now() - interval '2 hours', now() - interval '2 hours',"
        " now() - interval '2 minutes')",
        dead,
    )
    await conn.execute(
        "INSERT INTO reinitd.presence"
        " VALUES ($1, 1, $2, $3, 'sse', true, now() - interval '2 hours')",
        dead,
        uuid.uuid4(),
        uuid.uuid4(),
    )
    visible = await conn.fetchval(
        "SELECT count(*) FROM reinitd.agent_presence WHERE replica = $1", dead
    )
    assert visible == 0
    # A live replica reports. Its own task reports beside these flushes (and may take the work
    # a flush found, the report then still under way when the flush returns): wait for it.
    await client.app[PRESENCE].flush()
    client.app[PRESENCE].reassert()
    await client.app[PRESENCE].flush()
    await within(
        FRESH,
        lambda: conn.fetchval("SELECT count(*) FROM reinitd.presence WHERE replica = $1", dead),
        lambda count: count == 0,
    )
    assert (
        await conn.fetchval("SELECT count(*) FROM reinitd.replicas WHERE replica = $1", dead) == 0
    )
