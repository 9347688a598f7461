"""`make bench` (`python -m bench`): capacity, latency, storms, floods and baselines, in one run.

Starts its own PostgreSQL, reinitd servers and baseline servers, drives load from separate
load-generator processes over loopback, prints a summary (each figure beside its same-run
baseline) and writes every figure to bench-results/latest.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import BENCH_SQL, RESULTS, Database, Harness, say
from bench.measure import median_range
from bench.report import report
from bench.scenarios import Scenarios
from reinitd.server.embedded import Cluster, ensure_cluster
from reinitd.server.migration import migrate

SECTIONS = (
    "capacity",
    "latency",
    "burst",
    "storm",
    "lone",
    "forged",
    "flood",
    "compound",
    "naive",
    "recovery",
)
# Run only when asked (--only): scale holds 152 000 streams for minutes, and presence preloads
# pg_stat_statements into the bench's PostgreSQL.
EXTRA_SECTIONS = ("presence", "scale")
Run = Callable[[], Awaitable[dict[str, Any]]]


async def prepare(
    cluster: Cluster, log_dir: Path, prebuilds: int, args: argparse.Namespace, statements: bool
) -> Scenarios:
    """The schema, the server's login role and `prebuilds` prebuilt workspaces (and, with
    `statements`, the pg_stat_statements extension)."""
    owner_dsn = await cluster.ensure_database()
    await migrate(owner_dsn)
    database = Database(cluster, owner_dsn, await cluster.ensure_server_role())
    say(f"provisioning {prebuilds} prebuilds")
    conn: asyncpg.Connection = await asyncpg.connect(owner_dsn)
    try:
        rows = await conn.fetch(BENCH_SQL["provision"], prebuilds)
        owner = await conn.fetchval(BENCH_SQL["owner"])
        await conn.execute(BENCH_SQL["settle"])
        if statements:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()
    agents = [(r["agent_token"], str(r["workspace_id"])) for r in rows]
    harness = Harness(database, log_dir, args.event_loop, args.baseline_loop)
    return Scenarios(harness, agents, owner)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="reinitd-bench-"))
    os.chmod(root, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    cluster = ensure_cluster(root / "data", fsync=False)
    cluster.max_connections = args.max_connections
    only = set(args.only.split(","))
    if "presence" in only:  # statements counted per query, as they run
        with (cluster.datadir / "postgresql.conf").open("a") as conf:
            conf.write("shared_preload_libraries = 'pg_stat_statements'\n")
    cluster.restart()
    try:
        prebuilds = max(
            args.waiters * args.max_workers,
            args.storm,
            args.latency_waiters,
            args.flood_streams,
            args.presence_streams if "presence" in only else 0,
            args.scale if "scale" in only else 0,
        )
        bench = await prepare(cluster, root, prebuilds, args, "presence" in only)
        out: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "runs": args.runs,
            },
        }

        async def repeat(key: str, name: str, make: Run, runs: int) -> None:
            if key.split("_", 1)[0] not in only:
                return
            bench.h.profiling = key if args.profile else None
            samples = []
            for i in range(runs):
                say(f"{name}: run {i + 1}/{runs}")
                samples.append(await make())
            keys = [k for k, v in samples[0].items() if isinstance(v, int | float)]
            out[key] = {"runs": samples, **{k: median_range([s[k] for s in samples]) for k in keys}}

        def capacity(workers: int) -> Run:
            return lambda: bench.capacity(args.waiters, workers)

        def storm(workers: int) -> Run:
            return lambda: bench.storm(args.storm, workers)

        for workers in range(1, args.max_workers + 1):
            await repeat(
                f"capacity_w{workers}",
                f"capacity: {args.waiters} waiters per worker, {workers} worker(s)",
                capacity(workers),
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
                f"storm of {args.storm} beside plain aiohttp, {workers} worker(s)",
                storm(workers),
                args.runs,
            )
        await repeat(
            "lone",
            f"lone connects: {args.lone} at {args.lone_rate:g}/s beside plain aiohttp",
            lambda: bench.lone(args.lone, args.lone_rate),
            args.runs,
        )
        await repeat(
            "forged",
            f"forged-NOTIFY flood at {args.latency_waiters} waiters",
            lambda: bench.forged(args.latency_waiters, 10.0, 20.0),
            args.runs,
        )
        await repeat(
            "flood",
            f"idle-socket flood of 2 x {args.flood} connections",
            lambda: bench.flood(args.flood_streams, args.flood),
            1,
        )
        await repeat(
            "compound",
            f"stalled database ({args.compound_stall:g} s) under a flood of {args.compound_flood}",
            lambda: bench.compound(args.compound_flood, args.compound_stall),
            1,
        )
        await repeat("naive", "naive baseline", lambda: bench.naive(args.naive_limit), 1)
        await repeat("recovery", "recovery", bench.recovery, 1)
        await repeat(
            "presence_storm",
            f"storm of {args.storm}, presence off and on, beside plain aiohttp",
            lambda: bench.presence_storm(args.storm),
            args.runs,
        )
        await repeat(
            "presence_held",
            f"presence at {args.presence_streams} streams, receipts of {args.claims} claims",
            lambda: bench.presence_held(args.presence_streams, args.claims, args.rate),
            args.runs,
        )
        await repeat(
            "scale",
            f"scale: {args.scale} streams over {args.scale_workers} workers",
            lambda: bench.scale(
                args.scale,
                args.scale_workers,
                args.scale_claims,
                args.scale_rate,
                args.scale_log_level,
            ),
            args.scale_runs,
        )
        return out
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="make bench",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--runs", type=int, default=3, help="runs of each scenario (some always run once)")
    add("--waiters", type=int, default=19_000, help="capacity: streams per worker")
    add("--max-workers", type=int, default=2, help="capacity and storm with 1..N workers")
    add(
        "--latency-waiters",
        type=int,
        default=10_000,
        help="streams open during latency, burst and the forged-NOTIFY flood",
    )
    add("--claims", type=int, default=1000, help="latency: claims made")
    add("--rate", type=float, default=200.0, help="latency: claims per second")
    add("--storm", type=int, default=10_000, help="storm: agents connecting at once")
    add("--lone", type=int, default=300, help="lone: agents connecting one at a time")
    add("--lone-rate", type=float, default=50.0, help="lone: connects per second")
    add("--flood", type=int, default=10_000, help="idle connections per flooding process (2)")
    add("--flood-streams", type=int, default=1000, help="streams open during the idle flood")
    add("--compound-flood", type=int, default=10_000, help="compound: heads sent at once")
    add("--compound-stall", type=float, default=10.0, help="compound: seconds PostgreSQL stops")
    add("--presence-streams", type=int, default=19_000, help="presence: streams held")
    add("--scale", type=int, default=152_000, help="scale: streams held")
    add("--scale-workers", type=int, default=8, help="scale: serve --workers")
    add("--scale-claims", type=int, default=1000, help="scale: claims made while all are held")
    add("--scale-rate", type=float, default=100.0, help="scale: claims per second")
    add(
        "--scale-log-level",
        default="warning",
        choices=("info", "warning"),
        help="scale: the servers' --log-level (warning as capacity; info as deployed: lines "
        "per connect and per stream ended)",
    )
    add("--scale-runs", type=int, default=1, help="scale: runs (each takes minutes)")
    add("--naive-limit", type=int, default=1100, help="naive: stop after this many waiters")
    add("--max-connections", type=int, default=1000, help="PostgreSQL's max_connections")
    add(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (also: {', '.join(EXTRA_SECTIONS)})",
    )
    add(
        "--event-loop",
        default="auto",
        choices=("auto", "uvloop", "asyncio"),
        help="the reinitd servers' event loop (serve --event-loop)",
    )
    add(
        "--baseline-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the baseline servers' event loop (asyncio: aiohttp's own)",
    )
    add(
        "--profile",
        action="store_true",
        help="record each reinitd server with py-spy into bench-results/",
    )
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(SECTIONS) - set(EXTRA_SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    RESULTS.mkdir(exist_ok=True)
    out = asyncio.run(run(args))
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=2))
    print(report(out))
    print(f"\n(full figures: {RESULTS / 'latest.json'})")


if __name__ == "__main__":
    main()
