"""The reinit endpoint against a real PostgreSQL: every rule of docs/protocol.md §4, byte-exact
frames."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from reinitd.server import metrics
from reinitd.server.embedded import Cluster
from reinitd.server.keys import ADMISSION
from tests.support import (
    REINIT,
    Client,
    ServerFactory,
    Sql,
    SseReader,
    after_read,
    assert_no_more_events,
    claimed,
    notifies_applied,
    open_stream,
    sample,
)

# Every rule holds on each path of reinitd.server.internals (tests/integration/conftest.py).
pytestmark = [
    pytest.mark.internals,
    pytest.mark.parametrize("internals_mode", ["auto", "public", "unguarded"], indirect=True),
]


async def test_unclaimed_prebuild_receives_claim_via_notify(client: Client, sql: Sql) -> None:
    """An agent of an unclaimed prebuild waits, then gets the claim from the NOTIFY."""
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    frame = await stream.event()
    assert frame.event == "data"
    assert frame.data == claimed(agent.workspace_id, owner)


async def test_claimed_prebuild_gets_one_shot_event_on_reconnect(client: Client, sql: Sql) -> None:
    """A claim that happened before the request is delivered at once, exactly once."""
    agent = await sql.prebuild()
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    stream = await open_stream(client, agent.token)
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)
    await assert_no_more_events(client, stream, agent.workspace_id)


async def expect_409(client: Client, token: str, message: str) -> dict[str, str]:
    response = await client.get(
        REINIT, params={"wait": "true"}, headers={"Coder-Session-Token": token}
    )
    assert response.status == 409
    body: dict[str, str] = await response.json()
    assert body["message"] == message
    assert set(body) == {"message", "detail"}
    return body


NOT_WAITING = "Workspace is not a prebuilt workspace waiting to be claimed."


async def test_regular_workspace_gets_409(client: Client, sql: Sql) -> None:
    """A workspace that never was a prebuild is refused with wait=true."""
    agent = await sql.workspace(await sql.user())
    await expect_409(client, agent.token, NOT_WAITING)


async def test_claim_in_the_past_gets_409(client: Client, sql: Sql) -> None:
    """Once a later build followed the claim, the claim is history: 409."""
    agent = await sql.prebuild()
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    await sql.complete(await sql.start_build(agent.workspace_id, owner))
    body = await expect_409(client, agent.token, NOT_WAITING)
    assert "claimed in the past" in body["detail"]


async def test_failed_claim_gets_409_with_error_detail(client: Client, sql: Sql) -> None:
    """A failed claim build is final: 409 with the build's error as detail."""
    agent = await sql.prebuild()
    build = await sql.claim(agent.workspace_id, await sql.user(), complete=False)
    await sql.complete(build, "terraform apply: quota exceeded")
    body = await expect_409(client, agent.token, "Claim build failed permanently.")
    assert body["detail"] == "terraform apply: quota exceeded"


async def test_running_claim_waits_then_delivers(client: Client, sql: Sql) -> None:
    """A claim build still running: the stream waits for its completion's announcement."""
    agent = await sql.prebuild()
    owner = await sql.user()
    build = await sql.claim(agent.workspace_id, owner, complete=False)
    stream = await open_stream(client, agent.token)
    await sql.complete(build)
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)


async def test_running_claim_that_fails_ends_stream_with_error_frame(
    client: Client, sql: Sql
) -> None:
    """A waiting wait=true stream ends with the claim_failed error frame."""
    agent = await sql.prebuild()
    build = await sql.claim(agent.workspace_id, await sql.user(), complete=False)
    stream = await open_stream(client, agent.token)
    await sql.complete(build, "disk full")
    frame = await stream.event()
    assert frame.event == "error"
    assert frame.data == {"message": "Claim build failed permanently.", "detail": "disk full"}
    assert await stream.closed() == b""


async def test_legacy_request_never_gets_409(client: Client, sql: Sql) -> None:
    """Without wait, even a regular workspace just waits (older agents), and a NOTIFY naming
    it delivers nothing: the database says it has no claim."""
    agent = await sql.workspace(await sql.user())
    stream = await open_stream(client, agent.token, wait=False)
    await sql.notify(str(agent.workspace_id))
    await assert_no_more_events(client, stream, agent.workspace_id)


async def test_legacy_request_is_not_preseeded(client: Client, sql: Sql) -> None:
    """Without wait, a past claim is not delivered: the next frame is a later NOTIFY. (A claim
    whose NOTIFY is still on its way when the stream registers is live news to it, as in Coder's
    pubsub: so the claim's doorbell is heard first.)"""
    agent = await sql.prebuild()
    await sql.claim(agent.workspace_id, await sql.user())
    await notifies_applied(client)
    stream = await open_stream(client, agent.token, wait=False)
    await assert_no_more_events(client, stream, agent.workspace_id)


async def test_legacy_request_ignores_claim_failed(client: Client, sql: Sql) -> None:
    """claim_failed does not end a stream without wait."""
    agent = await sql.prebuild()
    build = await sql.claim(agent.workspace_id, await sql.user(), complete=False)
    stream = await open_stream(client, agent.token, wait=False)
    await sql.complete(build, "boom")
    await assert_no_more_events(client, stream, agent.workspace_id)


# --- the ordering: register, then read --------------------------------------------------


async def test_claim_between_read_and_registration_delivered_once(client: Client, sql: Sql) -> None:
    """The worst instant: a claim committed after the connect's read and its NOTIFY heard (and
    found nobody to tell) before the stream registered. The catch-up rings it again: one
    event."""
    agent = await sql.prebuild()
    owner = await sql.user()

    async def commit_claim(workspace_id: uuid.UUID) -> None:
        assert workspace_id == agent.workspace_id
        await sql.claim(workspace_id, owner)
        await notifies_applied(client)  # its doorbell has been heard, and dropped: no stream yet

    after_read(client.app[ADMISSION], commit_claim)
    before = sample("reinitd_doorbells_total", outcome="no_waiters")
    stream = await open_stream(client, agent.token)
    assert sample("reinitd_doorbells_total", outcome="no_waiters") == before + 1
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)
    await assert_no_more_events(client, stream, agent.workspace_id)


async def test_claim_committed_after_the_read_and_heard_after_registration(
    client: Client, sql: Sql
) -> None:
    """A claim committed after the read whose NOTIFY arrives once the stream is registered
    comes by its doorbell: one event."""
    agent = await sql.prebuild()
    owner = await sql.user()

    async def commit_claim(workspace_id: uuid.UUID) -> None:
        await sql.claim(workspace_id, owner)  # the NOTIFY is still on its way

    after_read(client.app[ADMISSION], commit_claim)
    stream = await open_stream(client, agent.token)
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)
    await assert_no_more_events(client, stream, agent.workspace_id)


async def test_claim_just_after_read_delivered_once(client: Client, sql: Sql) -> None:
    """A claim committed right after the read (headers sent) comes by NOTIFY: one event."""
    agent = await sql.prebuild()
    owner = await sql.user()
    stream = await open_stream(client, agent.token)  # headers arrive after the read
    await sql.claim(agent.workspace_id, owner)
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)
    await assert_no_more_events(client, stream, agent.workspace_id)


# --- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "detail_part"),
    [
        ({}, "No agent token"),
        ({"Coder-Session-Token": "not-a-uuid"}, "malformed"),
        ({"Coder-Session-Token": "' OR 1=1 --"}, "malformed"),
        ({"Coder-Session-Token": str(uuid.uuid4())}, "not known"),
    ],
)
async def test_bad_token_gets_401_json(
    client: Client, headers: dict[str, str], detail_part: str
) -> None:
    """Missing, malformed and unknown tokens are 401 with a JSON message and detail."""
    response = await client.get(REINIT, params={"wait": "true"}, headers=headers)
    assert response.status == 401
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["message"] == "Unauthorized."
    assert detail_part in body["detail"]


async def test_token_in_query_parameter_and_cookie(client: Client, sql: Sql) -> None:
    """Browsers' EventSource cannot set headers: query parameter and cookie work too."""
    agent = await sql.prebuild()
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    by_query = await client.get(REINIT, params={"wait": "true", "coder_session_token": agent.token})
    assert by_query.status == 200
    assert (await SseReader(by_query).event()).data == claimed(agent.workspace_id, owner)
    by_cookie = await client.get(
        REINIT,
        params={"wait": "true"},
        headers={"Cookie": f"coder_session_token={agent.token.upper()}"},
    )
    assert by_cookie.status == 200
    assert (await SseReader(by_cookie).event()).data == claimed(agent.workspace_id, owner)


# --- wait parsing, JSON long-poll ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expect_409"),
    [
        ("1", True),
        ("t", True),
        ("T", True),
        ("TRUE", True),
        ("true", True),
        ("True", True),
        ("yes", False),
        ("tRuE", False),
        ("0", False),
        ("", False),
        (None, False),
    ],
)
async def test_wait_parsed_like_go_parsebool(
    client: Client, sql: Sql, value: str | None, expect_409: bool
) -> None:
    """wait uses strconv.ParseBool's true values; anything else means no wait."""
    agent = await sql.workspace(await sql.user())
    params = {"timeout": "0"} | ({} if value is None else {"wait": value})
    response = await client.get(
        REINIT,
        params=params,
        headers={"Coder-Session-Token": agent.token, "Accept": "application/json"},
    )
    assert response.status == (409 if expect_409 else 204)


@pytest.mark.parametrize("found_by", ["read", "doorbell"])
async def test_json_long_poll_returns_event(client: Client, sql: Sql, found_by: str) -> None:
    """With Accept: application/json, the event comes back as a plain JSON body, whether the
    connect's read finds the claim or the doorbell brings it after the read."""
    agent = await sql.prebuild()
    owner = await sql.user()
    if found_by == "read":
        await sql.claim(agent.workspace_id, owner)
    read = asyncio.Event()

    async def mark_read(_workspace_id: uuid.UUID) -> None:
        read.set()

    after_read(client.app[ADMISSION], mark_read)
    request = asyncio.create_task(
        client.get(
            REINIT,
            params={"wait": "true", "timeout": "10"},
            headers={"Coder-Session-Token": agent.token, "Accept": "application/json"},
        )
    )
    await asyncio.wait_for(read.wait(), 5)
    if found_by == "doorbell":
        await sql.claim(agent.workspace_id, owner)
    response = await asyncio.wait_for(request, 10)
    assert response.status == 200
    assert await response.text() == (
        f'{{"workspace_id":"{agent.workspace_id}","reason":"prebuild_claimed",'
        f'"owner_id":"{owner}"}}'
    )


async def test_json_long_poll_times_out_with_204(client: Client, sql: Sql) -> None:
    """No claim within `timeout` seconds: 204."""
    agent = await sql.prebuild()
    response = await client.get(
        REINIT,
        params={"wait": "true", "timeout": "0.2"},
        headers={"Coder-Session-Token": agent.token, "Accept": "application/json"},
    )
    assert response.status == 204


@pytest.mark.parametrize("timeout", ["-1", "301", "nan", "soon", "inf"])
async def test_json_long_poll_rejects_bad_timeout(client: Client, sql: Sql, timeout: str) -> None:
    """timeout outside 0..300 seconds is a 400 with a JSON explanation."""
    agent = await sql.prebuild()
    response = await client.get(
        REINIT,
        params={"timeout": timeout},
        headers={"Coder-Session-Token": agent.token, "Accept": "application/json"},
    )
    assert response.status == 400
    assert "timeout" in (await response.json())["detail"]


# --- delivery: rollbacks, isolation, payloads, psql ----------------------------------------


async def test_rolled_back_claim_is_not_announced(
    client: Client, sql: Sql, conn: asyncpg.Connection
) -> None:
    """A claim whose transaction rolls back sends nothing."""
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    owner = await sql.user()
    tx = conn.transaction()
    await tx.start()
    await sql.claim(agent.workspace_id, owner)
    await tx.rollback()
    await assert_no_more_events(client, stream, agent.workspace_id)


async def test_agents_only_hear_their_own_workspace(client: Client, sql: Sql) -> None:
    """A claim of workspace A never reaches the agent of workspace B."""
    a, b = await sql.prebuild("a"), await sql.prebuild("b")
    stream_a = await open_stream(client, a.token)
    stream_b = await open_stream(client, b.token)
    owner = await sql.user()
    await sql.claim(a.workspace_id, owner)
    assert (await stream_a.event()).data == claimed(a.workspace_id, owner)
    await assert_no_more_events(client, stream_b, b.workspace_id)


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "{",
        "[1, 2]",
        '{"workspace_id": "nope", "reason": "prebuild_claimed"}',
        '{"workspace_id": 42}',
        '{"reason": "prebuild_claimed"}',
        '{"workspace_id": "7d3e5c1c-1111-4a4a-8b8b-00000000000"}',
        "7d3e5c1c-1111-4a4a-8b8b-00000000000g",
        "x" * 5000,
        "",
    ],
)
async def test_malformed_payload_is_counted_and_ignored(
    client: Client, sql: Sql, payload: str
) -> None:
    """Garbage on the channel is counted; the listener keeps delivering real claims."""
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    before = sum(
        s.value
        for m in metrics.PAYLOADS_INVALID.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )
    await sql.notify(payload)
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)
    after = sum(
        s.value
        for m in metrics.PAYLOADS_INVALID.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )
    assert after == before + 1


async def test_dba_notify_from_psql_reannounces_a_real_claim(
    client: Client, sql: Sql, postgres: Cluster
) -> None:
    """`NOTIFY prebuild_claimed, '<uuid>'` typed in the real psql re-announces a real claim,
    with its owner from the database, to a stream that connected without wait."""
    agent = await sql.prebuild()
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    await notifies_applied(client)  # the claim's own NOTIFY is not the one under test
    stream = await open_stream(client, agent.token, wait=False)
    await asyncio.to_thread(
        postgres.psql, f"NOTIFY prebuild_claimed, '{agent.workspace_id}';", "reinitd"
    )
    assert (await stream.event()).data == claimed(agent.workspace_id, owner)
    await assert_no_more_events(client, stream, agent.workspace_id)


async def test_pings_are_exact_frames(make_server: ServerFactory, sql: Sql) -> None:
    """Keep-alives are `event: ping\\n\\n` at the configured interval."""
    client = await make_server(ping_interval=0.05)
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    for _ in range(3):
        assert (await stream.frame(timeout=2)).event == "ping"


async def test_stream_stays_open_after_event(client: Client, sql: Sql) -> None:
    """After the event the stream stays open; the client is the one to hang up."""
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    owner = await sql.user()
    await sql.claim(agent.workspace_id, owner)
    await stream.event()
    await assert_no_more_events(client, stream, agent.workspace_id)
