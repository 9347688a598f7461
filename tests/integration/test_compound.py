"""Compound faults: a stalled database and a connection flood at once, against a real
`reinitd serve` and a real PostgreSQL whose processes are stopped (SIGSTOP) for the fault."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from reinitd.server.connection import MAX_IN_FLIGHT
from reinitd.server.embedded import Cluster
from tests.compound import stall_under_flood, status
from tests.support import Sql, server_process

# The fault: how long PostgreSQL is stopped. Shorter than the query timeout (10 s), so that
# without early refusals every request admitted or queued just waits it out.
STALL = 4.0
# A flood of this many sockets, all at once, against a budget of BUDGET connections: a quarter
# send a whole request head, the rest send it in two segments 200 ms apart (the fault's
# shape: before the gate counted whole heads, those all went to the database at once).
FLOOD = 2400
BUDGET = 1000
# The server's peak memory over the fault: the budget's connections cost ~7 KB each whatever
# they do (+7.2 MB measured); each request in flight ~8 KB more, so the gate's 64 fit, while
# the 800 that split heads took past the old gate did not (+13.4 MB).
RSS_GROWTH_KB = 10_000
# An agent told to retry after Retry-After (1 s from the gate) is served on its first retry
# once the database is back (measured 0.35-0.62 s after it; 1.4-2.1 s before, in FIFO).
AGENT_MARGIN = 1.5


async def test_a_stalled_database_under_a_flood_never_fails_a_probe_or_a_late_agent(
    database_url: str, postgres: Cluster, conn: asyncpg.Connection, sql: Sql, tmp_path: Path
) -> None:
    """PostgreSQL stopped for 4 s while 2 400 sockets send request heads (most in two
    segments) to a server with a budget of 1 000 connections: every /healthz answers 200, the
    requests in flight stay within the gate and memory within its bound, waiting heads are
    answered 503 with Retry-After before the database is back (never 500), and an agent that
    starts mid-stall has its stream within 1.5 s of the database's return."""
    agent = await sql.prebuild("compound")
    async with server_process(database_url, tmp_path, "--max-connections", str(BUDGET)) as server:
        fault = await stall_under_flood(
            server, conn, postgres, agent.token, flood=FLOOD, split_share=0.75, stall=STALL
        )
    print(fault.summary())
    assert fault.probes
    assert set(fault.probes) == {200}, fault.probes
    assert fault.peak_slots <= MAX_IN_FLIGHT
    assert fault.peak_rss_kb - fault.rss_before_kb < RSS_GROWTH_KB
    assert fault.after_resume < AGENT_MARGIN, fault.summary()
    assert fault.refused_early > 0
    assert set(fault.statuses) <= {401, 503}, fault.statuses
    for answer in fault.answers:
        if status(answer) == 503:
            assert b"\r\nretry-after: " in answer.lower(), answer[:300]
