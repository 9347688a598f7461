"""The benchmark's machinery: its PostgreSQL, the servers under test (reinitd and the
baselines, started with the tests' own server-process helper), the load-generator processes
and the probes. Every wait here is bounded and waits on a condition."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from reinitd.server.embedded import Cluster, free_port
from reinitd.server.query import parse_blocks
from tests.support import ServerProcess, python_module, python_server, server_process

RESULTS = Path("bench-results")
BENCH_SQL = parse_blocks((Path(__file__).parent / "bench.sql").read_text())
# Streams per load-generator process: each may hold 20 000 open files.
PER_LOADGEN = 19_000
# Connections per source address: one address reaches one server port from ~28 000
# ephemeral ports; staying well below keeps port selection cheap.
PER_SOURCE = 10_000


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadgens_for(connections: int) -> int:
    return max(1, -(-connections // PER_LOADGEN))


def sources(index: int, connections: int) -> list[str]:
    """Source addresses for the load generator numbered `index`: its own, enough of them."""
    return [f"127.0.{index + 1}.{k + 1}" for k in range(max(1, -(-connections // PER_SOURCE)))]


@dataclass
class Database:
    """The benchmark's cluster: the owner runs provisioning, claims and SQL; servers log in
    as the least-privileged server role, as deployed."""

    cluster: Cluster
    owner_dsn: str
    server_dsn: str

    async def connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(self.owner_dsn)
        return conn

    async def sql(self, name: str, *args: Any) -> None:
        conn = await self.connect()
        try:
            await conn.execute(BENCH_SQL[name], *args)
        finally:
            await conn.close()

    def postmaster_pid(self) -> int:
        return int((self.cluster.datadir / "postmaster.pid").read_text().split()[0])


class LoadGen:
    """A load-generator process (bench/loadgen.py), spoken to over its stdin/stdout."""

    def __init__(self, process: asyncio.subprocess.Process, index: int) -> None:
        self.process = process
        self.index = index

    @classmethod
    async def start(cls, index: int) -> LoadGen:
        process = await python_module(
            "bench.loadgen",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**28,
        )
        return cls(process, index)

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


class LoadGens:
    """Load-generator processes used together: work is split evenly, each from its own
    source addresses."""

    def __init__(self, gens: list[LoadGen]) -> None:
        self.gens = gens

    @property
    def pids(self) -> list[int]:
        return [gen.process.pid for gen in self.gens]

    async def open(
        self,
        url: str,
        agents: Sequence[tuple[str, str]],
        limit: float = 120.0,
        waiting: int | None = None,
        retries: int = 0,
    ) -> dict[str, Any]:
        """Open every agent's `wait=true` stream, spread over the generators: all at once, or
        with at most `waiting` requests per generator awaiting their headers; an agent refused
        with 503 tries again up to `retries` times."""
        share = -(-len(agents) // len(self.gens))
        replies = await asyncio.gather(
            *(
                gen.call(
                    "open",
                    url=url,
                    agents=agents[i * share : (i + 1) * share],
                    sources=sources(gen.index, share),
                    timeout=limit,
                    waiting=waiting,
                    retries=retries,
                )
                for i, gen in enumerate(self.gens)
            )
        )
        return {
            "requested": sum(r["requested"] for r in replies),
            "registered": sum(r["registered"] for r in replies),
            "errors": sum(r["errors"] for r in replies),
            "retried": sum(r["retried"] for r in replies),
            "error_samples": [s for r in replies for s in r["error_samples"]][:5],
            "elapsed_s": max(r["started_at"] + r["elapsed_s"] for r in replies)
            - min(r["started_at"] for r in replies),
            "ttfb_p99_s": max(r["ttfb_p99_s"] for r in replies),
            "ttfb_p50_s": statistics.median(r["ttfb_p50_s"] for r in replies),
            "events": sum(r["events"] for r in replies),
        }

    async def open_idle(self, url: str, per_gen: int) -> dict[str, Any]:
        """`per_gen` connections from each generator that never send a byte."""
        replies = await asyncio.gather(
            *(
                gen.call("idle", url=url, count=per_gen, sources=sources(gen.index, per_gen))
                for gen in self.gens
            )
        )
        out: dict[str, Any] = {
            key: sum(r[key] for r in replies)
            for key in ("requested", "connected", "timed_out", "failed")
        }
        out["error_samples"] = [s for r in replies for s in r["error_samples"]][:5]
        out["elapsed_s"] = max(r["elapsed_s"] for r in replies)
        return out

    async def listen(self, dsn: str) -> None:
        """A raw asyncpg LISTEN in the first generator: the latency floor."""
        await self.gens[0].call("listen", dsn=dsn)

    async def events(self) -> tuple[dict[str, float], dict[str, float]]:
        """First-event receipt times per workspace, and the floor's."""
        got: dict[str, float] = {}
        floor: dict[str, float] = {}
        for gen in self.gens:
            reply = await gen.call("events")
            got.update(reply["events"])
            floor.update(reply["floor"])
        return got, floor

    async def wait_events(self, want: int, limit: float) -> dict[str, float]:
        """Wait (inside the generators, without polling) until `want` first events arrived,
        at most `limit` seconds; returns the receipt times that did arrive."""
        share = -(-want // len(self.gens))
        await asyncio.gather(
            *(gen.call("wait_events", count=share, timeout=limit) for gen in self.gens)
        )
        got, _ = await self.events()
        return got

    async def stats(self) -> dict[str, int]:
        replies = [await gen.call("stats") for gen in self.gens]
        return {key: sum(r[key] for r in replies) for key in replies[0]}

    async def pause(self) -> None:
        """Every generator stops reading its streams (see loadgen `pause`)."""
        for gen in self.gens:
            await gen.call("pause")

    async def close(self) -> None:
        for gen in self.gens:
            await gen.call("close")


@contextlib.asynccontextmanager
async def loadgens(count: int, first: int = 0) -> AsyncIterator[LoadGens]:
    """`count` load generators, numbered from `first` (their source addresses follow)."""
    gens: list[LoadGen] = []
    try:
        for index in range(first, first + count):
            gens.append(await LoadGen.start(index))
        yield LoadGens(gens)
    finally:
        for gen in gens:
            await gen.stop()


async def probe(url: str, path: str, limit: float = 5.0) -> tuple[int, float]:
    """One GET on a fresh connection: (status, seconds), status 0 if it failed or took
    longer than `limit` seconds."""
    started = time.monotonic()
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=limit)
            ) as http,
            http.get(f"{url}{path}") as response,
        ):
            await response.read()
            return response.status, time.monotonic() - started
    except (aiohttp.ClientError, TimeoutError):
        return 0, time.monotonic() - started


async def probes(
    url: str, path: str, count: int = 5, spacing: float = 0.5
) -> list[tuple[int, float]]:
    """`count` probes, one every `spacing` seconds (or as soon as the previous one ended)."""
    results = []
    for _ in range(count):
        started = time.monotonic()
        results.append(await probe(url, path))
        await asyncio.sleep(max(0.0, started + spacing - time.monotonic()))  # pacing
    return results


async def until_healthy(url: str, limit: float = 30.0) -> float:
    """Seconds until /healthz answers 200 (probed on fresh connections); nan after `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        status, _ = await probe(url, "/healthz", limit=min(5.0, limit))
        if status == 200:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return float("nan")


async def server_timings(url: str) -> dict[str, float]:
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
    out["gc_settles"] = values.get("reinitd_gc_settles_total", 0.0)
    gc_counts = [
        values.get(f'reinitd_gc_pause_seconds_count{{generation="{g}"}}', 0.0) for g in "012"
    ]
    gc_fast = [
        values.get(f'reinitd_gc_pause_seconds_bucket{{generation="{g}",le="0.005"}}', 0.0)
        for g in "012"
    ]
    out["gc_pauses_over_5ms"] = sum(gc_counts) - sum(gc_fast)
    out["gc_pause_total_ms"] = 1000 * sum(
        values.get(f'reinitd_gc_pause_seconds_sum{{generation="{g}"}}', 0.0) for g in "012"
    )
    for metric, key in (
        ("reinitd_notify_to_write_seconds", "server_notify_to_write_mean_ms"),
        ("reinitd_read_duration_seconds", "server_read_mean_ms"),
    ):
        count = values.get(f"{metric}_count", 0.0)
        out[key] = 1000 * values.get(f"{metric}_sum", 0.0) / count if count else float("nan")
    return out


async def gc_settled(url: str, since: float) -> None:
    """Until the server has settled its collector after the streams just opened (it does so
    once their storm is over; 30 s at most): what follows then measures the steady state."""
    async with asyncio.timeout(30):
        # ASYNC110: the server's metrics are polled; there is no event to await here
        while (await server_timings(url))["gc_settles"] <= since:  # noqa: ASYNC110
            await asyncio.sleep(0.2)


class Harness:
    """Starts what a scenario needs; `profiling` names the scenario when --profile records
    each reinitd server with py-spy."""

    def __init__(
        self,
        database: Database,
        log_dir: Path,
        event_loop: str = "auto",
        baseline_loop: str = "asyncio",
    ) -> None:
        self.db = database
        self.log_dir = log_dir
        self.event_loop = event_loop
        self.baseline_loop = baseline_loop
        self.profiling: str | None = None

    @contextlib.asynccontextmanager
    async def reinitd(
        self, *args: str, workers: int = 1, log_level: str = "warning"
    ) -> AsyncIterator[ServerProcess]:
        """`reinitd serve` as deployed (JSON logs into a file, the server role), ready once
        every worker serves and /readyz answers."""
        async with server_process(
            self.db.server_dsn,
            self.log_dir,
            "--log-level",
            log_level,
            "--event-loop",
            self.event_loop,
            *args,
            workers=workers,
            timeout=60,
            stop_timeout=60,
        ) as server:
            if self.profiling is None:
                yield server
            else:
                async with profiled(server.process.pid, RESULTS / f"profile-{self.profiling}"):
                    yield server

    @contextlib.asynccontextmanager
    async def baseline(self, kind: str) -> AsyncIterator[ServerProcess]:
        """A baseline server of bench/baseline.py, ready on /healthz: `naive` logs in as the
        server role; `fanout` as the owner (it reads the token map once, at start)."""
        port = free_port()
        dsn = self.db.owner_dsn if kind == "fanout" else self.db.server_dsn
        async with python_server(
            [
                "bench.baseline",
                kind,
                "--port",
                str(port),
                "--database-url",
                dsn,
                "--event-loop",
                self.baseline_loop,
            ],
            port,
            self.log_dir / f"{kind}-{port}-{uuid.uuid4().hex[:6]}.log",
            ready_path="/healthz",
            timeout=60,
        ) as server:
            yield server


@contextlib.asynccontextmanager
async def profiled(pid: int, stem: Path) -> AsyncIterator[None]:
    """py-spy recording `pid` and its workers into `stem`.txt while the block runs; the block
    starts once py-spy says it samples."""
    output = stem.with_suffix(".log")
    with output.open("wb") as out:
        spy = await asyncio.create_subprocess_exec(
            # beside this interpreter (the venv's), which need not be on PATH
            shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy",
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(stem.with_suffix(".txt")),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async with asyncio.timeout(30):
            while b"Sampling process" not in await asyncio.to_thread(output.read_bytes):
                if spy.returncode is not None:
                    raise RuntimeError(f"py-spy exited: {output.read_text(errors='replace')}")
                await asyncio.sleep(0.05)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # it stops with its target
            spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        await asyncio.wait_for(spy.wait(), 60)
