"""The scenarios of `make bench`, one method each: what it runs and measures is in its
docstring; it returns one run's figures as a flat dict (numbers are summarised over runs)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import re
import resource
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import (
    BENCH_SQL,
    RESULTS,
    Harness,
    gc_settled,
    loadgens,
    loadgens_for,
    probe,
    probes,
    profiled,
    server_timings,
    until_healthy,
)
from bench.measure import (
    cpu_seconds,
    cpu_share,
    kernel_kb,
    open_files,
    pct,
    pss_kb,
    ratio,
    rss_kb,
    settled,
    settled_kb,
    tree,
)
from reinitd.server.embedded import SERVER_ROLE
from reinitd.server.query import QUERIES
from reinitd.wire import REINIT_PATH
from tests.compound import stall_under_flood
from tests.support import ServerProcess, login_role

Agents = Sequence[tuple[str, str]]  # (agent token, workspace id)
Held = Callable[[int], Awaitable[dict[str, Any]]]  # streams held -> figures
NAN = float("nan")

CAPACITY_PING = 2.0  # seconds: a short ping interval, so that idle CPU shows the pings' cost
IDLE_WINDOW = 10.0  # seconds of idle CPU measured at capacity
# Capacity: agents arrive steadily, at most this many requests per load generator awaiting
# their headers. All 76 000 at once on two shared cores overflow the accept queues for longer
# than TCP retries a handshake (the kernel then resets them): that is the storm's question,
# asked apart with 10 000.
CAPACITY_WAITING = 500
# ... and an agent refused because its worker is full tries again (SO_REUSEPORT hashes each
# connection: one worker of four may be given a few hundred more than the mean).
CAPACITY_RETRIES = 5
# Scale: requests awaiting their headers at once, over all load generators (8 workers admit
# 64 each at a time; more only wait at their gates, and time out there on two busy cores).
SCALE_WAITING = 1000
SCALE_OPEN_LIMIT = 900.0  # seconds to open them all (152 000 take about three minutes)
# Scale: idle CPU over two cycles of the default 15 s ping.
SCALE_IDLE_WINDOW = 30.0
# Presence: how often the bench looks for new receipt rows (the lag's resolution).
RECEIPT_POLL = 0.02
PRESENCE_FUNCTIONS = ("report_presence", "record_deliveries")
# Presence: how long after the last claim's frame its receipt may still be seen (the contract
# says 2 s; a receipt later than this counts as missing).
RECEIPT_WINDOW = 5.0
# An event's name, or the first words of a foreign message (up to its first escape).
_EVENT = re.compile(rb'"event": "([^"\\]{1,60})')


def latency_figures(
    sent: dict[str, float], got: dict[str, float], floor: dict[str, float]
) -> dict[str, float]:
    """Commit-to-frame times of the claims `sent`, beside the raw-LISTEN floor's (ms)."""
    lat = [got[w] - sent[w] for w in sent if w in got]
    base = [floor[w] - sent[w] for w in sent if w in floor]
    over = [got[w] - floor[w] for w in sent if w in got and w in floor]
    return {
        "claims": len(sent),
        "delivered": len(lat),
        "p50_ms": 1000 * pct(lat, 0.5),
        "p99_ms": 1000 * pct(lat, 0.99),
        "max_ms": 1000 * max(lat, default=NAN),
        "floor_p50_ms": 1000 * pct(base, 0.5),
        "floor_p99_ms": 1000 * pct(base, 0.99),
        "overhead_p50_ms": 1000 * pct(over, 0.5),
        "overhead_p99_ms": 1000 * pct(over, 0.99),
        "p99_minus_floor_p99_ms": 1000 * (pct(lat, 0.99) - pct(base, 0.99)),
    }


def probe_figures(name: str, results: list[tuple[int, float]]) -> dict[str, float]:
    answered = [seconds for status, seconds in results if status == 200]
    return {
        f"{name}_probes": len(results),
        f"{name}_failed": len(results) - len(answered),
        f"{name}_p50_ms": 1000 * pct(answered, 0.5),
        f"{name}_max_ms": 1000 * max(answered, default=NAN),
    }


def log_since(path: Path, offset: int) -> bytes:
    with path.open("rb") as log:
        log.seek(offset)
        return log.read()


def top_events(lines: list[bytes], count: int = 3) -> str:
    """The log's most frequent event names, e.g. `http_request x120, ...`."""
    names = Counter(
        match.group(1).decode(errors="replace") if (match := _EVENT.search(line)) else "(other)"
        for line in lines
    )
    return ", ".join(f"{name} x{n}" for name, n in names.most_common(count)) or "none"


async def _sigterm(server: ServerProcess, profile: str | None = None) -> float:
    """SIGTERM, and the seconds until the server has exited (at most 60); with `profile`,
    py-spy records the server and its workers from the signal to the exit."""
    if profile is None:
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.process.wait(), 60)
        return time.monotonic() - started
    async with profiled(server.process.pid, RESULTS / f"profile-{profile}"):
        return await _sigterm(server)


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stop_figures(lines: list[bytes]) -> dict[str, Any]:
    """From the log a server wrote while it stopped: the slowest worker's own account of its
    stop (`server_stopped` duration_s, from the end of its wait to the end of its cleanup),
    and the lines written."""
    durations = [
        float(json.loads(line)["duration_s"]) for line in lines if b'"server_stopped"' in line
    ]
    return {
        "worker_stop_max_s": max(durations, default=NAN),
        "stop_log_lines": len(lines),
        "stop_log_top_events": top_events(lines),
    }


async def _paced_connects(url: str, agents: Agents, rate: float) -> list[float]:
    """Each agent in turn opens a new connection and asks for its stream (`wait=true`), one
    every 1/`rate` s: seconds from the connect to the whole response head."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    heads = []
    for token, _ in agents:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET {REINIT_PATH}?wait=true HTTP/1.1\r\nHost: {host}\r\n"
            f"Coder-Session-Token: {token}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        heads.append(time.perf_counter() - started)
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"lone connect refused: {head[:80]!r}")
        writer.close()
        await asyncio.sleep(max(0.0, started + 1 / rate - time.perf_counter()))
    return heads


async def _server_statements(conn: asyncpg.Connection, role: str) -> dict[str, float]:
    """Statements the server role ran since pg_stat_statements was last reset: all of them,
    and the presence writes (report_presence, record_deliveries) apart."""
    rows = await conn.fetch(BENCH_SQL["server_statements"], role)
    presence = [r for r in rows if any(f in r["query"] for f in PRESENCE_FUNCTIONS)]
    return {
        "statements": sum(r["calls"] for r in rows),
        "presence_statements": sum(r["calls"] for r in presence),
        "statement_ms": sum(r["total_exec_time"] for r in rows),
        "presence_statement_ms": sum(r["total_exec_time"] for r in presence),
    }


class Scenarios:
    def __init__(self, harness: Harness, agents: Agents, owner: uuid.UUID) -> None:
        self.h = harness
        self.agents = agents
        self.owner = owner
        self.presence_storms = 0
        self._bursts = 0

    async def claim_paced(self, targets: Agents, rate: float) -> dict[str, float]:
        """Claim each target's workspace over one connection, `rate` claims per second;
        returns when each claim was sent (monotonic seconds)."""
        conn = await self.h.db.connect()
        sent: dict[str, float] = {}
        try:
            for _, workspace in targets:
                sent[workspace] = time.monotonic()
                await conn.execute(BENCH_SQL["claim_one"], uuid.UUID(workspace), self.owner)
                await asyncio.sleep(max(0.0, sent[workspace] + 1 / rate - time.monotonic()))
        finally:
            await conn.close()
        return sent

    async def unclaim(self, agents: Agents) -> None:
        await self.h.db.sql("unclaim", [uuid.UUID(w) for _, w in agents])
        await self.h.db.sql("settle")

    def _postgres_cpu(self) -> float:
        """PostgreSQL's CPU so far, its backends that exited included."""
        return cpu_seconds(self._postgres(), reaped=True)

    def _postgres(self, but: int = 0) -> list[int]:
        """PostgreSQL's processes (but the backend `but`)."""
        return [pid for pid in tree(self.h.db.postmaster_pid()) if pid != but]

    async def capacity(self, per_worker: int, workers: int) -> dict[str, Any]:
        """`per_worker` idle wait=true streams per worker, from one load generator per
        19 000 streams, each from its own source addresses, arriving steadily (at most
        `CAPACITY_WAITING` unanswered per generator): streams held, memory per
        stream, idle CPU with a ping every 2 s, /healthz at the limit, SIGTERM to exit."""
        n = per_worker * workers
        async with (
            # --max-streams as deployed: the connection budget's (19 214 at 20 000 files).
            self.h.reinitd("--ping-interval", str(CAPACITY_PING), workers=workers) as server,
            loadgens(loadgens_for(n)) as gens,
        ):

            def pids() -> list[int]:
                return tree(server.process.pid)

            before = await settled_kb(lambda: rss_kb(pids()))
            opened = await gens.open(
                server.url, self.agents[:n], waiting=CAPACITY_WAITING, retries=CAPACITY_RETRIES
            )
            after = await settled_kb(lambda: rss_kb(pids()))
            idle_cpu = await cpu_share(pids, IDLE_WINDOW)
            healthz = [await probe(server.url, "/healthz") for _ in range(2 * workers)]
            files = max(open_files(pid) for pid in pids())
            still_open = (await gens.stats())["open"]
            shutdown_s = await _sigterm(server)
        return {
            "workers": workers,
            "load_generators": len(gens.gens),
            "waiters": opened["registered"],
            "waiters_per_worker": opened["registered"] / workers,
            "errors": opened["errors"],
            "error_samples": opened["error_samples"],
            "retried_after_503": opened["retried"],
            "still_open_after_idle": still_open,
            "open_s": opened["elapsed_s"],
            "rss_before_kb": before,
            "rss_after_kb": after,
            "rss_per_waiter_kb": (after - before) / max(1, opened["registered"]),
            "idle_cpu_percent": 100 * idle_cpu,
            "ping_interval_s": CAPACITY_PING,
            "most_files_in_a_worker": files,
            **probe_figures("healthz", healthz),
            "shutdown_s": shutdown_s,
        }

    async def latency(self, n: int, claims: int, rate: float) -> dict[str, Any]:
        """`claims` claims at `rate` per second while `n` streams wait: commit-to-frame
        times beside a raw asyncpg LISTEN on the same NOTIFYs (the floor), and the server's
        CPU per claim (paced, so the idle streams' upkeep is included)."""
        agents = self.agents[:n]
        targets = agents[:: max(1, n // claims)][:claims]
        async with self.h.reinitd() as server, loadgens(1) as gens:
            start = await server_timings(server.url)
            opened = await gens.open(server.url, agents)
            await gens.listen(self.h.db.owner_dsn)
            await gc_settled(server.url, start["gc_settles"])
            pids = tree(server.process.pid)
            cpu = cpu_seconds(pids)
            before = await server_timings(server.url)
            sent = await self.claim_paced(targets, rate)
            got = await gens.wait_events(len(targets), 10)
            cpu = cpu_seconds(pids) - cpu
            _, floor = await gens.events()
            inside = await server_timings(server.url)
            for key in ("gc_pauses_over_5ms", "gc_pause_total_ms"):  # during the claims only
                inside[key] -= before[key]
        await self.unclaim(targets)
        figures = latency_figures(sent, got, floor)
        return {
            "waiters": opened["registered"],
            **figures,
            "server_cpu_per_claim_us": 1e6 * cpu / max(1, figures["delivered"]),
            **inside,
        }

    async def burst(self, n: int) -> dict[str, Any]:
        """`n` streams wait; all `n` claims commit in one transaction: time from COMMIT to
        the last frame, and the CPU per delivered claim of the server and of PostgreSQL
        (PostgreSQL's counted from COMMIT on: the doorbell reads, not the claims). The same
        burst through the `fanout` baseline in the same run (plain aiohttp writing each
        NOTIFY's payload to its workspace's streams: no read, the framework's way)."""
        agents = self.agents[:n]

        async def floor() -> dict[str, Any]:
            async with self.h.baseline("fanout") as fanout:
                return await self._burst(fanout, agents)

        async def reinitd() -> dict[str, Any]:
            async with self.h.reinitd() as server:
                start = await server_timings(server.url)
                return await self._burst(server, agents, start["gc_settles"])

        # The two take turns going first, run by run: neither always meets a fresher machine.
        self._bursts += 1
        if self._bursts % 2:
            base, ours = await floor(), await reinitd()
        else:
            ours, base = await reinitd(), await floor()
        return {
            **ours,
            **{f"fanout_{key}": value for key, value in base.items()},
            "all_delivered_ratio": ratio(ours["all_delivered_s"], base["all_delivered_s"]),
            "server_cpu_per_claim_ratio": ratio(
                ours["server_cpu_per_claim_us"], base["server_cpu_per_claim_us"]
            ),
        }

    async def _burst(
        self, server: ServerProcess, agents: Agents, gc_settles: float | None = None
    ) -> dict[str, Any]:
        """One burst on `server`; with `gc_settles` (reinitd's, before its streams opened),
        it starts once the server's collector settled, and the server's own timings of the
        burst are added (its GC pauses counted from COMMIT on)."""
        n = len(agents)
        before: dict[str, float] = {}
        async with loadgens(1) as gens:
            opened = await gens.open(server.url, agents)
            if gc_settles is not None:
                await gc_settled(server.url, gc_settles)
                before = await server_timings(server.url)
            pids = tree(server.process.pid)
            conn = await self.h.db.connect()
            try:
                server_cpu = cpu_seconds(pids)
                async with conn.transaction():
                    await conn.execute(
                        BENCH_SQL["claim_many"], [uuid.UUID(w) for _, w in agents], self.owner
                    )
                    committed = time.monotonic()  # COMMIT is sent as the block exits
                # Not the claiming backend's: it exits before the second reading.
                claimer = conn.get_server_pid()
                postgres_cpu = cpu_seconds(self._postgres(but=claimer))
            finally:
                await conn.close()
            got = await gens.wait_events(n, 15)
            server_cpu = cpu_seconds(pids) - server_cpu
            postgres_cpu = cpu_seconds(self._postgres(but=claimer)) - postgres_cpu
            inside = await server_timings(server.url) if before else {}
        for key in ("gc_pauses_over_5ms", "gc_pause_total_ms"):  # during the burst only
            if key in inside:
                inside[key] -= before[key]
        await self.unclaim(agents)
        return {
            **inside,
            "waiters": opened["registered"],
            "delivered": len(got),
            "errors": opened["errors"],
            "error_samples": opened["error_samples"],
            "all_delivered_s": max(got.values()) - committed if got else NAN,
            "server_cpu_per_claim_us": 1e6 * server_cpu / max(1, len(got)),
            "postgres_cpu_per_claim_us": 1e6 * postgres_cpu / max(1, len(got)),
        }

    async def storm(self, n: int, workers: int, claimed_share: float = 0.1) -> dict[str, Any]:
        """`n` agents connect at once (wait=true), 10 % of them already claimed; the same
        crowd first against the plain aiohttp baseline, in the same run. Connects/s, server
        CPU per connect and memory per idle stream, each beside the baseline's, and the
        ratios (reinitd over baseline)."""
        agents = self.agents[:n]
        async with self.h.baseline("plain") as plain:
            base = await self._crowd(plain, agents, claimed=0, reinitd=False)
        claimed = agents[: int(n * claimed_share)]
        await self.h.db.sql("claim_many", [uuid.UUID(w) for _, w in claimed], self.owner)
        try:
            async with self.h.reinitd(workers=workers) as server:
                ours = await self._crowd(server, agents, claimed=len(claimed), reinitd=True)
        finally:
            await self.unclaim(claimed)
        return {
            "workers": workers,
            "agents": n,
            **ours,
            **{f"plain_{key}": value for key, value in base.items()},
            "connects_ratio": ratio(ours["connects_per_s"], base["connects_per_s"]),
            "cpu_per_connect_ratio": ratio(
                ours["server_cpu_per_connect_ms"], base["server_cpu_per_connect_ms"]
            ),
            "memory_per_stream_ratio": ratio(
                ours["memory_per_stream_kb"], base["memory_per_stream_kb"]
            ),
        }

    async def lone(self, n: int, rate: float) -> dict[str, Any]:
        """`n` agents connect one at a time, `rate` per second (a read of one connect never
        waits for company): connect to response head, p50 and p99, beside plain aiohttp's in
        the same run, and the database's own round trip for the statement a lone connect
        runs (`admit_one`, prepared, from the bench over loopback)."""
        agents = self.agents[:n]
        async with self.h.baseline("plain") as plain:
            plain_cpu = cpu_seconds(tree(plain.process.pid))
            base = await _paced_connects(plain.url, agents, rate)
            plain_cpu = cpu_seconds(tree(plain.process.pid)) - plain_cpu
        async with self.h.reinitd() as server:
            cpu = cpu_seconds(tree(server.process.pid))
            ours = await _paced_connects(server.url, agents, rate)
            cpu = cpu_seconds(tree(server.process.pid)) - cpu
        conn = await self.h.db.connect()
        try:
            statement = await conn.prepare(QUERIES["admit_one"])
            trips = []
            for token, _ in agents:
                digest = hashlib.sha256(token.lower().encode()).digest()
                started = time.perf_counter()
                await statement.fetch(digest)
                trips.append(time.perf_counter() - started)
        finally:
            await conn.close()
        return {
            "connects": len(ours),
            "rate": rate,
            "p50_ms": 1000 * pct(ours, 0.5),
            "p99_ms": 1000 * pct(ours, 0.99),
            "plain_p50_ms": 1000 * pct(base, 0.5),
            "plain_p99_ms": 1000 * pct(base, 0.99),
            "database_p50_ms": 1000 * pct(trips, 0.5),
            # CPU over the paced run, so each process's idle upkeep is included
            "server_cpu_per_connect_ms": 1000 * cpu / max(1, len(ours)),
            "plain_server_cpu_per_connect_ms": 1000 * plain_cpu / max(1, len(base)),
            "over_plain_p50_ms": 1000 * (pct(ours, 0.5) - pct(base, 0.5)),
        }

    async def _crowd(
        self,
        server: ServerProcess,
        agents: Agents,
        claimed: int,
        *,
        reinitd: bool,
        held_by: Held | None = None,
    ) -> dict[str, Any]:
        """Open every agent's stream at once against `server` and measure what it cost (and,
        with `held_by`, what it measures while the streams are still held)."""

        def server_kb() -> int:
            return rss_kb(tree(server.process.pid))

        def cpu() -> tuple[float, float]:
            return cpu_seconds(tree(server.process.pid)), cpu_seconds(self._postgres())

        async with loadgens(loadgens_for(len(agents))) as gens:
            rss = await settled_kb(server_kb)
            start = await server_timings(server.url) if reinitd else {}
            before, client = cpu(), cpu_seconds(gens.pids)
            opened = await gens.open(server.url, agents)
            after, client = cpu(), cpu_seconds(gens.pids) - client
            if reinitd:  # at rest: once the server settled its heap after the storm
                await gc_settled(server.url, start["gc_settles"])
            rss = await settled_kb(server_kb) - rss
            held = (await gens.stats())["open"]
            got = await gens.wait_events(claimed, 10) if claimed else {}
            more = await held_by(held) if held_by is not None else {}
        registered = opened["registered"]
        return {
            **more,
            "registered": registered,
            "errors": opened["errors"],
            "error_samples": opened["error_samples"],
            "all_registered_s": opened["elapsed_s"],
            "connects_per_s": registered / opened["elapsed_s"] if opened["elapsed_s"] else NAN,
            "ttfb_p50_ms": 1000 * opened["ttfb_p50_s"],
            "ttfb_p99_ms": 1000 * opened["ttfb_p99_s"],
            "server_cpu_per_connect_ms": 1000 * (after[0] - before[0]) / max(1, registered),
            "postgres_cpu_per_connect_ms": 1000 * (after[1] - before[1]) / max(1, registered),
            "client_cpu_s": client,
            "streams_held": held,
            "memory_per_stream_kb": rss / max(1, held),
            "claimed": claimed,
            "claimed_delivered": len(got),
        }

    async def forged(self, n: int, seconds: float, rate: float) -> dict[str, Any]:
        """A role with no grants NOTIFYs as fast as it can for `seconds`, naming workspaces
        that agents wait on, while real claims arrive at `rate` per second: what the flood
        costs the server (CPU, log lines) and the real claims (latency over the floor)."""
        agents = self.agents[:n]
        conn = await self.h.db.connect()
        try:
            forger = await login_role(conn, self.h.db.cluster, "bench_forger")
        finally:
            await conn.close()
        waiting = [uuid.UUID(w) for _, w in agents[: n // 2]]
        targets = agents[n // 2 :][: int(seconds * rate)]
        async with self.h.reinitd(log_level="info") as server, loadgens(1) as gens:
            opened = await gens.open(server.url, agents)
            await gens.listen(self.h.db.owner_dsn)
            offset = (await asyncio.to_thread(server.log_path.stat)).st_size
            pids = tree(server.process.pid)
            cpu, started = cpu_seconds(pids), time.monotonic()
            stop = started + seconds
            forgers = asyncio.gather(*(self._forge(forger, waiting, stop) for _ in range(4)))
            sent = await self.claim_paced(targets, rate)
            forged = sum(await forgers)
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(pids) - cpu
            written = (await asyncio.to_thread(log_since, server.log_path, offset)).splitlines()
            got = await gens.wait_events(len(targets), 30)
            _, floor = await gens.events()
            stats = await gens.stats()
            inside = await server_timings(server.url)
        await self.unclaim(targets)
        # The real claims' own delivery lines are not the flood's doing.
        lines = sum(b'"reinit_delivered"' not in line for line in written)
        return {
            "waiters": opened["registered"],
            "forged_notifies": forged,
            "forged_per_s": forged / elapsed,
            "server_cpu_percent": 100 * cpu / elapsed,
            "log_lines_per_s": lines / elapsed,
            "streams_closed": stats["closed"],
            **latency_figures(sent, got, floor),
            **inside,
        }

    async def _forge(self, dsn: str, waiting: list[uuid.UUID], stop: float) -> int:
        """Forged doorbells in batches of 100 until `stop`; returns how many were sent."""
        conn: asyncpg.Connection = await asyncpg.connect(dsn)
        sent = 0
        try:
            while time.monotonic() < stop:
                batch = [str(waiting[(sent + k) % len(waiting)]) for k in range(100)]
                await conn.execute(BENCH_SQL["forge"], batch)
                sent += len(batch)
        finally:
            await conn.close()
        return sent

    async def flood(
        self, streams: int, per_process: int, claims: int = 10, rate: float = 5.0
    ) -> dict[str, Any]:
        """Two load processes open `per_process` idle TCP connections each and send nothing,
        against a server holding `streams` open streams and logging JSON at its default
        level into a file. Then, with the flood in place: /healthz and /readyz latency (a few
        probes on fresh connections), the delay of `claims` claims to open streams (beside
        the raw-LISTEN floor), the server's open files, CPU and the bytes its log grew by;
        once the flood is gone, how long until /healthz answers. Timeouts are counted."""
        agents = self.agents[:streams]
        targets = agents[:: max(1, streams // claims)][:claims]
        async with (
            self.h.reinitd(log_level="info") as server,
            loadgens(1) as crowd,
            loadgens(2, first=1) as flooders,
        ):
            opened = await crowd.open(server.url, agents)
            await crowd.listen(self.h.db.owner_dsn)
            pid = server.process.pid
            offset = (await asyncio.to_thread(server.log_path.stat)).st_size
            cpu, started = cpu_seconds([pid]), time.monotonic()
            idle = await flooders.open_idle(server.url, per_process)
            files = await settled(lambda: open_files(pid), slack=5)  # the flood has landed
            healthz, readyz, sent = await asyncio.gather(
                probes(server.url, "/healthz"),
                probes(server.url, "/readyz"),
                self.claim_paced(targets, rate),
            )
            got = await crowd.wait_events(len(targets), 30)
            _, floor = await crowd.events()
            held = await flooders.stats()
            elapsed = time.monotonic() - started
            cpu = cpu_seconds([pid]) - cpu
            grown = await asyncio.to_thread(log_since, server.log_path, offset)
            await flooders.close()
            recovered_s = await until_healthy(server.url)
            closed = (await crowd.stats())["closed"]
        await self.unclaim(targets)
        lines = grown.splitlines()
        return {
            "streams": opened["registered"],
            "idle_requested": idle["requested"],
            "idle_connected": idle["connected"],
            "idle_timed_out": idle["timed_out"],
            "idle_failed": idle["failed"],
            "idle_error_samples": idle["error_samples"],
            "idle_open_s": idle["elapsed_s"],
            "idle_still_open": held["idle_open"],
            "server_files_in_flood": files,
            "server_cpu_percent": 100 * cpu / elapsed,
            "flood_s": elapsed,
            **probe_figures("healthz", healthz),
            **probe_figures("readyz", readyz),
            **{f"claim_{key}": value for key, value in latency_figures(sent, got, floor).items()},
            "streams_closed": closed,
            "log_bytes": len(grown),
            "log_mb": len(grown) / 1e6,
            "log_mb_per_s": len(grown) / 1e6 / elapsed,
            "log_lines": len(lines),
            "log_top_events": top_events(lines),
            "healthz_after_flood_s": recovered_s,
        }

    async def compound(self, flood: int, stall: float) -> dict[str, Any]:
        """PostgreSQL stopped (the server pool's backends and the postmaster) for `stall`
        seconds while `flood` sockets send request heads with random tokens at once, three in
        four split in two segments 200 ms apart, against a server at its default connection
        budget: /healthz during the fault, the server's peak RSS growth and requests in
        flight, and the wait of an agent that starts mid-stall."""
        conn = await self.h.db.connect()
        try:
            async with self.h.reinitd() as server:
                fault = await stall_under_flood(
                    server,
                    conn,
                    self.h.db.cluster,
                    self.agents[0][0],
                    flood=flood,
                    split_share=0.75,
                    stall=stall,
                )
        finally:
            await conn.close()
        return {
            "flood": flood,
            "stall_s": stall,
            "healthz_probes": len(fault.probes),
            "healthz_failed": len(fault.probes) - fault.probes.count(200),
            "peak_slots": fault.peak_slots,
            "rss_before_kb": fault.rss_before_kb,
            "rss_peak_growth_kb": fault.peak_rss_kb - fault.rss_before_kb,
            "agent_wait_s": fault.agent_wait,
            "agent_after_resume_s": fault.after_resume,
            "refused_early": fault.refused_early,
            "flood_answers": ", ".join(map(str, fault.statuses)),
        }

    async def naive(self, limit: int, step: int = 50) -> dict[str, Any]:
        """The naive baseline (a PostgreSQL connection and LISTEN per request) takes
        waiters `step` at a time until it breaks or holds `limit`: where it broke, and the
        memory per waiter (its server's RSS plus PostgreSQL's backends' PSS)."""
        async with self.h.baseline("naive") as server, loadgens(1) as gens:

            def postgres_kb() -> int:
                return pss_kb(self._postgres())

            def server_kb() -> int:
                return rss_kb([server.process.pid])

            pg_before, srv_before = await settled_kb(postgres_kb), await settled_kb(server_kb)
            held, broke = 0, ""
            while held < limit:
                reply = await gens.open(server.url, self.agents[held : held + step], limit=30)
                held += reply["registered"]
                if reply["errors"]:
                    sample = (reply["error_samples"] or ["errors"])[0]
                    broke = (
                        f"broke with {sample} at waiter {held + 1}: PostgreSQL's "
                        f"max_connections is {self.h.db.cluster.max_connections}"
                    )
                    break
            pg_after, srv_after = await settled_kb(postgres_kb), await settled_kb(server_kb)
        return {
            "waiters_held": held,
            "broke_with": broke or f"stopped at the limit of {limit}",
            "max_connections": self.h.db.cluster.max_connections,
            "server_rss_per_waiter_kb": (srv_after - srv_before) / max(1, held),
            "postgres_pss_per_waiter_kb": (pg_after - pg_before) / max(1, held),
            "memory_per_waiter_kb": (pg_after - pg_before + srv_after - srv_before) / max(1, held),
        }

    async def recovery(self, n: int = 1000) -> dict[str, Any]:
        """The listener's backend is killed and a claim committed at once; then PostgreSQL
        restarts and a claim follows: the time to each event."""
        agents = self.agents[:n]
        result: dict[str, Any] = {}
        async with self.h.reinitd() as server, loadgens(1) as gens:
            await gens.open(server.url, agents)
            started = time.monotonic()
            await self.h.db.sql("kill_listener")
            await self.h.db.sql("claim_one", uuid.UUID(agents[0][1]), self.owner)
            got = await gens.wait_events(1, 30)
            result["killed_listener_to_event_s"] = got[agents[0][1]] - started
            started = time.monotonic()
            await asyncio.to_thread(self.h.db.cluster.restart)
            await self.h.db.sql("claim_one", uuid.UUID(agents[1][1]), self.owner)
            got = await gens.wait_events(2, 60)
            result["postgres_restart_to_event_s"] = got[agents[1][1]] - started
        await self.unclaim(agents[:2])
        return result

    async def scale(
        self, n: int, workers: int, claims: int, rate: float, log_level: str
    ) -> dict[str, Any]:
        """`n` wait=true streams over `workers` workers at the default 15 s ping, arriving
        steadily as in capacity: memory per stream (the servers' RSS, and the kernel's slab
        and TCP buffers, both ends of each loopback connection), idle CPU over two ping
        cycles, /healthz, then `claims` paced claims at `rate` per second while all are
        connected (commit to frame, beside the raw LISTEN floor), and SIGTERM to exit, its
        clients no longer reading (with --profile, py-spy records the stop alone)."""
        agents = self.agents[:n]
        targets = agents[:: max(1, n // claims)][:claims]
        profile, self.h.profiling = self.h.profiling, None
        try:
            async with (
                self.h.reinitd(workers=workers, log_level=log_level) as server,
                loadgens(loadgens_for(n)) as gens,
            ):

                def pids() -> list[int]:
                    return tree(server.process.pid)

                before = await settled_kb(lambda: rss_kb(pids()))
                kernel_before = kernel_kb()
                opened = await gens.open(
                    server.url,
                    agents,
                    limit=SCALE_OPEN_LIMIT,
                    waiting=max(50, SCALE_WAITING // len(gens.gens)),
                    retries=CAPACITY_RETRIES,
                )
                after = await settled_kb(lambda: rss_kb(pids()))
                kernel_after = kernel_kb()
                postgres_idle = self._postgres_cpu()
                idle_cpu = await cpu_share(pids, SCALE_IDLE_WINDOW)
                postgres_idle = (self._postgres_cpu() - postgres_idle) / SCALE_IDLE_WINDOW
                healthz = [await probe(server.url, "/healthz") for _ in range(10)]
                await gens.listen(self.h.db.owner_dsn)
                cpu = cpu_seconds(pids())
                sent = await self.claim_paced(targets, rate)
                got = await gens.wait_events(len(targets), 30)
                cpu = cpu_seconds(pids()) - cpu
                _, floor = await gens.events()
                still_open = (await gens.stats())["open"]
                offset = (await asyncio.to_thread(server.log_path.stat)).st_size
                # The agents stop reading first: their own reaction to 152 000 closes would
                # take the same two cores (agents live elsewhere); the kernel still takes
                # every last chunk and FIN.
                await gens.pause()
                # CPU during the stop: the servers' (reaped with their parent, so counted in
                # this process's children's usage), the load generators' and PostgreSQL's.
                stop_cpu = [
                    cpu_seconds(pids(), reaped=True),  # as the reaped total will count them
                    cpu_seconds(gens.pids),
                    self._postgres_cpu(),
                ]
                reaped = _children_cpu()
                shutdown_s = await _sigterm(server, f"{profile}-stop" if profile else None)
                stop_cpu = [
                    _children_cpu() - reaped - stop_cpu[0],
                    cpu_seconds(gens.pids) - stop_cpu[1],
                    self._postgres_cpu() - stop_cpu[2],
                ]
                stopping = (
                    await asyncio.to_thread(log_since, server.log_path, offset)
                ).splitlines()
        finally:
            self.h.profiling = profile
        await self.unclaim(targets)
        held = max(1, opened["registered"])
        kernel = {key: kernel_after[key] - kernel_before[key] for key in kernel_before}
        return {
            "workers": workers,
            "load_generators": len(gens.gens),
            "log_level": log_level,
            "streams": opened["registered"],
            "errors": opened["errors"],
            "error_samples": opened["error_samples"],
            "retried_after_503": opened["retried"],
            "open_s": opened["elapsed_s"],
            "still_open_after_claims": still_open,
            "rss_per_stream_kb": (after - before) / held,
            "kernel_slab_per_stream_kb": kernel["Slab"] / held,
            "kernel_unreclaimable_per_stream_kb": kernel["SUnreclaim"] / held,
            "kernel_tcp_buffers_per_stream_kb": kernel["tcp_mem_kb"] / held,
            "kernel_tcp_sockets_added": kernel["tcp_inuse"],
            "idle_cpu_percent": 100 * idle_cpu,
            "idle_cpu_percent_per_10k": 100 * idle_cpu * 1e4 / held,
            # the pings, and PostgreSQL's share: presence renewals, the 30 s resync re-reads
            "postgres_idle_cpu_percent": 100 * postgres_idle,
            **probe_figures("healthz", healthz),
            **latency_figures(sent, got, floor),
            "server_cpu_per_claim_us": 1e6 * cpu / max(1, len(got)),
            "shutdown_s": shutdown_s,
            "stop_cpu_servers_s": stop_cpu[0],
            "stop_cpu_load_generators_s": stop_cpu[1],
            "stop_cpu_postgres_s": stop_cpu[2],
            **_stop_figures(stopping),
        }

    async def presence_storm(self, n: int, claimed_share: float = 0.1) -> dict[str, Any]:
        """The storm of `storm` (`n` agents at once, 10 % already claimed, one worker) with
        presence off and on (in turn first: neither always meets the database as the other
        left it), beside plain aiohttp, in the same run; with each, the
        statements the server ran (pg_stat_statements: the storm and the presence reports
        that followed it, until every stream is in reinitd.agent_presence, the agents still
        connected) and the rows presence wrote."""
        agents = self.agents[:n]
        async with self.h.baseline("plain") as plain:
            base = await self._crowd(plain, agents, claimed=0, reinitd=False)
        out: dict[str, Any] = {"agents": n}
        self.presence_storms += 1
        for mode in ("off", "on") if self.presence_storms % 2 else ("on", "off"):
            claimed = agents[: int(n * claimed_share)]
            await self.h.db.sql("claim_many", [uuid.UUID(w) for _, w in claimed], self.owner)
            conn = await self.h.db.connect()
            try:
                last = await conn.fetchval(BENCH_SQL["last_receipt"])
                async with self.h.reinitd("--presence", mode) as server:
                    await conn.execute(BENCH_SQL["statements_reset"])
                    ours = await self._crowd(
                        server,
                        agents,
                        claimed=len(claimed),
                        reinitd=True,
                        held_by=functools.partial(self._presence_written, conn, last, mode == "on"),
                    )
                    # At --log-level warning: what went wrong, if anything did.
                    logged = (await asyncio.to_thread(server.log_path.read_bytes)).splitlines()
            finally:
                await conn.close()
                await self.unclaim(claimed)
            figures = {
                **ours,
                "statements_per_s": ours["statements"] / ours["all_registered_s"],
                "connects_ratio": ratio(ours["connects_per_s"], base["connects_per_s"]),
                "log_warnings": sum(b'"level": "' in line for line in logged),
                "log_top_events": top_events([line for line in logged if b'"level": "' in line]),
            }
            out |= {f"{mode}_{key}": value for key, value in figures.items()}
        return {
            **out,
            **{f"plain_{key}": value for key, value in base.items()},
            "on_over_off": ratio(out["on_connects_per_s"], out["off_connects_per_s"]),
        }

    async def _presence_written(
        self, conn: asyncpg.Connection, last: int, on: bool, streams: int
    ) -> dict[str, Any]:
        """Once presence shows every stream (bounded): what the server ran and wrote since
        the statements were reset and receipt `last` (the agents still connected)."""
        shown = await self._presence_shown(conn, streams if on else 0)
        statements = await _server_statements(conn, SERVER_ROLE)
        sizes = await conn.fetchrow(BENCH_SQL["presence_sizes"])
        assert sizes is not None
        receipts = await conn.fetch(BENCH_SQL["receipts_after"], last)
        return {
            **statements,
            "presence_shown_s": shown,
            "presence_rows_written": sizes["presence_rows"],
            "receipt_rows_written": len(receipts),
        }

    async def _presence_shown(self, conn: asyncpg.Connection, want: int) -> float:
        """Seconds until reinitd.agent_presence shows `want` requests (nan after 10 s)."""
        started = time.monotonic()
        while time.monotonic() - started < 10:
            if await conn.fetchval(BENCH_SQL["presence_rows"]) >= want:
                return time.monotonic() - started
            await asyncio.sleep(0.05)  # polled: the database says nothing when it changes
        return NAN

    async def presence_held(self, n: int, claims: int, rate: float) -> dict[str, Any]:
        """`n` streams on one worker (arriving steadily), presence on: how long after the last
        one opened they are all in reinitd.agent_presence, the rows and bytes of the presence
        and receipt tables; then `claims` claims at `rate` per second, and each receipt's lag:
        from the frame's arrival at its agent to the receipt row's first sight by a reader
        polling reinitd.delivery_receipts every 20 ms (the contract: within 2 s)."""
        agents = self.agents[:n]
        targets = agents[:: max(1, n // claims)][:claims]
        conn = await self.h.db.connect()
        poller = await self.h.db.connect()
        try:
            async with self.h.reinitd() as server, loadgens(loadgens_for(n)) as gens:
                opened = await gens.open(
                    server.url, agents, waiting=CAPACITY_WAITING, retries=CAPACITY_RETRIES
                )
                shown = await self._presence_shown(conn, opened["registered"])
                row = await conn.fetchrow(BENCH_SQL["presence_sizes"])
                assert row is not None
                sizes = dict(row)
                seen: dict[str, float] = {}
                stop = asyncio.Event()
                polling = asyncio.ensure_future(self._watch_receipts(poller, seen, stop))
                sent = await self.claim_paced(targets, rate)
                got = await gens.wait_events(len(targets), 30)
                # The receipts' window: until every delivered claim's receipt was seen by the
                # poller, or RECEIPT_WINDOW passed (a later one counts as missing).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECEIPT_WINDOW):
                        # ASYNC110: `seen` is filled by the poller task, at its own interval
                        while not got.keys() <= seen.keys():  # noqa: ASYNC110
                            await asyncio.sleep(RECEIPT_POLL)
                stop.set()
                await polling
        finally:
            await conn.close()
            await poller.close()
        await self.unclaim(targets)
        lag = [seen[w] - got[w] for w in got if w in seen]
        streams = max(1, opened["registered"])
        return {
            "streams": opened["registered"],
            "errors": opened["errors"],
            "presence_shown_s": shown,
            **sizes,
            "presence_bytes_per_stream": sizes["presence_bytes"] / streams,
            "claims": len(sent),
            "delivered": len(got),
            "receipts_seen": len(lag),
            "receipt_lag_p50_ms": 1000 * pct(lag, 0.5),
            "receipt_lag_p99_ms": 1000 * pct(lag, 0.99),
            "receipt_lag_max_ms": 1000 * max(lag, default=NAN),
            "receipt_poll_ms": 1000 * RECEIPT_POLL,
        }

    async def _watch_receipts(
        self, conn: asyncpg.Connection, seen: dict[str, float], stop: asyncio.Event
    ) -> None:
        """Note when each workspace's first receipt row became visible, until `stop`."""
        last = await conn.fetchval(BENCH_SQL["last_receipt"])
        while not stop.is_set():
            for row in await conn.fetch(BENCH_SQL["receipts_after"], last):
                seen.setdefault(str(row["workspace_id"]), time.monotonic())
                last = row["id"]
            await asyncio.sleep(RECEIPT_POLL)  # polled: receipts come with no notification
