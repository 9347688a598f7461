"""What operators rely on: log events with request ids and no secrets, metrics, errors, help."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

from reinitd.server.embedded import free_port
from tests.support import (
    REINIT,
    Client,
    Sql,
    SseReader,
    open_stream,
    reinitd_process,
    server_process,
)


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_log_events_carry_request_id_and_no_secrets(client: Client, sql: Sql) -> None:
    """Stable events, the request id on every line of the request (the caller's X-Request-ID
    beside it as client_request_id), no token."""
    agent = await sql.prebuild()
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        stream = await open_stream(client, agent.token, headers={"X-Request-ID": "req-42"})
        owner = await sql.user()
        await sql.claim(agent.workspace_id, owner)
        await stream.event()
        await sql.notify("garbage")
        bad = await client.get(REINIT, headers={"Cookie": f"coder_session_token={agent.token}x"})
        assert bad.status == 401
        stream.response.close()
        async with asyncio.timeout(5):
            while not any(e["event"] == "claim_payload_invalid" for e in logs):
                await asyncio.sleep(0.01)
    by_event = {entry["event"]: entry for entry in logs}
    waiting = by_event["agent_waiting"]
    assert waiting["client_request_id"] == "req-42"
    delivered = by_event["reinit_delivered"]
    assert (delivered["path"], delivered["request_id"]) == ("notify", waiting["request_id"])
    assert delivered["workspace_id"] == str(agent.workspace_id)
    assert by_event["claim_payload_invalid"]["kind"] == "bad_uuid"
    digest = hashlib.sha256(agent.token.encode()).hexdigest()
    text = repr(logs)
    assert agent.token not in text
    assert digest not in text


async def test_server_logs_never_contain_tokens(
    database_url: str, sql: Sql, tmp_path: Path
) -> None:
    """A real server's JSON log lines hold no token, from header, query parameter or cookie."""
    agent = await sql.prebuild()
    await sql.claim(agent.workspace_id, await sql.user())
    async with server_process(database_url, tmp_path) as server, aiohttp.ClientSession() as http:
        for params, headers in (
            ({}, {"Coder-Session-Token": agent.token}),
            ({"coder_session_token": agent.token}, {}),
            ({}, {"Cookie": f"coder_session_token={agent.token}"}),
        ):
            async with http.get(
                f"{server.url}{REINIT}", params={"wait": "true", **params}, headers=headers
            ) as response:
                assert (await SseReader(response).event()).event == "data"
        async with http.get(f"{server.url}/metrics") as response:
            assert agent.token not in await response.text()
    log_text = server.log_path.read_text()
    assert "http_request" in log_text
    assert agent.token not in log_text
    assert hashlib.sha256(agent.token.encode()).hexdigest() not in log_text


async def test_metrics_move_after_a_claim(client: Client, sql: Sql) -> None:
    """/metrics after a scripted claim shows deliveries, payloads, responses and latency."""
    before = scrape(await (await client.get("/metrics")).text())
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token)
    during = scrape(await (await client.get("/metrics")).text())
    await sql.claim(agent.workspace_id, await sql.user())
    await stream.event()
    after = scrape(await (await client.get("/metrics")).text())

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    key = ("reinitd_open_streams", (("wait", "true"),))
    assert during[key] == before.get(key, 0.0) + 1
    assert delta("reinitd_events_delivered_total", path="notify") == 1
    assert delta("reinitd_claim_payloads_total") >= 1
    assert delta("reinitd_responses_total", status="200") >= 1
    assert delta("reinitd_notify_to_write_seconds_count") == 1
    assert delta("reinitd_durable_check_duration_seconds_count") == 1
    assert after[("reinitd_listener_connected", ())] == 1


async def test_unknown_paths_and_methods_answer_json(client: Client) -> None:
    """404 and 405 are JSON {message, detail}, never an HTML page."""
    missing = await client.get("/nope")
    assert missing.status == 404
    assert set(await missing.json()) == {"message", "detail"}
    wrong = await client.post(REINIT)
    assert wrong.status == 405
    assert wrong.headers["Allow"] == "GET"
    assert set(await wrong.json()) == {"message", "detail"}


async def test_request_id_is_echoed(client: Client, sql: Sql) -> None:
    """The request id is echoed, on streams too; a client's X-Request-ID is not ours to use
    (no proxy is trusted by default), and a hostile one is replaced."""
    agent = await sql.prebuild()
    stream = await open_stream(client, agent.token, headers={"X-Request-ID": "stream-7"})
    assert re.fullmatch("[0-9a-f]{16}", stream.response.headers["X-Request-ID"])
    stream.response.close()
    echoed = await client.get("/healthz", headers={"X-Request-ID": "abc-1"})
    assert re.fullmatch("[0-9a-f]{16}", echoed.headers["X-Request-ID"])
    replaced = await client.get("/healthz", headers={"X-Request-ID": "a b\tc" * 50})
    assert replaced.headers["X-Request-ID"] != "a b\tc" * 50


async def test_migrate_without_a_database_url_is_a_usage_error() -> None:
    """`reinitd migrate` with no URL anywhere: exit 2, one line saying what is missing."""
    clean = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = await reinitd_process(
        "migrate", env=clean, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2, stderr
    assert b"--database-url (or DATABASE_URL) is required" in stderr
    assert stdout == b""


async def test_a_database_that_never_answers_is_named_within_the_connect_timeout() -> None:
    """A database address that accepts TCP but never answers stops `serve` within the connect
    timeout, with one line naming the server (no password, no traceback)."""

    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # and never a byte back

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"postgresql://reinitd:secret@127.0.0.1:{port}/reinitd"
        process = await reinitd_process(
            "serve",
            "--port",
            str(free_port()),
            "--connect-timeout",
            "0.5",
            env=dict(os.environ) | {"DATABASE_URL": url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        server.close()
        for writer in accepted:
            writer.close()
    assert process.returncode == 1
    assert stderr.decode().strip().splitlines() == [
        f"reinitd serve: PostgreSQL at reinitd@127.0.0.1:{port}/reinitd did not answer within 0.5 s"
    ]
