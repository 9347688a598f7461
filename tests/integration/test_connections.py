"""Hostile connections: idle-socket floods, silent sockets, requests the HTTP parser rejects,
and clients hanging up, against real sockets and a real `reinitd serve`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reinitd.server import connection
from reinitd.server.keys import ADMISSION, HUB
from tests.support import (
    REINIT,
    ServerFactory,
    ServerProcess,
    Sql,
    after_read,
    claimed,
    open_stream,
    sample,
    server_process,
    until,
)

# On the private paths of reinitd.server.internals and on their public fallbacks.
on_every_path = pytest.mark.parametrize("internals_mode", ["auto", "public"], indirect=True)


async def raw_socket(port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    return sock


async def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the server has closed (or reset) the connection; False if it stays open."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, 1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@contextlib.asynccontextmanager
async def sockets(port: int, count: int) -> AsyncIterator[list[socket.socket]]:
    opened = [await raw_socket(port) for _ in range(count)]
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


async def test_idle_sockets_at_the_budget_make_room_for_a_probe(
    make_server: ServerFactory,
) -> None:
    """With the budget full of idle sockets, /healthz still answers: the socket idle the
    longest is closed to make room, and counted."""
    client = await make_server(max_connections=10)
    port = client.port
    assert port is not None
    before = sample("reinitd_connections_closed_total", reason="evicted")
    async with sockets(port, 12) as idle:
        response = await client.get("/healthz")
        assert response.status == 200
        assert await closed_by_server(idle[0])
    assert sample("reinitd_connections_closed_total", reason="evicted") >= before + 1


@pytest.mark.internals
@on_every_path
async def test_beyond_the_budget_with_only_streams_a_newcomer_is_shed(
    make_server: ServerFactory, sql: Sql
) -> None:
    """Streams are never closed to make room: with the budget full of streams, a new
    connection is shed (closed at once, counted), and the streams still get their claims."""
    client = await make_server(max_connections=5)
    port = client.port
    assert port is not None
    agents = [await sql.prebuild(f"budget-{i}") for i in range(5)]
    streams = [await open_stream(client, agent.token) for agent in agents]
    before = sample("reinitd_connections_closed_total", reason="shed")
    async with sockets(port, 1) as [newcomer]:
        assert await closed_by_server(newcomer)
    assert sample("reinitd_connections_closed_total", reason="shed") == before + 1
    owner = await sql.user()
    await sql.claim(agents[0].workspace_id, owner)
    assert (await streams[0].event()).data is not None


async def test_a_socket_that_never_speaks_is_closed(make_server: ServerFactory) -> None:
    """A connection that sends no byte before the first-byte deadline is closed and counted;
    one that has started its request is left to the header timeout."""
    client = await make_server(first_byte_timeout=0.3)
    port = client.port
    assert port is not None
    before = sample("reinitd_connections_closed_total", reason="silent")
    async with sockets(port, 2) as [silent, talking]:
        await asyncio.get_running_loop().sock_sendall(talking, b"GET /healthz HTTP/1.1\r\n")
        assert await closed_by_server(silent)
        assert not await closed_by_server(talking, timeout=0.5)
    assert sample("reinitd_connections_closed_total", reason="silent") == before + 1


# --- a real server process: what reaches its log ---------------------------------------------


@pytest.fixture
async def served(database_url: str, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    async with server_process(database_url, tmp_path) as server:
        yield server


async def exchange(port: int, payload: bytes) -> bytes:
    """Send raw bytes, return whatever the server answers before it closes (5 s at most)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def token_bearing_garbage(token: str) -> dict[str, bytes]:
    pad = "x" * 9000
    return {
        "control character in the token header": (
            f"GET {REINIT} HTTP/1.1\r\nHost: r\r\nCoder-Session-Token: {token}\x01\r\n\r\n"
        ).encode(),
        "request line over 8190 bytes": (
            f"GET {REINIT}?coder_session_token={token}&pad={pad} HTTP/1.1\r\nHost: r\r\n\r\n"
        ).encode(),
        "DEL in the query": (
            f"GET {REINIT}?coder_session_token={token}&x=\x7f HTTP/1.1\r\nHost: r\r\n\r\n"
        ).encode(),
        "cookie over 8190 bytes": (
            f"GET {REINIT} HTTP/1.1\r\nHost: r\r\nCookie: coder_session_token={token}; p={pad}"
            "\r\n\r\n"
        ).encode(),
    }


async def test_rejected_requests_never_put_a_token_in_the_log(
    served: ServerProcess, sql: Sql
) -> None:
    """Each request the HTTP parser rejects gets a JSON 400, and neither the token nor its
    sha256 appears anywhere in the server's log."""
    agent = await sql.prebuild()
    for name, payload in token_bearing_garbage(agent.token).items():
        answer = await exchange(served.port, payload)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"400", (name, answer[:200])
        assert b"application/json" in head, name
        assert json.loads(body)["message"] == "Bad request.", name
    await get_readyz(served)  # everything above has been logged by now
    text = served.log_path.read_text(errors="replace").lower()
    digest = hashlib.sha256(agent.token.encode()).hexdigest()
    assert agent.token.lower() not in text
    assert digest not in text
    assert "request_refused" in text


async def get_readyz(server: ServerProcess) -> None:
    await exchange(server.port, b"GET /readyz HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")


async def test_a_thousand_malformed_requests_cost_a_few_log_lines(served: ServerProcess) -> None:
    """1 000 requests the parser rejects are each answered 400, and add a bounded number of
    log lines: no access line each, a refusal line at most once per interval."""
    await get_readyz(served)
    before = len(served.log_path.read_text().splitlines())
    limit = asyncio.Semaphore(50)

    async def one(i: int) -> bytes:
        async with limit:
            return await exchange(served.port, f"BREW /{i} HTCPCP/1.0\r\n\x00\r\n\r\n".encode())

    replies = await asyncio.gather(*(one(i) for i in range(1000)))
    assert {reply.split(b" ", 2)[1] for reply in replies} == {b"400"}
    await get_readyz(served)
    added = served.log_path.read_text().splitlines()[before:]
    refusals = [line for line in added if "request_refused" in line]
    assert 1 <= len(refusals) <= 2, refusals
    assert len(added) <= 10, added  # the refusal lines, the probes' access lines


async def test_a_storm_of_hang_ups_is_no_server_error(served: ServerProcess, sql: Sql) -> None:
    """Agents resetting at random instants: no 5xx in the metrics, no ERROR in the log."""
    agents = [await sql.prebuild(f"hangup-{i}") for i in range(10)]
    rng = random.Random(11)
    limit = asyncio.Semaphore(50)
    loop = asyncio.get_running_loop()

    async def one(i: int) -> None:
        async with limit:
            sock = await raw_socket(served.port)
            token = agents[i % len(agents)].token
            request = (
                f"GET {REINIT}?wait=true HTTP/1.1\r\nHost: r\r\n"
                f"Coder-Session-Token: {token}\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, request.encode())
                await asyncio.sleep(rng.uniform(0, 0.01))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    await asyncio.gather(*(one(i) for i in range(1500)))
    reply = await exchange(
        served.port, b"GET /metrics HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    )
    metrics = reply.partition(b"\r\n\r\n")[2].decode()
    errors = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "reinitd_responses_total" and sample.labels["status"].startswith("5")
    }
    assert set(errors.values()) == {0.0}, errors
    assert all(event.get("level") != "error" for event in served.log_events())


async def test_requests_in_flight_are_bounded_and_probes_never_wait(
    make_server: ServerFactory, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MAX_IN_FLIGHT requests held in the durable check, the next connect's bytes wait
    unread (nothing allocated for them) until one finishes; /healthz is served meanwhile, a
    flood of idle sockets at the budget is closed before a waiting agent, and every waiting
    agent gets its stream once the first ones go through."""
    monkeypatch.setattr(connection, "MAX_IN_FLIGHT", 2)
    client = await make_server(max_connections=10)
    agents = [await sql.prebuild(f"in-flight-{i}") for i in range(4)]
    gate, inside = asyncio.Event(), asyncio.Queue[uuid.UUID]()

    async def hold(workspace_id: uuid.UUID) -> None:
        inside.put_nowait(workspace_id)
        await gate.wait()

    after_read(client.app[ADMISSION], hold)
    opening = [asyncio.ensure_future(open_stream(client, a.token)) for a in agents]
    # The first connect's read is held; the second waits for it (one read in flight): both are
    # in the durable check, each holding one of the two places.
    await asyncio.wait_for(inside.get(), 5)
    server = client.server.runner.server if client.server.runner else None
    assert isinstance(server, connection.GuardedServer)
    await until(lambda: server.waiting == 2, what="the third and fourth connects wait unread")
    assert (await client.get("/healthz")).status == 200
    assert inside.empty()
    assert client.app[ADMISSION].in_use == 2
    assert client.port is not None
    async with sockets(client.port, 8) as idle:
        assert await closed_by_server(idle[0])  # the budget was exceeded: the oldest idle went
        gate.set()
        streams = await asyncio.wait_for(asyncio.gather(*opening), 10)
    assert len(streams) == 4
    assert len(client.app[HUB]) == 4


async def test_long_polls_and_trickled_heads_never_hold_back_a_new_connect(
    make_server: ServerFactory, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission smooths storms, it is no cap a client can fill: long-polls let the next
    connect in once they wait, and first bytes without a whole request head (a slowloris) take
    no place at all; an agent's stream still opens at once."""
    monkeypatch.setattr(connection, "MAX_IN_FLIGHT", 2)
    client = await make_server()
    server = client.server.runner.server if client.server.runner else None
    assert isinstance(server, connection.GuardedServer)
    pollers = [await sql.prebuild(f"poll-{i}") for i in range(3)]
    polls = [
        asyncio.ensure_future(
            client.get(
                REINIT,
                params={"wait": "true", "timeout": "30"},
                headers={"Coder-Session-Token": a.token, "Accept": "application/json"},
            )
        )
        for a in pollers
    ]
    await until(lambda: len(client.app[HUB]) == 3, what="three long-polls waiting")
    assert server.in_flight == 0
    assert client.server.port is not None
    async with sockets(client.server.port, 5) as trickling:
        for sock in trickling:
            sock.send(b"G")
        # Their first bytes are in (3 long-polls and these 5 have spoken), and took no place.
        await until(
            lambda: sum(getattr(h, "spoke", False) for h in server.connections) == 8,
            what="the trickled first bytes received",
        )
        assert server.in_flight == 0
        agent = await sql.prebuild("agent")
        stream = await asyncio.wait_for(open_stream(client, agent.token), 5)
        owner = await sql.user()
        await sql.claim(agent.workspace_id, owner)
        assert (await stream.event()).data == claimed(agent.workspace_id, owner)
    for poll in polls:
        poll.cancel()
    await asyncio.gather(*polls, return_exceptions=True)


async def test_accepted_connections_keep_tcp_keepalive(served: ServerProcess) -> None:
    """The server sets SO_KEEPALIVE once, on its listening socket, not per connection: every
    accepted connection still has it (a dead peer behind a silent network is found)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # accepted, served, kept open
        # /proc/net/tcp: local address, remote, state (01 established), queues, then the
        # timer's kind (02: keepalive, 00: none) for the server's side of this connection.
        rows = [
            line.split()
            for line in (await asyncio.to_thread(Path("/proc/net/tcp").read_text)).splitlines()[1:]
            if line.split()[1].endswith(f":{served.port:04X}") and line.split()[3] == "01"
        ]
    finally:
        writer.close()
    assert len(rows) == 1, rows
    assert rows[0][5].startswith("02:"), rows[0]


@pytest.mark.internals
@on_every_path
async def test_an_http_1_0_client_reads_plain_frames_until_the_connection_closes(
    make_server: ServerFactory, sql: Sql
) -> None:
    """HTTP/1.0 has no chunked encoding (nginx proxies with it unless told otherwise): the
    stream's body is the frames as they are, ended by closing the connection."""
    client = await make_server()
    agent = await sql.prebuild("http10")
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        f"GET {REINIT}?wait=true HTTP/1.0\r\nCoder-Session-Token: {agent.token}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"transfer-encoding" not in head.lower()
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    frame = await asyncio.wait_for(reader.readuntil(b"event: data\n"), 5)
    assert all(line.startswith(b"event: ") or line == b"" for line in frame.split(b"\n")), frame
    data = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
    assert data.startswith(b"data: ")
    assert json.loads(data[len(b"data: ") :]) == claimed(agent.workspace_id, owner)
    writer.close()


async def test_a_connect_waiting_for_admission_outlives_the_header_timeout(
    make_server: ServerFactory, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection whose whole request head waits for a place (a storm longer than the
    header timeout) is served when its turn comes, not closed unanswered."""
    monkeypatch.setattr(connection, "MAX_IN_FLIGHT", 1)
    client = await make_server(header_timeout=0.5)
    first, second = await sql.prebuild("first"), await sql.prebuild("second")
    inside, release = asyncio.Event(), asyncio.Event()

    async def hold(_workspace_id: uuid.UUID) -> None:
        if not inside.is_set():
            inside.set()
            await release.wait()

    after_read(client.app[ADMISSION], hold)
    opening = [asyncio.ensure_future(open_stream(client, a.token)) for a in (first, second)]
    await asyncio.wait_for(inside.wait(), 5)
    server = client.server.runner.server if client.server.runner else None
    assert isinstance(server, connection.GuardedServer)
    await until(lambda: server.waiting == 1, what="the second connect waits for a place")
    # A witness connected after it, with half a request head: once the header timeout has
    # closed the witness, it would have closed the waiting connection too.
    async with sockets(client.port or 0, 1) as [witness]:
        witness.send(b"GET /healthz HTTP/1.1\r\n")
        assert await closed_by_server(witness)
    release.set()
    streams = await asyncio.wait_for(asyncio.gather(*opening), 10)
    assert len(streams) == 2
