"""The guarantees (docs/protocol.md §5) under fault injection: killed listener, restarted
PostgreSQL, dead-but-quiet connections, stalled clients, floods, shutdown, several replicas."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog

from reinitd.server import doorbell as doorbell_module
from reinitd.server.claim import Verdict
from reinitd.server.embedded import Cluster
from reinitd.server.keys import DOORBELL, HUB, LISTENER, POOL, READINESS
from reinitd.server.listener import Listener, Notifier
from reinitd.server.router import Router
from tests.proxy import TcpProxy
from tests.support import (
    REINIT,
    Client,
    ServerFactory,
    Sql,
    SseReader,
    claimed,
    get_reinit,
    login_role,
    open_stream,
    readyz_status,
    sample,
    server_process,
    until,
)

# On the private paths of reinitd.server.internals and on their public fallbacks.
on_every_path = pytest.mark.parametrize("internals_mode", ["auto", "public"], indirect=True)


async def proxied_server(
    make_server: ServerFactory, proxy: TcpProxy, **overrides: object
) -> Client:
    """Queries go straight to PostgreSQL; the LISTEN connection goes through the proxy."""
    return await make_server(listen_database_url=proxy.url, **overrides)


@pytest.mark.internals
@on_every_path
async def test_claim_while_listener_backend_killed_is_delivered(
    make_server: ServerFactory, proxy: TcpProxy, sql: Sql, conn: asyncpg.Connection
) -> None:
    """pg_terminate_backend on the listener, a claim before it reconnects: every agent gets it."""
    client = await proxied_server(make_server, proxy)
    agent = await sql.prebuild()
    streams = [await open_stream(client, agent.token) for _ in range(3)]
    listener = client.app[LISTENER]
    assert listener.connection is not None
    pid = listener.connection.get_server_pid()
    before = sample("reinitd_events_delivered_total", path="resync")

    proxy.refuse = True  # hold the reconnect until the claim has been committed
    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    await until(lambda: not listener.connected, what="listener noticed the kill")
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)  # announced to nobody
    proxy.refuse = False

    for stream in streams:
        assert (await stream.event(timeout=10)).data == claimed(agent.workspace_id, owner)
    assert sample("reinitd_events_delivered_total", path="resync") == before + 3


@pytest.mark.internals
@on_every_path
async def test_postgres_restart_under_waiting_streams(
    make_server: ServerFactory, proxy: TcpProxy, postgres: Cluster, database_url: str
) -> None:
    """The whole PostgreSQL restarted (fast) under waiting streams: the claim still arrives."""
    client = await proxied_server(make_server, proxy)
    setup: asyncpg.Connection = await asyncpg.connect(database_url)
    agent = await Sql(setup).prebuild()
    owner = await Sql(setup).user()
    await setup.close()
    streams = [await open_stream(client, agent.token) for _ in range(2)]
    listener = client.app[LISTENER]

    proxy.refuse = True
    await asyncio.to_thread(postgres.restart)
    await until(lambda: not listener.connected, what="listener noticed the restart")
    after: asyncpg.Connection = await asyncpg.connect(database_url)
    try:
        await Sql(after).claim(agent.workspace_id, owner)
    finally:
        await after.close()
    proxy.refuse = False

    for stream in streams:
        assert (await stream.event(timeout=15)).data == claimed(agent.workspace_id, owner)
    await until(lambda: listener.connected, what="listener reconnected")


async def test_dead_but_quiet_connection_is_noticed_by_the_probe(
    make_server: ServerFactory, proxy: TcpProxy, sql: Sql
) -> None:
    """A blackholed LISTEN connection (no RST, no data) is found by the idle probe."""
    client = await proxied_server(make_server, proxy, probe_interval=0.3, probe_timeout=0.5)
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    listener = client.app[LISTENER]
    accepted = proxy.accepted

    proxy.blackhole_all()
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)  # its NOTIFY vanishes into the hole
    # noticed within probe_interval + probe_timeout, then reconnected and resynced
    assert (await stream.event(timeout=10)).data == claimed(agent.workspace_id, owner)
    assert proxy.accepted > accepted
    assert listener.connected


@pytest.mark.internals
@on_every_path
async def test_stalled_client_and_duplicate_flood_do_not_delay_others(
    make_server: ServerFactory, sql: Sql, conn: asyncpg.Connection
) -> None:
    """A client that stops reading is cut off after the write timeout; others are unaffected."""
    client = await make_server(write_timeout=0.5)
    stalled_agent, other = await sql.prebuild("stalled"), await sql.prebuild("other")
    build = await sql.claim(stalled_agent.workspace_id, await sql.user(), complete=False)

    # A raw client with a tiny receive buffer that never reads after the request.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", client.port))
    request = (
        f"GET {REINIT}?wait=true HTTP/1.1\r\nHost: x\r\n"
        f"Coder-Session-Token: {stalled_agent.token}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    await until(lambda: len(client.app[HUB]) == 1, what="stalled stream registered")
    other_stream = await open_stream(client, other.token)

    stalled_before = sample("reinitd_stalled_clients_total")
    # A 4 MB error frame can never fit in the stalled client's buffers.
    await sql.complete(build, "x" * 4_000_000)
    for _ in range(500):  # a flood of duplicate kicks for the stalled workspace
        await sql.notify(str(stalled_agent.workspace_id))
    owner = await sql.user()
    await sql.claim(other.workspace_id, owner)
    assert (await other_stream.event(timeout=5)).data == claimed(other.workspace_id, owner)
    await until(
        lambda: sample("reinitd_stalled_clients_total") == stalled_before + 1,
        timeout=5,
        what="stalled client disconnected",
    )
    sock.close()


async def test_a_bug_while_applying_a_read_loses_nothing(
    make_server: ServerFactory, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while applying a doorbell's read loses nothing: the doorbells are kept and read
    again, the listener lives on, and both claims arrive."""
    client = await make_server()
    hub = client.app[HUB]
    real_apply = hub.apply
    calls = 0

    def flaky_apply(*args: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected failure")
        return real_apply(*args)

    monkeypatch.setattr(hub, "apply", flaky_apply)
    first, second = await sql.prebuild(), await sql.prebuild()
    first_stream = await open_stream(client, first.token)
    second_stream = await open_stream(client, second.token)
    owner = await sql.user()
    await sql.claim(first.workspace_id, owner)  # applying it raises
    await sql.claim(second.workspace_id, owner)
    assert (await second_stream.event()).data == claimed(second.workspace_id, owner)
    assert (await first_stream.event()).data == claimed(first.workspace_id, owner)
    assert calls >= 2
    assert client.app[LISTENER].connected


@pytest.mark.internals
@on_every_path
async def test_garbage_notify_storm_leaves_listener_up(client: Client, sql: Sql) -> None:
    """Hundreds of garbage payloads, then a real claim: delivered, listener still connected."""
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    for i in range(300):
        await sql.notify(["{", "null", "x" * 3000, f'{{"workspace_id":"{i}"}}'][i % 4])
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)
    assert client.app[LISTENER].connected


async def test_readyz_is_503_while_listener_is_down(
    make_server: ServerFactory, proxy: TcpProxy
) -> None:
    """/readyz reports the listener outage and recovers with it; /healthz stays 200."""
    client = await proxied_server(make_server, proxy)
    await readyz_status(client, 200)
    with structlog.testing.capture_logs() as logs:
        proxy.refuse = True
        proxy.drop_all()
        await until(lambda: not client.app[LISTENER].connected)
        assert "listener" in (await readyz_status(client, 503))["detail"]
        await until(lambda: any(e["event"] == "listener_connect_failed" for e in logs))
    failed = [e for e in logs if e["event"] == "listener_connect_failed"]
    assert failed[0]["attempt"] == 1  # counted from the first failed reconnect
    assert (await client.get("/healthz")).status == 200
    proxy.refuse = False
    await asyncio.wait_for(client.app[LISTENER].wait_connected(), 10)
    await readyz_status(client, 200)


async def test_readyz_needs_the_notify_echo(make_server: ServerFactory, proxy: TcpProxy) -> None:
    """A listener that looks connected but hears nothing (blackholed) is not ready."""
    client = await proxied_server(make_server, proxy, probe_interval=30.0)
    await readyz_status(client, 200)
    proxy.blackhole_all()
    assert client.app[LISTENER].connected  # the probe has not run yet: only the echo tells
    assert "did not come back" in (await readyz_status(client, 503))["detail"]


async def test_sigterm_ends_open_streams_and_exits(
    database_url: str, sql: Sql, tmp_path: Path
) -> None:
    """SIGTERM: every open stream ends promptly and the process exits 0."""
    agents = [await sql.prebuild() for _ in range(20)]
    async with server_process(database_url, tmp_path) as server, aiohttp.ClientSession() as http:
        responses = [await get_reinit(http, server.url, a.token) for a in agents]
        assert all(r.status == 200 for r in responses)
        server.process.send_signal(signal.SIGTERM)
        ends = await asyncio.wait_for(
            asyncio.gather(*(SseReader(r).closed(timeout=10) for r in responses)), 10
        )
        assert all(b"event: data" not in end for end in ends)
        assert await asyncio.wait_for(server.process.wait(), 10) == 0
    events = [e["event"] for e in server.log_events()]
    assert events.index("server_stopping") < events.index("server_stopped")


async def test_two_replicas_each_deliver_to_their_agents(
    database_url: str, sql: Sql, tmp_path: Path
) -> None:
    """Two `reinitd serve` processes on one database: a claim reaches agents on both."""
    agent = await sql.prebuild()
    async with (
        server_process(database_url, tmp_path) as one,
        server_process(database_url, tmp_path) as two,
        aiohttp.ClientSession() as http,
    ):
        streams = []
        for server in (one, two):
            response = await get_reinit(http, server.url, agent.token)
            assert response.status == 200
            streams.append(SseReader(response))
        owner = await sql.user()
        await sql.claim(agent.workspace_id, owner)
        for stream in streams:
            assert (await stream.event()).data == claimed(agent.workspace_id, owner)
            stream.response.close()


async def test_server_restart_misses_nothing(database_url: str, sql: Sql, tmp_path: Path) -> None:
    """An agent reconnects after a server restart; a claim made while it was down is delivered."""
    agent = await sql.prebuild()
    async with server_process(database_url, tmp_path) as first, aiohttp.ClientSession() as http:
        response = await get_reinit(http, first.url, agent.token)
        assert response.status == 200
        response.close()
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)  # no server is running
    async with server_process(database_url, tmp_path) as second, aiohttp.ClientSession() as http:
        response = await get_reinit(http, second.url, agent.token)
        assert (await SseReader(response).event()).data == claimed(agent.workspace_id, owner)
        response.close()


@pytest.mark.internals
@on_every_path
async def test_agents_hanging_up_mid_request_leave_nothing_behind(client: Client, sql: Sql) -> None:
    """Hundreds of agents that reset their connection right after the request: the pool, the
    hub and the per-agent limits all recover, and the next agent is served normally."""
    agent = await sql.prebuild()
    request = (
        f"GET {REINIT}?wait=true HTTP/1.1\r\nHost: x\r\nCoder-Session-Token: {agent.token}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    for _ in range(200):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", client.port))
        await loop.sock_sendall(sock, request)
        sock.close()  # RST, maybe before, during or after the handler's queries
    await until(lambda: len(client.app[HUB]) == 0, what="every subscription released")
    stream = await open_stream(client, agent.token)
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)


async def test_listener_survives_a_bug_in_its_connect_hook(database_url: str) -> None:
    """An unexpected exception after connecting is logged and followed by a reconnect."""
    calls = 0

    def on_connect() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected bug")

    router = Router({"prebuild_claimed": lambda *_: None})
    notifier = Notifier(database_url)
    listener = Listener(database_url, router, on_connect, notifier.notify, backoff_floor=0.01)
    task = asyncio.create_task(listener.run())
    try:
        await until(lambda: calls == 2 and listener.connected, what="reconnected after the bug")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await notifier.close()


async def test_a_deaf_listener_is_replaced(database_url: str, conn: asyncpg.Connection) -> None:
    """A LISTEN connection that answers queries but never hears its echo (as behind a
    transaction-pooling PgBouncer) is reported with the likely cause and replaced."""
    connects = 0

    def on_connect() -> None:
        nonlocal connects
        connects += 1

    async def echo_elsewhere(token: str) -> None:  # the NOTIFY goes out, but is never heard
        await conn.execute("SELECT pg_notify('nobody_listens', $1)", token)

    router = Router({"prebuild_claimed": lambda *_: None})
    listener = Listener(
        database_url, router, on_connect, echo_elsewhere, probe_interval=0.05, probe_timeout=0.2
    )
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(listener.run())
        try:
            await until(lambda: connects >= 2, timeout=10, what="replaced after missed echoes")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    deaf = [entry for entry in logs if entry["event"] == "listener_deaf"]
    assert deaf
    assert deaf[0]["log_level"] == "error"
    assert "PgBouncer" in deaf[0]["hint"]


@pytest.mark.internals
@on_every_path
async def test_while_the_database_is_away_requests_get_503_and_streams_keep_pinging(
    make_server: ServerFactory, proxy: TcpProxy, sql: Sql
) -> None:
    """Everything goes through a proxy that then refuses: new requests get 503 JSON with
    Retry-After (no 500, one log line for many requests), an open stream keeps its pings, and
    a claim made during the outage reaches it once the database is back."""
    client = await make_server(
        database_url=proxy.url, listen_database_url=proxy.url, ping_interval=0.2
    )
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    proxy.refuse = True
    proxy.drop_all()
    await until(lambda: not client.app[LISTENER].connected)
    with structlog.testing.capture_logs() as logs:
        answers = [
            await client.get(
                REINIT, params={"wait": "true"}, headers={"Coder-Session-Token": agent.token}
            )
            for _ in range(10)
        ]
    assert {answer.status for answer in answers} == {503}
    assert all(answer.headers["Retry-After"] == "5" for answer in answers)
    assert (await answers[0].json())["message"] == "Service unavailable."
    assert [entry["event"] for entry in logs].count("database_unavailable") == 1
    assert not any(
        entry["log_level"] == "error" and entry["event"] == "request_failed" for entry in logs
    )
    for _ in range(2):
        assert (await stream.frame(timeout=5)).event == "ping"
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)  # its NOTIFY is lost: nobody listens
    proxy.refuse = False
    frame = await stream.event(timeout=15)  # the resync after the reconnect finds it
    assert frame.data == claimed(agent.workspace_id, owner)


async def test_readyz_has_its_own_connection_when_the_pool_is_exhausted(client: Client) -> None:
    """Every pooled connection busy (a storm of connects): /readyz still answers 200, since its
    echo NOTIFY goes through a connection of its own."""
    pool = client.app[POOL]
    client.app[READINESS].cache_for = 0  # every /readyz a fresh echo
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        response = await client.get("/readyz")
        assert response.status == 200, await response.text()
    finally:
        for conn in held:
            await pool.release(conn)


UNAVAILABLE = {
    "message": "Service unavailable.",
    "detail": "The database does not answer; retry shortly (open streams are kept).",
}


async def test_a_partition_gets_503_within_the_query_timeout_and_loses_no_claim(
    make_server: ServerFactory, proxy: TcpProxy, sql: Sql
) -> None:
    """A partition (nothing forwarded, every socket left open, as with a host that drops
    packets): a connect gets 503 within the query timeout, not after TCP gives up, and a claim
    made meanwhile reaches the waiting agent once new connections go through (the listener
    reconnects; the resync's read that takes a dead pooled connection times out, is retried)."""
    client = await make_server(
        database_url=proxy.url,
        listen_database_url=proxy.url,
        query_timeout=1.0,
        connect_timeout=1.0,
    )
    agent, other = await sql.prebuild(), await sql.prebuild()
    stream = await open_stream(client, agent.token)
    proxy.freeze()
    started = time.monotonic()
    async with asyncio.timeout(10):
        response = await client.get(
            REINIT, params={"wait": "true"}, headers={"Coder-Session-Token": other.token}
        )
    assert response.status == 503
    assert time.monotonic() - started < 1.8
    assert response.headers["Retry-After"] == "5"
    assert await response.json() == UNAVAILABLE
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)  # its NOTIFY reaches no listener
    proxy.thaw()
    assert (await stream.event(timeout=15)).data == claimed(agent.workspace_id, owner)


async def test_a_doorbell_read_on_a_partitioned_connection_is_retried(
    make_server: ServerFactory, proxy: TcpProxy, sql: Sql, database_url: str
) -> None:
    """The listener hears a claim, but the pooled connection its read takes is partitioned:
    the read times out, the doorbell is kept (no traceback: the database is away) and read
    again on a fresh connection."""
    client = await make_server(
        database_url=proxy.url,
        listen_database_url=database_url,
        query_timeout=1.0,
        connect_timeout=1.0,
    )
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    notified = sample("reinitd_events_delivered_total", path="notify")
    proxy.freeze()
    owner = await sql.user()
    with structlog.testing.capture_logs() as logs:
        await sql.claim(agent.workspace_id, owner)
        proxy.thaw()  # too late for the pooled connections: they stay silent
        assert (await stream.event(timeout=15)).data == claimed(agent.workspace_id, owner)
    assert sample("reinitd_events_delivered_total", path="notify") == notified + 1
    events = [entry["event"] for entry in logs]
    assert "read_failed" in events
    assert "read_error" not in events


async def test_a_query_postgresql_refuses_is_a_500_with_its_traceback_not_a_503(
    make_server: ServerFactory, sql: Sql, conn: asyncpg.Connection, postgres: Cluster
) -> None:
    """A missing grant (the server's role may call the token function but not read
    claim_state) is a misconfiguration, not an outage: a connect gets 500 with its traceback
    logged, never `503 The database does not answer`, and a doorbell read refused the same way
    logs its traceback too."""
    url = await login_role(conn, postgres, "ungranted")
    role = urllib.parse.urlsplit(url).username
    for grant in (
        "GRANT USAGE ON SCHEMA reinitd TO %I",
        "GRANT EXECUTE ON FUNCTION reinitd.agent_by_token_hash(bytea) TO %I",
        "GRANT EXECUTE ON FUNCTION reinitd.agents_by_token_hashes(bytea[]) TO %I",
    ):
        await conn.execute(await conn.fetchval("SELECT format($1, $2::text)", grant, role))
    client = await make_server(database_url=url)
    agent = await sql.prebuild()
    # A waiter for the doorbell to read for (no connect can register one on this role).
    waiter = client.app[HUB].subscribe(agent.workspace_id, wait=True)
    with structlog.testing.capture_logs() as logs:
        response = await client.get(
            REINIT, params={"wait": "true"}, headers={"Coder-Session-Token": agent.token}
        )
        await sql.notify(str(agent.workspace_id))  # its read needs claim_state too
        await until(lambda: any(entry["event"] == "read_error" for entry in logs))
    assert response.status == 500
    assert (await response.json())["message"] == "Internal server error."
    errors = {entry["event"] for entry in logs if entry.get("exc_info")}
    assert {"request_failed", "read_error"} <= errors
    assert "database_unavailable" not in {entry["event"] for entry in logs}
    client.app[HUB].remove(waiter)


async def test_a_flapping_listener_still_gets_every_workspace_resynced(
    make_server: ServerFactory,
    proxy: TcpProxy,
    sql: Sql,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claim whose NOTIFY was lost, for the oldest of several waiting workspaces, while the
    listener keeps reconnecting (a resync asked for during every read of one workspace): each
    resync resumes with what the last one had not read, so the oldest is read too."""
    monkeypatch.setattr(doorbell_module, "RESYNC_CHUNK", 1)
    client = await proxied_server(make_server, proxy)
    agents = [await sql.prebuild() for _ in range(4)]
    streams = [await open_stream(client, agent.token) for agent in agents]
    doorbell, listener = client.app[DOORBELL], client.app[LISTENER]
    read = doorbell._read_verdicts

    async def flapping(workspace_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Verdict]:
        doorbell.ring_all()  # what the listener does after every reconnect
        return await read(workspace_ids)

    proxy.refuse = True  # hold the reconnect until the claim has been committed
    assert listener.connection is not None
    await conn.fetchval("SELECT pg_terminate_backend($1)", listener.connection.get_server_pid())
    await until(lambda: not listener.connected, what="listener noticed the kill")
    owner = await sql.user()
    await sql.claim(agents[0].workspace_id, owner)  # announced to nobody
    monkeypatch.setattr(doorbell, "_read_verdicts", flapping)
    proxy.refuse = False
    frame = await streams[0].event(timeout=10)
    monkeypatch.setattr(doorbell, "_read_verdicts", read)
    assert frame.data == claimed(agents[0].workspace_id, owner)
