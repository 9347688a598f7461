"""Hostile input and least privilege: limits, the OpenAPI contract, database roles, fuzzing."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import uuid

import asyncpg
import pytest
import structlog

from reinitd.server.embedded import Cluster
from reinitd.server.handler import OPENAPI
from tests.support import (
    REINIT,
    Client,
    Provisioned,
    ServerFactory,
    Sql,
    SseReader,
    login_role,
    open_stream,
    readyz_status,
    sample,
)


async def test_streams_per_agent_are_limited(make_server: ServerFactory, sql: Sql) -> None:
    """An agent holds at most N streams; the next gets 429 JSON; closing one frees a slot."""
    client = await make_server(max_streams_per_agent=3)
    agent = await sql.prebuild()
    streams = [await open_stream(client, agent.token) for _ in range(3)]
    refused = await client.get(REINIT, headers={"Coder-Session-Token": agent.token})
    assert refused.status == 429
    body = await refused.json()
    assert set(body) == {"message", "detail"}
    assert agent.token not in json.dumps(body)
    streams[0].response.close()
    async with asyncio.timeout(5):
        while (
            again := await client.get(REINIT, headers={"Coder-Session-Token": agent.token})
        ).status == 429:
            again.close()
            await asyncio.sleep(0.05)
    assert again.status == 200
    other = await sql.prebuild()
    assert (await open_stream(client, other.token)).response.status == 200


async def test_global_stream_cap_answers_503_with_retry_after(
    make_server: ServerFactory, sql: Sql
) -> None:
    """Beyond the process's stream cap: 503, Retry-After, JSON, counted."""
    client = await make_server(max_streams=2)
    agents = [await sql.prebuild() for _ in range(3)]
    for agent in agents[:2]:
        await open_stream(client, agent.token)
    before = sample("reinitd_refusals_total", reason="server_full")
    refused = await client.get(REINIT, headers={"Coder-Session-Token": agents[2].token})
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "5"
    assert (await refused.json())["message"] == "Too many open streams."
    assert sample("reinitd_refusals_total", reason="server_full") == before + 1


async def test_slowloris_client_is_disconnected(make_server: ServerFactory) -> None:
    """A client that never finishes its request headers is cut off after the header timeout."""
    client = await make_server(header_timeout=0.3)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", client.port))
    await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        assert await asyncio.wait_for(loop.sock_recv(sock, 1024), 5) == b""
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("line", "headers"),
    [
        (f"GET {REINIT}?wait=true&pad={'x' * 9000} HTTP/1.1", ""),
        (f"GET {REINIT} HTTP/1.1", f"X-Big: {'y' * 9000}\r\n"),
        (f"GET {REINIT} HTTP/1.1", "".join(f"X-H{i}: v\r\n" for i in range(100))),
    ],
)
async def test_oversized_requests_are_refused(client: Client, line: str, headers: str) -> None:
    """Request lines, header fields and header counts are bounded: 4xx, never a crash."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"{line}\r\nHost: x\r\n{headers}\r\n".encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert int(status_line.split()[1]) in (400, 413, 431)
    assert (await client.get("/healthz")).status == 200


async def test_error_bodies_never_echo_the_token(client: Client) -> None:
    """A malformed or unknown token is not repeated back in the error body."""
    for token in ("not-a-uuid-secret-value", str(uuid.uuid4())):
        response = await client.get(REINIT, headers={"Coder-Session-Token": token})
        assert response.status == 401
        assert token not in await response.text()
        assert "Set-Cookie" not in response.headers


# --- the OpenAPI contract ----------------------------------------------------------------------


async def test_openapi_document_covers_every_route(client: Client) -> None:
    """Every route the app serves is in the document served at /api/v2/openapi.json, and back."""
    served = await (await client.get("/api/v2/openapi.json")).json()
    assert served == json.loads(OPENAPI)
    documented = {(path, method.upper()) for path, ops in served["paths"].items() for method in ops}
    routes = {
        (route.resource.canonical, route.method)
        for route in client.app.router.routes()
        if route.resource is not None
    }
    assert routes == documented


async def test_responses_match_the_documented_statuses(client: Client, sql: Sql) -> None:
    """Each status the reinit endpoint answers with is documented, with its content type."""
    doc = json.loads(OPENAPI)["paths"][REINIT]["get"]["responses"]
    agent = await sql.workspace(await sql.user())
    cases = [
        ({}, {}),
        ({"Coder-Session-Token": agent.token}, {"wait": "true"}),
        ({"Coder-Session-Token": agent.token, "Accept": "application/json"}, {"timeout": "x"}),
        ({"Coder-Session-Token": agent.token, "Accept": "application/json"}, {"timeout": "0"}),
    ]
    for headers, params in cases:
        response = await client.get(REINIT, headers=headers, params=params)
        assert str(response.status) in doc
        if response.status >= 400:
            assert response.content_type == "application/json"
            assert set(await response.json()) == {"message", "detail"}


# --- least privilege in PostgreSQL --------------------------------------------------------


@pytest.fixture
async def server_role_url(postgres: Cluster, conn: asyncpg.Connection) -> str:
    """A login role that is a member of reinitd_server, and nothing else."""
    return await login_role(conn, postgres, "srv", "reinitd_server")


async def test_server_works_under_its_least_privileged_role(
    make_server: ServerFactory, sql: Sql, server_role_url: str
) -> None:
    """`reinitd serve` as reinitd_server: waits, delivers claims, answers 409s, is ready."""
    client = await make_server(database_url=server_role_url)
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    assert (await stream.event()).data == {
        "workspace_id": str(agent.workspace_id),
        "reason": "prebuild_claimed",
        "owner_id": str(owner),
    }
    regular = await sql.workspace(owner)
    refused = await client.get(
        REINIT, params={"wait": "true"}, headers={"Coder-Session-Token": regular.token}
    )
    assert refused.status == 409
    await readyz_status(client, 200, timeout=5)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT reinitd.claim_prebuild(gen_random_uuid(), gen_random_uuid())",
        "SELECT * FROM reinitd.create_prebuild('sneaky')",
        "SELECT token_hash FROM reinitd.workspace_agents",
        "SELECT * FROM reinitd.users",
        "UPDATE reinitd.workspaces SET name = 'x'",
        "SELECT reinitd.complete_build(gen_random_uuid())",
    ],
)
async def test_server_role_cannot_claim_or_read_secrets(
    server_role_url: str, statement: str
) -> None:
    """reinitd_server can neither claim/provision nor read token hashes or other tables."""
    conn: asyncpg.Connection = await asyncpg.connect(server_role_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_operator_role_claims_through_the_api_only(
    postgres: Cluster, conn: asyncpg.Connection, sql: Sql
) -> None:
    """reinitd_operator provisions and claims via the functions but cannot read token hashes."""
    operator: asyncpg.Connection = await asyncpg.connect(
        await login_role(conn, postgres, "op", "reinitd_operator")
    )
    try:
        op = Sql(operator)
        agent = await op.prebuild()
        await op.claim(agent.workspace_id, await op.user())
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await operator.execute("SELECT token_hash FROM reinitd.workspace_agents")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await operator.execute("DELETE FROM reinitd.workspaces")
    finally:
        await operator.close()


def garbage(rng: random.Random) -> str:
    """A random payload: text, near-miss JSON events, or bare near-UUIDs."""
    kind = rng.randrange(4)
    if kind == 0:
        return "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(rng.randrange(300)))
    if kind == 1:
        return json.dumps(
            {
                "workspace_id": str(uuid.UUID(int=rng.getrandbits(128)))[:-1],
                "reason": rng.choice(["prebuild_claimed", "x", None]),
            }
        )
    if kind == 2:
        return json.dumps({"workspace_id": rng.random(), "owner_id": [1, 2]})
    return str(uuid.UUID(int=rng.getrandbits(128))) + rng.choice(["", "x", "}"])


async def test_garbage_notifies_under_load_disturb_no_one(client: Client, sql: Sql) -> None:
    """Random payloads while 50 agents wait: every agent still gets exactly its own claim."""
    agents = [await sql.prebuild() for _ in range(50)]
    streams = [await open_stream(client, a.token) for a in agents]
    rng = random.Random(7)
    owner = await sql.user()
    for i in range(200):
        await sql.notify(garbage(rng))
        if i % 4 == 0:
            await sql.claim(agents[i // 4].workspace_id, owner)
    for agent, stream in zip(agents, streams, strict=True):
        frame = await stream.event()
        assert frame.data is not None
        assert frame.data["workspace_id"] == str(agent.workspace_id)


async def test_garbage_flood_is_counted_but_logged_sparingly(client: Client, sql: Sql) -> None:
    """100 garbage NOTIFYs: all counted, one log line per kind, with the others suppressed."""
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    before = sample("reinitd_claim_payloads_invalid_total", kind="bad_json")
    with structlog.testing.capture_logs() as logs:
        for _ in range(100):
            await sql.notify("{not json")
        await assert_delivered_after(sql, agent, stream)
    assert sample("reinitd_claim_payloads_invalid_total", kind="bad_json") == before + 100
    invalid = [entry for entry in logs if entry["event"] == "claim_payload_invalid"]
    assert len(invalid) == 1


async def assert_delivered_after(sql: Sql, agent: Provisioned, stream: SseReader) -> None:
    """A claim committed now reaches the stream: everything before it was dispatched."""
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    frame = await stream.event()
    assert frame.data is not None
    assert frame.data["owner_id"] == str(owner)
