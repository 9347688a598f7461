"""Rolling restarts behind a real load balancer lose nothing (docs/protocol.md §6.7): three
`reinitd serve` replicas behind HAProxy (health-checking /readyz), hundreds of agents holding
wait=true streams and reconnecting, claims made from SQL throughout, each replica SIGTERMed and
started again in turn. Every claim reaches its agent, and no agent sees a 5xx other than 503
with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import shutil
import statistics
import string
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from reinitd.server.embedded import free_port
from tests.support import (
    REINIT,
    Provisioned,
    Sql,
    SseReader,
    claimed,
    python_module,
    serve_args,
    stop_process,
    wait_ready,
)

AGENTS = 300
REPLICAS = 3
BATCH = 25  # claims made at each step of the roll; the rest after it
# The configuration README's Deployment section shows (ports filled in by the test).
HAPROXY_CONFIG = string.Template("""\
global
    maxconn 4000              # two files per connection: within a 20 000 nofile limit

defaults
    mode http
    timeout connect 2s
    timeout client 1h         # far above the ping interval and any long-poll timeout
    timeout server 1h
    timeout http-request 10s
    option redispatch 1       # a retry goes to another replica
    retries 3
    retry-on conn-failure empty-response junk-response 503
    # when no replica can take a request, say so the way reinitd does: 503 + Retry-After
    http-error status 503 content-type application/json string "$body" hdr Retry-After 1

frontend agents
    bind 127.0.0.1:$front
    default_backend reinitd

backend reinitd
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter 500ms fall 1 rise 1
$servers

listen stats
    bind 127.0.0.1:$stats
    stats enable
    stats uri /stats
""")
# HAProxy's own 503, in reinitd's JSON shape
BODY_503 = r"{\"message\":\"No replica available.\",\"detail\":\"\"}"


@dataclass
class Tally:
    """What the agents saw, all together."""

    statuses: Counter[int] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    reconnects: list[float] = field(default_factory=list)
    events: dict[uuid.UUID, dict[str, object]] = field(default_factory=dict)
    open: set[uuid.UUID] = field(default_factory=set)
    all_open: asyncio.Event = field(default_factory=asyncio.Event)
    all_done: asyncio.Event = field(default_factory=asyncio.Event)


async def run_agent(
    http: aiohttp.ClientSession, url: str, agent: Provisioned, tally: Tally
) -> None:
    """A wait=true agent: holds its stream, reconnects on any error after a short backoff,
    stops once its claim arrives."""
    broken_at: float | None = None
    backoff = 0.05
    while True:
        try:
            async with http.get(
                url, params={"wait": "true"}, headers={"Coder-Session-Token": agent.token}
            ) as response:
                tally.statuses[response.status] += 1
                if response.status != 200:
                    if response.status >= 500 and (
                        response.status != 503 or "Retry-After" not in response.headers
                    ):
                        tally.bad.append(f"{response.status} {await response.text()}")
                    retry = float(response.headers.get("Retry-After", backoff))
                    await asyncio.sleep(min(retry, 1.0))
                    continue
                if broken_at is not None:
                    tally.reconnects.append(time.monotonic() - broken_at)
                    broken_at = None  # the next break is timed from its own start
                tally.open.add(agent.workspace_id)
                if len(tally.open) == AGENTS:
                    tally.all_open.set()
                stream = SseReader(response)
                frame = await stream.event(timeout=3600)
                assert frame.data is not None
                tally.events[agent.workspace_id] = frame.data
                if len(tally.events) == AGENTS:
                    tally.all_done.set()
                return
        except (aiohttp.ClientError, EOFError, ConnectionError, asyncio.IncompleteReadError):
            tally.open.discard(agent.workspace_id)
            broken_at = broken_at if broken_at is not None else time.monotonic()
            await asyncio.sleep(backoff)  # the agent's own backoff, not a wait in the test


async def backend_states(http: aiohttp.ClientSession, stats_url: str) -> dict[str, str]:
    async with http.get(f"{stats_url};csv") as response:
        text = (await response.text()).lstrip("# ")
    return {
        row["svname"]: row["status"]
        for row in csv.DictReader(io.StringIO(text))
        if row["pxname"] == "reinitd" and row["svname"] not in ("FRONTEND", "BACKEND")
    }


async def until_backends(
    http: aiohttp.ClientSession, stats_url: str, wanted: dict[str, str], timeout: float = 30
) -> None:
    """Wait (bounded) until HAProxy's health checks show each named server in the wanted state."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                states = await backend_states(http, stats_url)
                if all(states.get(name, "").startswith(state) for name, state in wanted.items()):
                    return
            await asyncio.sleep(0.05)


@dataclass
class Replica:
    name: str
    port: int
    log: Path
    process: asyncio.subprocess.Process | None = None

    async def start(self, database_url: str) -> None:
        with self.log.open("ab") as log:
            self.process = await python_module(
                "reinitd",
                *serve_args(self.port),
                env={**os.environ, "DATABASE_URL": database_url},
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        await wait_ready(f"http://127.0.0.1:{self.port}", self.process)


async def test_rolling_restart_behind_haproxy_delivers_every_claim(
    database_url: str, sql: Sql, tmp_path: Path
) -> None:
    """Each of three replicas SIGTERMed and restarted in turn under 300 waiting agents and
    claims throughout: all 300 claims delivered with their owners, statuses only 200 and 503
    with Retry-After, every replica exits 0."""
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        pytest.skip("haproxy is missing (Debian: apt-get install haproxy)")
    replicas = [
        Replica(f"r{i + 1}", free_port(), tmp_path / f"r{i + 1}.log") for i in range(REPLICAS)
    ]
    await asyncio.gather(*(replica.start(database_url) for replica in replicas))
    front, stats = free_port(), free_port()
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        HAPROXY_CONFIG.substitute(front=front, stats=stats, servers=servers, body=BODY_503)
    )
    with (tmp_path / "haproxy.log").open("wb") as log:
        proxy = await asyncio.create_subprocess_exec(
            haproxy, "-db", "-f", str(config), stdout=log, stderr=asyncio.subprocess.STDOUT
        )
    stats_url = f"http://127.0.0.1:{stats}/stats"
    agents = [await sql.prebuild(f"roll-{i}") for i in range(AGENTS)]
    owners = {agent.workspace_id: await sql.user() for agent in agents}
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    tasks: list[asyncio.Task[None]] = []
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            await until_backends(http, stats_url, {r.name: "UP" for r in replicas})
            url = f"http://127.0.0.1:{front}{REINIT}"
            tasks = [asyncio.create_task(run_agent(http, url, a, tally)) for a in agents]
            await asyncio.wait_for(tally.all_open.wait(), 60)
            pending = list(agents)

            async def claim(count: int) -> None:
                batch, pending[:] = pending[:count], pending[count:]
                for agent in batch:
                    await sql.claim(agent.workspace_id, owners[agent.workspace_id])

            stop_times = []
            for replica in replicas:
                assert replica.process is not None
                started = time.monotonic()
                replica.process.terminate()
                await claim(BATCH)  # while it drains
                assert await asyncio.wait_for(replica.process.wait(), 15) == 0
                stop_times.append(time.monotonic() - started)
                await claim(BATCH)  # while it is gone
                await replica.start(database_url)
                await until_backends(http, stats_url, {replica.name: "UP"})
            await claim(len(pending))
            await asyncio.wait_for(tally.all_done.wait(), 60)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stop_process(proxy, 5)
        for replica in replicas:
            if replica.process is not None:
                await stop_process(replica.process)
    assert tally.bad == []
    assert set(tally.statuses) <= {200, 503}, tally.statuses
    assert tally.events == {
        a.workspace_id: claimed(a.workspace_id, owners[a.workspace_id]) for a in agents
    }
    assert len(tally.reconnects) >= AGENTS // REPLICAS, "the restarts broke streams"
    p50, worst = statistics.median(tally.reconnects), max(tally.reconnects)
    print(
        f"rolling restart: {len(tally.events)} claims delivered; statuses {dict(tally.statuses)}; "
        f"{len(tally.reconnects)} reconnects, p50 {p50 * 1000:.0f} ms, max {worst * 1000:.0f} ms; "
        "SIGTERM to exit "
        f"{', '.join(f'{t:.2f}' for t in stop_times)} s"
    )
    assert worst < 10
