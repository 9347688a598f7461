"""`make bench` (`python -m bench`): capacity, latency, storms, floods and baselines, in one run.

Starts its own PostgreSQL and servers, drives load from separate client processes over
loopback, prints a table and writes bench-results/latest.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from reinitd.server.embedded import Cluster, ensure_cluster, free_port
from reinitd.server.migration import migrate
from reinitd.server.query import parse_blocks
from tests.support import stop_process

BENCH_SQL = parse_blocks((Path(__file__).parent / "bench.sql").read_text())
RESULTS = Path("bench-results")
PER_CLIENT = 19_000  # streams per load-generator process (20 000 open files each)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILE: list[str] = []  # the name of the phase being profiled, when --profile is given


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- processes and their memory --------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children)
    return pids


def _sum_kb(pids: list[int], file: str, field: str) -> int:
    """Sum a `Field:  N kB` line of /proc/<pid>/<file> over processes (gone ones count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
    return total


def rss_kb(pids: list[int]) -> int:
    return _sum_kb(pids, "status", "VmRSS:")


def pss_kb(pids: list[int]) -> int:
    """Proportional set size: shared pages split among the processes sharing them."""
    return _sum_kb(pids, "smaps_rollup", "Pss:")


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def postmaster_pid(cluster: Cluster) -> int:
    return int((cluster.datadir / "postmaster.pid").read_text().split()[0])


def median_range(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextlib.asynccontextmanager
async def server(
    kind: str,
    database_url: str,
    *,
    workers: int = 1,
    ping: float = 15.0,
    log: Path | None = None,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A server process; with `log`, reinitd logs at info (JSON) into that file."""
    port = free_port()
    if kind == "reinitd":
        argv = [
            "-m",
            "reinitd",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--ping-interval",
            str(ping),
            "--log-level",
            "warning" if log is None else "info",
            "--log-format",
            "json",
        ]
    else:
        argv = ["-m", "bench.baseline", "--port", str(port), "--database-url", database_url]
    with (log or Path(os.devnull)).open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            env={**os.environ, "DATABASE_URL": database_url},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/healthz") as response:
                    if response.status == 200 and (
                        kind != "reinitd" or (await http.get(f"{url}/readyz")).status == 200
                    ):
                        break
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # let every worker finish starting
    spy = None
    if PROFILE and kind == "reinitd":
        spy = await asyncio.create_subprocess_exec(
            # beside this interpreter (the venv's), which need not be on PATH
            shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy",
            "record",
            "--pid",
            str(process.pid),
            "--subprocesses",
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(RESULTS / f"profile-{PROFILE[0]}.txt"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)
    try:
        yield process, url
    finally:
        if spy is not None:
            with contextlib.suppress(ProcessLookupError):  # it stops with its target
                spy.send_signal(signal.SIGINT)
            await spy.wait()
        await stop_process(process, timeout=30)


async def server_histograms(url: str) -> dict[str, float]:
    """Where the time goes inside the server: mean NOTIFY-to-write and batched-read times from
    its own /metrics (histogram sums over counts)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    out = {"server_reads": values.get('reinitd_reads_total{outcome="ok"}', 0.0)}
    for metric, key in (
        ("reinitd_notify_to_write_seconds", "server_notify_to_write_mean_ms"),
        ("reinitd_read_duration_seconds", "server_read_mean_ms"),
    ):
        count = values.get(f"{metric}_count", 0.0)
        out[key] = 1000 * values.get(f"{metric}_sum", 0.0) / count if count else float("nan")
    return out


class LoadGen:
    """A load-generator process, spoken to over its stdin/stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> LoadGen:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.loadgen",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**28,
        )
        return cls(process)

    async def call(self, cmd: str, **kwargs: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write((json.dumps({"cmd": cmd, **kwargs}) + "\n").encode())
        await self.process.stdin.drain()
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator died during {cmd}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.call("exit")
        await self.process.wait()


@contextlib.asynccontextmanager
async def loadgens(count: int) -> AsyncIterator[list[LoadGen]]:
    gens = [await LoadGen.start() for _ in range(count)]
    try:
        yield gens
    finally:
        for gen in gens:
            await gen.stop()


async def open_all(gens: list[LoadGen], url: str, agents: list[tuple[str, str]]) -> dict[str, Any]:
    """Open every agent's stream at once, spread over the generators and source addresses."""
    share = -(-len(agents) // len(gens))
    replies = await asyncio.gather(
        *(
            gen.call(
                "open",
                url=url,
                agents=agents[i * share : (i + 1) * share],
                sources=[f"127.0.0.{2 * i + 1}", f"127.0.0.{2 * i + 2}"],
            )
            for i, gen in enumerate(gens)
        )
    )
    return {
        "requested": sum(r["requested"] for r in replies),
        "registered": sum(r["registered"] for r in replies),
        "errors": sum(r["errors"] for r in replies),
        "error_samples": [s for r in replies for s in r["error_samples"]][:5],
        "elapsed_s": max(r["started_at"] + r["elapsed_s"] for r in replies)
        - min(r["started_at"] for r in replies),
        "ttfb_p99_s": max(r["ttfb_p99_s"] for r in replies),
        "ttfb_p50_s": statistics.median(r["ttfb_p50_s"] for r in replies),
        "events": sum(r["events"] for r in replies),
    }


async def events(gens: list[LoadGen]) -> tuple[dict[str, float], dict[str, float]]:
    got: dict[str, float] = {}
    floor: dict[str, float] = {}
    for gen in gens:
        reply = await gen.call("events")
        got.update(reply["events"])
        floor.update(reply["floor"])
    return got, floor


async def wait_events(
    gens: list[LoadGen],
    want: int,
    timeout: float,  # noqa: ASYNC109 -- the bound is applied inside the generators
) -> dict[str, float]:
    """Wait (inside the generators, without polling) until `want` first events arrived."""
    share = -(-want // len(gens))
    await asyncio.gather(*(gen.call("wait_events", count=share, timeout=timeout) for gen in gens))
    got, _ = await events(gens)
    return got


# --- the scenarios ---------------------------------------------------------------------------


class Bench:
    def __init__(self, cluster: Cluster, dsn: str, agents: list[tuple[str, str]], owner: uuid.UUID):
        self.cluster = cluster
        self.dsn = dsn
        self.agents = agents
        self.owner = owner

    async def sql(self, name: str, *args: Any) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(BENCH_SQL[name], *args)
        finally:
            await conn.close()

    async def unclaim(self, agents: list[tuple[str, str]]) -> None:
        await self.sql("unclaim", [uuid.UUID(w) for _, w in agents])
        await self.sql("settle")

    async def capacity(self, n: int, workers: int) -> dict[str, Any]:
        async with (
            server("reinitd", self.dsn, workers=workers, ping=2.0) as (proc, url),
            loadgens(-(-n // PER_CLIENT)) as gens,
        ):
            pids = tree(proc.pid)
            before = rss_kb(pids)
            opened = await open_all(gens, url, self.agents[:n])
            await asyncio.sleep(2.0)
            after = rss_kb(tree(proc.pid))
            cpu0, t0 = cpu_seconds(tree(proc.pid)), time.monotonic()
            await asyncio.sleep(10.0)
            cpu = (cpu_seconds(tree(proc.pid)) - cpu0) / (time.monotonic() - t0)
            async with aiohttp.ClientSession() as http:
                started = time.monotonic()
                async with http.get(f"{url}/healthz") as response:
                    healthz = (response.status, time.monotonic() - started)
            stats = [await gen.call("stats") for gen in gens]
            still_open = sum(s["open"] for s in stats)
            shutdown_started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
            shutdown_s = time.monotonic() - shutdown_started
        return {
            "workers": workers,
            "waiters": opened["registered"],
            "errors": opened["errors"],
            "still_open_after_idle": still_open,
            "open_s": opened["elapsed_s"],
            "rss_before_kb": before,
            "rss_after_kb": after,
            "rss_per_waiter_kb": (after - before) / max(1, opened["registered"]),
            "idle_cpu_percent": 100 * cpu,
            "ping_interval_s": 2.0,
            "healthz_status": healthz[0],
            "healthz_s": healthz[1],
            "shutdown_s": shutdown_s,
        }

    async def latency(self, n: int, claims: int, rate: float) -> dict[str, Any]:
        agents = self.agents[:n]
        targets = agents[:: max(1, n // claims)][:claims]
        async with server("reinitd", self.dsn) as (_proc, url), loadgens(1) as gens:
            opened = await open_all(gens, url, agents)
            await gens[0].call("listen", dsn=self.dsn)
            conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
            sent: dict[str, float] = {}
            try:
                for _, workspace in targets:
                    sent[workspace] = time.monotonic()
                    await conn.execute(BENCH_SQL["claim_one"], uuid.UUID(workspace), self.owner)
                    await asyncio.sleep(max(0.0, sent[workspace] + 1 / rate - time.monotonic()))
            finally:
                await conn.close()
            await wait_events(gens, len(targets), 10)
            got, floor = await events(gens)
            inside = await server_histograms(url)
        await self.unclaim(targets)
        lat = [got[w] - sent[w] for w in sent if w in got]
        base = [floor[w] - sent[w] for w in sent if w in floor]
        over = [got[w] - floor[w] for w in sent if w in got and w in floor]
        return {
            "waiters": opened["registered"],
            "claims": len(sent),
            "delivered": len(lat),
            "p50_ms": 1000 * pct(lat, 0.5),
            "p99_ms": 1000 * pct(lat, 0.99),
            "max_ms": 1000 * max(lat),
            "floor_p50_ms": 1000 * pct(base, 0.5),
            "floor_p99_ms": 1000 * pct(base, 0.99),
            "overhead_p50_ms": 1000 * pct(over, 0.5),
            "overhead_p99_ms": 1000 * pct(over, 0.99),
            "p99_minus_floor_p99_ms": 1000 * (pct(lat, 0.99) - pct(base, 0.99)),
            **inside,
        }

    async def burst(self, n: int) -> dict[str, Any]:
        agents = self.agents[:n]
        async with server("reinitd", self.dsn) as (_proc, url), loadgens(1) as gens:
            opened = await open_all(gens, url, agents)
            conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
            try:
                async with conn.transaction():
                    await conn.execute(
                        BENCH_SQL["claim_many"], [uuid.UUID(w) for _, w in agents], self.owner
                    )
                    committed = time.monotonic()  # COMMIT is sent as the block exits
            finally:
                await conn.close()
            got = await wait_events(gens, n, 15)
            inside = await server_histograms(url)
        await self.unclaim(agents)
        return {
            "waiters": opened["registered"],
            "delivered": len(got),
            "errors": opened["errors"],
            "error_samples": opened["error_samples"],
            "all_delivered_s": max(got.values()) - committed if got else float("nan"),
            **inside,
        }

    async def storm(self, n: int, workers: int, claimed_share: float = 0.1) -> dict[str, Any]:
        agents = self.agents[:n]
        claimed = agents[: int(n * claimed_share)]
        await self.sql("claim_many", [uuid.UUID(w) for _, w in claimed], self.owner)
        try:
            async with (
                server("reinitd", self.dsn, workers=workers) as (proc, url),
                loadgens(-(-n // PER_CLIENT)) as gens,
            ):
                pm = postmaster_pid(self.cluster)
                before = (
                    cpu_seconds(tree(proc.pid)),
                    cpu_seconds(tree(pm)),
                    cpu_seconds([g.process.pid for g in gens]),
                )
                opened = await open_all(gens, url, agents)
                after = (
                    cpu_seconds(tree(proc.pid)),
                    cpu_seconds(tree(pm)),
                    cpu_seconds([g.process.pid for g in gens]),
                )
                got = await wait_events(gens, len(claimed), 10)
        finally:
            await self.unclaim(claimed)
        return {
            "workers": workers,
            "agents": n,
            "registered": opened["registered"],
            "errors": opened["errors"],
            "error_samples": opened["error_samples"],
            "all_registered_s": opened["elapsed_s"],
            "connects_per_s": opened["registered"] / opened["elapsed_s"],
            "ttfb_p50_ms": 1000 * opened["ttfb_p50_s"],
            "ttfb_p99_ms": 1000 * opened["ttfb_p99_s"],
            "server_cpu_s": after[0] - before[0],
            "postgres_cpu_s": after[1] - before[1],
            "client_cpu_s": after[2] - before[2],
            "claimed": len(claimed),
            "claimed_delivered": len(got),
        }

    async def forged(self, n: int, seconds: float, rate: float) -> dict[str, Any]:  # noqa: PLR0915
        """A role with no grants NOTIFYs as fast as it can for `seconds`, naming workspaces that
        agents wait on, while real claims arrive at `rate` per second: what the flood costs
        the server (CPU, log lines) and the real claims (latency over the raw-LISTEN floor)."""
        agents = self.agents[:n]
        await self.sql("forger")
        forger_dsn = self.cluster.dsn("reinitd", user="bench_forger")
        log = RESULTS / "forged-server.log"
        log.unlink(missing_ok=True)
        targets = agents[n // 2 :][: int(seconds * rate)]
        async with (
            server("reinitd", self.dsn, log=log) as (proc, url),
            loadgens(1) as gens,
        ):
            opened = await open_all(gens, url, agents)
            await gens[0].call("listen", dsn=self.dsn)
            waiting = [uuid.UUID(w) for _, w in agents[: n // 2]]
            lines_before = len(log.read_bytes().splitlines())
            cpu0, started = cpu_seconds(tree(proc.pid)), time.monotonic()
            stop = started + seconds
            sent_forged = [0]

            async def forge() -> None:
                conn: asyncpg.Connection = await asyncpg.connect(forger_dsn)
                try:
                    i = 0
                    while time.monotonic() < stop:
                        batch = [str(waiting[(i + k) % len(waiting)]) for k in range(100)]
                        i += 100
                        await conn.execute(BENCH_SQL["forge"], batch)
                        sent_forged[0] += len(batch)
                finally:
                    await conn.close()

            async def claim() -> dict[str, float]:
                conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
                sent: dict[str, float] = {}
                try:
                    for _, workspace in targets:
                        sent[workspace] = time.monotonic()
                        await conn.execute(BENCH_SQL["claim_one"], uuid.UUID(workspace), self.owner)
                        await asyncio.sleep(max(0.0, sent[workspace] + 1 / rate - time.monotonic()))
                finally:
                    await conn.close()
                return sent

            forgers = asyncio.gather(*(forge() for _ in range(4)))
            sent = await claim()
            await forgers
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(tree(proc.pid)) - cpu0
            written = log.read_bytes().splitlines()[lines_before:]
            # The real claims' own delivery lines are not the flood's doing.
            lines = sum(b'"reinit_delivered"' not in line for line in written)
            await wait_events(gens, len(targets), 30)
            got, floor = await events(gens)
            stats = await gens[0].call("stats")
            inside = await server_histograms(url)
        await self.unclaim(targets)
        lat = [got[w] - sent[w] for w in sent if w in got]
        base = [floor[w] - sent[w] for w in sent if w in floor]
        return {
            "waiters": opened["registered"],
            "forged_notifies": sent_forged[0],
            "forged_per_s": sent_forged[0] / elapsed,
            "server_cpu_percent": 100 * cpu / elapsed,
            "log_lines_per_s": lines / elapsed,
            "claims": len(sent),
            "delivered": len(lat),
            "streams_closed": stats["closed"],
            "p50_ms": 1000 * pct(lat, 0.5),
            "p99_ms": 1000 * pct(lat, 0.99),
            "floor_p99_ms": 1000 * pct(base, 0.99),
            "p99_minus_floor_p99_ms": 1000 * (pct(lat, 0.99) - pct(base, 0.99)),
            **inside,
        }

    async def naive(self, limit: int, step: int = 50) -> dict[str, Any]:
        pm = postmaster_pid(self.cluster)
        async with server("naive", self.dsn) as (proc, url), loadgens(1) as gens:
            pg_before = pss_kb(tree(pm))
            srv_before = rss_kb([proc.pid])
            held, broke = 0, ""
            while held < limit:
                reply = await gens[0].call(
                    "open",
                    url=url,
                    agents=self.agents[held : held + step],
                    sources=["127.0.0.1"],
                    timeout=30.0,
                )
                held += reply["registered"]
                if reply["errors"]:
                    sample = (reply["error_samples"] or ["errors"])[0]
                    broke = (
                        f"broke with {sample} at waiter {held + 1}: PostgreSQL's "
                        f"max_connections is {self.cluster.max_connections}"
                    )
                    break
            await asyncio.sleep(1.0)
            pg_after = pss_kb(tree(pm))
            srv_after = rss_kb([proc.pid])
        per = (pg_after - pg_before + srv_after - srv_before) / max(1, held)
        return {
            "waiters_held": held,
            "broke_with": broke or f"stopped at the limit of {limit}",
            "max_connections": self.cluster.max_connections,
            "server_rss_per_waiter_kb": (srv_after - srv_before) / max(1, held),
            "postgres_pss_per_waiter_kb": (pg_after - pg_before) / max(1, held),
            "memory_per_waiter_kb": per,
        }

    async def recovery(self, n: int = 1000) -> dict[str, Any]:
        agents = self.agents[:n]
        result: dict[str, Any] = {}
        async with server("reinitd", self.dsn) as (_proc, url), loadgens(1) as gens:
            await open_all(gens, url, agents)
            conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
            try:
                started = time.monotonic()
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'reinitd-listener'"
                )
                await conn.execute(BENCH_SQL["claim_one"], uuid.UUID(agents[0][1]), self.owner)
            finally:
                await conn.close()
            got = await wait_events(gens, 1, 30)
            result["killed_listener_to_event_s"] = got[agents[0][1]] - started
            started = time.monotonic()
            await asyncio.to_thread(self.cluster.restart)
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(BENCH_SQL["claim_one"], uuid.UUID(agents[1][1]), self.owner)
            finally:
                await conn.close()
            got = await wait_events(gens, 2, 60)
            result["postgres_restart_to_event_s"] = got[agents[1][1]] - started
        await self.unclaim(agents[:2])
        return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="reinitd-bench-"))
    os.chmod(root, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    cluster = ensure_cluster(root / "data", fsync=False)
    cluster.max_connections = args.max_connections
    cluster.restart()
    try:
        dsn = await cluster.ensure_database()
        await migrate(dsn)
        total = max(args.waiters * args.max_workers, args.storm, args.latency_waiters)
        say(f"provisioning {total} prebuilds")
        conn: asyncpg.Connection = await asyncpg.connect(dsn)
        rows = await conn.fetch(BENCH_SQL["provision"], total)
        owner = await conn.fetchval("SELECT reinitd.create_user('bench-owner')")
        await conn.execute(BENCH_SQL["settle"])
        await conn.close()
        bench = Bench(
            cluster, dsn, [(r["agent_token"], str(r["workspace_id"])) for r in rows], owner
        )
        out: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "runs": args.runs,
            },
        }

        only = set(args.only.split(","))

        async def repeat(
            key: str, name: str, make: Callable[[], Awaitable[dict[str, Any]]], runs: int
        ) -> None:
            if key.split("_", 1)[0] not in only:
                return
            PROFILE[:] = [key] if args.profile else []
            samples = []
            for i in range(runs):
                say(f"{name}: run {i + 1}/{runs}")
                samples.append(await make())
            keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
            out[key] = {"runs": samples, **{k: median_range([s[k] for s in samples]) for k in keys}}

        def capacity(n: int, workers: int) -> Callable[[], Awaitable[dict[str, Any]]]:
            return lambda: bench.capacity(n, workers)

        def storm(workers: int) -> Callable[[], Awaitable[dict[str, Any]]]:
            return lambda: bench.storm(args.storm, workers)

        for workers in range(1, args.max_workers + 1):
            n = args.waiters * workers
            await repeat(
                f"capacity_w{workers}",
                f"capacity: {n} waiters, {workers} worker(s)",
                capacity(n, workers),
                args.runs if workers == 1 else 1,
            )
        await repeat(
            "latency",
            f"latency at {args.latency_waiters} waiters",
            lambda: bench.latency(args.latency_waiters, args.claims, args.rate),
            args.runs,
        )
        await repeat(
            "burst",
            f"burst of {args.latency_waiters} claims",
            lambda: bench.burst(args.latency_waiters),
            args.runs,
        )
        for workers in range(1, args.max_workers + 1):
            await repeat(
                f"storm_w{workers}",
                f"storm of {args.storm}, {workers} worker(s)",
                storm(workers),
                args.runs,
            )
        await repeat(
            "forged",
            f"forged-NOTIFY flood at {args.latency_waiters} waiters",
            lambda: bench.forged(args.latency_waiters, 10.0, 20.0),
            args.runs,
        )
        await repeat("naive", "naive baseline", lambda: bench.naive(args.naive_limit), 1)
        await repeat("recovery", "recovery", bench.recovery, 1)
        return out
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def report(out: dict[str, Any]) -> str:
    def m(section: str, key: str, fmt: str = "{:.1f}") -> str:
        value = out[section][key]
        low, high = fmt.format(value["min"]), fmt.format(value["max"])
        return f"{fmt.format(value['median'])} [{low} .. {high}]"

    lines = [f"reinitd benchmark: {out['machine']}", "(median [min .. max] of the runs)", ""]
    for key in sorted(k for k in out if k.startswith("capacity_w")):
        lines.append(
            f"1. Capacity, {key[-1]} worker(s): {m(key, 'waiters', '{:.0f}')} waiters, errors "
            f"{m(key, 'errors', '{:.0f}')}; server RSS per waiter "
            f"{m(key, 'rss_per_waiter_kb', '{:.2f}')} KB; idle CPU "
            f"{m(key, 'idle_cpu_percent', '{:.2f}')} % with a ping every 2 s; /healthz at the "
            f"limit {m(key, 'healthz_s', '{:.3f}')} s; SIGTERM to exit with all streams open "
            f"{m(key, 'shutdown_s', '{:.2f}')} s"
        )
    if "latency" in out:
        lines.append(
            f"2. Latency, commit to frame, at {out['latency']['runs'][0]['waiters']} waiters: "
            f"p50 {m('latency', 'p50_ms', '{:.2f}')} ms, p99 {m('latency', 'p99_ms', '{:.2f}')} "
            f"ms, max {m('latency', 'max_ms', '{:.2f}')} ms. Floor (raw asyncpg LISTEN): p50 "
            f"{m('latency', 'floor_p50_ms', '{:.2f}')} ms, p99 "
            f"{m('latency', 'floor_p99_ms', '{:.2f}')} ms. reinitd p99 minus floor p99: "
            f"{m('latency', 'p99_minus_floor_p99_ms', '{:.2f}')} ms; per-claim overhead over "
            f"the floor p50 {m('latency', 'overhead_p50_ms', '{:.2f}')} ms, p99 "
            f"{m('latency', 'overhead_p99_ms', '{:.2f}')} ms"
        )
    if "burst" in out:
        lines.append(
            f"   Burst, all claims in one transaction: {m('burst', 'delivered', '{:.0f}')} of "
            f"{m('burst', 'waiters', '{:.0f}')} delivered, the last "
            f"{m('burst', 'all_delivered_s', '{:.3f}')} s after COMMIT"
        )
    for key in sorted(k for k in out if k.startswith("storm_w")):
        lines.append(
            f"3. Reconnect storm, {key[-1]} worker(s): {m(key, 'registered', '{:.0f}')} "
            f"registered in {m(key, 'all_registered_s', '{:.2f}')} s = "
            f"{m(key, 'connects_per_s', '{:.0f}')} connects/s; errors "
            f"{m(key, 'errors', '{:.0f}')}; time to first byte p50 "
            f"{m(key, 'ttfb_p50_ms', '{:.0f}')} ms, p99 {m(key, 'ttfb_p99_ms', '{:.0f}')} ms; "
            f"already-claimed agents served {m(key, 'claimed_delivered', '{:.0f}')} of "
            f"{m(key, 'claimed', '{:.0f}')}"
        )
    if "forged" in out:
        lines.append(
            f"   Forged-NOTIFY flood (a role with no grants, 10 s, naming waited-on workspaces): "
            f"{m('forged', 'forged_per_s', '{:.0f}')} NOTIFY/s; server CPU "
            f"{m('forged', 'server_cpu_percent', '{:.0f}')} % of a core; log lines (other than "
            f"the real claims' reinit_delivered) {m('forged', 'log_lines_per_s', '{:.2f}')}/s; "
            f"streams ended "
            f"{m('forged', 'streams_closed', '{:.0f}')}; real claims meanwhile "
            f"{m('forged', 'delivered', '{:.0f}')} of {m('forged', 'claims', '{:.0f}')}, p99 "
            f"{m('forged', 'p99_ms', '{:.2f}')} ms = floor p99 "
            f"{m('forged', 'floor_p99_ms', '{:.2f}')} ms + "
            f"{m('forged', 'p99_minus_floor_p99_ms', '{:.2f}')} ms"
        )
    if "naive" in out:
        naive = out["naive"]["runs"][0]
        line = (
            f"4. Naive baseline (a connection and LISTEN per request): held "
            f"{naive['waiters_held']} waiters, {naive['broke_with']}; "
            f"{naive['memory_per_waiter_kb']:.0f} KB per waiter (server "
            f"{naive['server_rss_per_waiter_kb']:.0f} + PostgreSQL backend PSS "
            f"{naive['postgres_pss_per_waiter_kb']:.0f})"
        )
        if "capacity_w1" in out:
            ours = out["capacity_w1"]["rss_per_waiter_kb"]["median"]
            line += (
                f"; reinitd holds {naive['memory_per_waiter_kb'] / ours:.0f}x the waiters per GB"
            )
        lines.append(line)
    if "recovery" in out:
        rec = out["recovery"]["runs"][0]
        lines.append(
            f"5. Recovery: listener backend killed, claim committed at once: event after "
            f"{rec['killed_listener_to_event_s']:.3f} s; PostgreSQL restarted (fast), claim "
            f"after it: event {rec['postgres_restart_to_event_s']:.3f} s after the restart began"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--waiters", type=int, default=19_000, help="per worker")
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--latency-waiters", type=int, default=10_000)
    parser.add_argument("--claims", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="claims per second")
    parser.add_argument("--storm", type=int, default=10_000)
    parser.add_argument("--naive-limit", type=int, default=1100)
    parser.add_argument("--max-connections", type=int, default=1000)
    parser.add_argument(
        "--only",
        default="capacity,latency,burst,storm,forged,naive,recovery",
        help="comma-separated sections to run",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record each reinitd server with py-spy into bench-results/",
    )
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    out = asyncio.run(run(args))
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=2))
    print(report(out))
    print(f"\n(full figures: {RESULTS / 'latest.json'})")


if __name__ == "__main__":
    main()
