"""Admission as one unit: every slot and subscription a request takes is given back, whatever
the client does, and the caps hold exactly under bursts."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import uuid

from reinitd.server.keys import ADMISSION, HUB
from tests.support import (
    REINIT,
    Client,
    ServerFactory,
    Sql,
    SseReader,
    after_read,
    claimed,
    open_stream,
    sample,
    until,
)


def request_bytes(token: str, *, wait: bool = True) -> bytes:
    query = "?wait=true" if wait else ""
    return (
        f"GET {REINIT}{query} HTTP/1.1\r\nHost: reinitd\r\nCoder-Session-Token: {token}\r\n\r\n"
    ).encode()


async def send_then_reset(port: int, payload: bytes, delay: float) -> None:
    """Connect, send a request, wait `delay`, then hang up with a TCP reset."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, payload)
        await asyncio.sleep(delay)
    except OSError:
        pass
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def assert_nothing_held(client: Client) -> None:
    admission, hub = client.app[ADMISSION], client.app[HUB]
    await until(
        lambda: admission.in_use == 0 and admission.agent_slots == 0 and len(hub) == 0,
        timeout=10,
        what=f"leaked: {admission.in_use} slots, {admission.agent_slots}, {len(hub)} subs",
    )


async def test_resets_at_random_instants_leave_nothing_behind(
    make_server: ServerFactory, sql: Sql
) -> None:
    """2 000 requests over 20 tokens, each reset after 0-15 ms: afterwards no slot or
    subscription is held, and every token can open its full quota again."""
    quota = 4
    client = await make_server(max_streams_per_agent=quota)
    agents = [await sql.prebuild(f"reset-{i}") for i in range(20)]
    port = client.port
    assert port is not None
    baseline = sample("reinitd_admission_slots")
    rng = random.Random(10)
    limit = asyncio.Semaphore(100)

    async def one(i: int) -> None:
        async with limit:
            agent = agents[i % len(agents)]
            await send_then_reset(port, request_bytes(agent.token), rng.uniform(0, 0.015))

    await asyncio.gather(*(one(i) for i in range(2000)))
    await assert_nothing_held(client)
    assert sample("reinitd_admission_slots") == baseline
    for agent in agents:
        for _ in range(quota):
            await open_stream(client, agent.token)
        refused = await client.get(REINIT, headers={"Coder-Session-Token": agent.token})
        assert refused.status == 429


async def test_hang_up_during_admission_gives_everything_back(
    make_server: ServerFactory, sql: Sql
) -> None:
    """A client gone while its request waits between the read and the registration: the
    handler is cancelled there, and its slot is released (and nothing registered later)."""
    client = await make_server()
    agent = await sql.prebuild()
    inside, release = asyncio.Event(), asyncio.Event()

    async def stall(_workspace_id: uuid.UUID) -> None:
        inside.set()
        await release.wait()

    after_read(client.app[ADMISSION], stall)
    port = client.port
    assert port is not None
    hang_up = asyncio.create_task(send_then_reset(port, request_bytes(agent.token), 30))
    await asyncio.wait_for(inside.wait(), 5)
    assert client.app[ADMISSION].in_use == 1
    assert len(client.app[HUB]) == 0  # it registers after the read
    hang_up.cancel()  # its finally resets the connection
    await asyncio.gather(hang_up, return_exceptions=True)
    await assert_nothing_held(client)


async def test_a_burst_of_ten_times_the_cap_never_exceeds_it(
    make_server: ServerFactory, sql: Sql
) -> None:
    """200 concurrent requests against a cap of 20: exactly 20 streams open, the rest get 503,
    and at no instant does the server hold more than 20."""
    cap = 20
    client = await make_server(max_streams=cap)
    agents = [await sql.prebuild(f"burst-{i}") for i in range(25)]
    admission = client.app[ADMISSION]
    peak = 0

    async def observe(_workspace_id: uuid.UUID) -> None:
        nonlocal peak
        peak = max(peak, admission.in_use, len(client.app[HUB]))
        await asyncio.sleep(0)

    after_read(admission, observe)
    responses = await asyncio.gather(
        *(
            client.get(REINIT, params={"wait": "true"}, headers={"Coder-Session-Token": a.token})
            for a in agents
            for _ in range(8)
        )
    )
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == cap
    assert statuses.count(503) == len(responses) - cap
    assert peak <= cap
    assert admission.in_use == cap
    for response in responses:
        response.close()
    await assert_nothing_held(client)


async def test_a_connect_whose_read_spans_the_shutdown_gets_a_503_not_a_stream(
    make_server: ServerFactory, sql: Sql
) -> None:
    """Shutdown ends every open stream; a request still in its durable check then is refused
    with 503 and Retry-After (retry elsewhere), not opened as a stream nobody will end."""
    client = await make_server()
    agent = await sql.prebuild("late")
    inside, release = asyncio.Event(), asyncio.Event()

    async def stall(_workspace_id: uuid.UUID) -> None:
        inside.set()
        await release.wait()

    after_read(client.app[ADMISSION], stall)
    opening = asyncio.ensure_future(
        client.get(REINIT, params={"wait": "true"}, headers={"Coder-Session-Token": agent.token})
    )
    await asyncio.wait_for(inside.wait(), 5)
    await client.app.shutdown()  # what aiohttp runs first when the server stops
    release.set()
    response = await asyncio.wait_for(opening, 5)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert (await response.json())["message"] == "Service unavailable."
    await assert_nothing_held(client)


async def test_connects_read_together_each_get_their_own_answer(
    make_server: ServerFactory, sql: Sql
) -> None:
    """40 connects at once (30 known tokens, 10 unknown) are read in shared round trips: each
    known one gets a stream on its own workspace, each unknown one a 401."""
    client = await make_server()
    agents = [await sql.prebuild(f"batch-{i}") for i in range(30)]
    unknown = [str(uuid.uuid4()) for _ in range(10)]
    reads = sample("reinitd_connect_read_batch_size_count")
    carried = sample("reinitd_connect_read_batch_size_sum")
    responses = await asyncio.gather(
        *(
            client.get(REINIT, params={"wait": "true"}, headers={"Coder-Session-Token": token})
            for token in [a.token for a in agents] + unknown
        )
    )
    assert [r.status for r in responses] == [200] * 30 + [401] * 10
    assert sample("reinitd_connect_read_batch_size_sum") - carried == 40
    assert sample("reinitd_connect_read_batch_size_count") - reads < 40  # some shared a read
    owner = await sql.user()
    for agent, response in zip(agents, responses, strict=False):
        await sql.claim(agent.workspace_id, owner)
        assert (await SseReader(response).event()).data == claimed(agent.workspace_id, owner)
    for response in responses:
        response.close()
