"""The `reinitd` command line: serve, migrate, agent."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import gc
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, Any

import asyncpg
import structlog
from aiohttp import web

from reinitd import __version__
from reinitd import log as logsetup
from reinitd.agent import (
    EXIT_COMMAND_FAILED,
    EXIT_NOT_WAITING,
    EXIT_OK,
    EXIT_USAGE,
    Agent,
    AgentConfig,
    default_state_file,
)
from reinitd.app import create_app, server_options
from reinitd.client import ReinitError, reinit_events
from reinitd.event import is_token
from reinitd.keys import LIFECYCLE
from reinitd.migration import migrate
from reinitd.postgres import Cluster, PostgresError, ensure_cluster
from reinitd.settings import Settings

log = structlog.get_logger("reinitd.cli")

EMBEDDED_DIR = Path(".reinitd")


def _env_default(var: str, default: Any, kind: Callable[[str], Any] = str) -> Any:
    raw = os.environ.get(var)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        sys.exit(f"reinitd: invalid value for {var}: {raw!r}")


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    var: str,
    default: Any,
    help_text: str,
    *,
    kind: Callable[[str], Any] = str,
    **extra: Any,
) -> None:
    shown = "unset" if default is None else default
    parser.add_argument(
        flag,
        default=_env_default(var, default, kind),
        type=kind,
        help=f"{help_text} [env {var}; default: {shown}]",
        **extra,
    )


def positive_number(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def positive_integer(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    _option(
        parser,
        "--log-level",
        "REINITD_LOG_LEVEL",
        "info",
        "log level",
        choices=["debug", "info", "warning", "error"],
    )
    _option(
        parser,
        "--log-format",
        "REINITD_LOG_FORMAT",
        "auto",
        "log format; auto is console on a terminal, JSON lines otherwise",
        choices=["auto", "json", "console"],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reinitd",
        description="Tells the agent of a prebuilt workspace the moment a user claims it.",
        epilog="Every option can also be set from the environment variable named in brackets.",
    )
    parser.add_argument("--version", action="version", version=f"reinitd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the reinit endpoint",
        description="Serve GET /api/v2/workspaceagents/me/reinit, /healthz, /readyz and "
        "/metrics. Applies missing migrations first. Without a database URL, starts an "
        f"embedded PostgreSQL under ./{EMBEDDED_DIR}/ and prints its DSN for psql. "
        "Stops cleanly on SIGINT/SIGTERM, closing open streams.",
    )
    _option(serve, "--host", "REINITD_HOST", "127.0.0.1", "address to listen on")
    _option(serve, "--port", "REINITD_PORT", 8080, "TCP port to listen on", kind=int)
    _option(
        serve,
        "--database-url",
        "DATABASE_URL",
        None,
        "libpq URL of PostgreSQL; unset: an embedded one under ./.reinitd/",
    )
    _option(
        serve,
        "--listen-database-url",
        "REINITD_LISTEN_DATABASE_URL",
        None,
        "separate URL for the LISTEN connection (straight to PostgreSQL when queries go "
        "through a transaction-pooling PgBouncer); unset: the database URL",
    )
    _option(
        serve,
        "--ping-interval",
        "REINITD_PING_INTERVAL",
        15.0,
        "seconds between keep-alive frames on open streams",
        kind=positive_number,
    )
    _option(
        serve,
        "--write-timeout",
        "REINITD_WRITE_TIMEOUT",
        10.0,
        "seconds a client may stall a write before it is disconnected",
        kind=positive_number,
    )
    _option(
        serve,
        "--resync-interval",
        "REINITD_RESYNC_INTERVAL",
        30.0,
        "seconds between safety-net re-reads of the builds waited on",
        kind=positive_number,
    )
    _option(
        serve,
        "--probe-interval",
        "REINITD_PROBE_INTERVAL",
        2.0,
        "seconds between probes of an idle LISTEN connection",
        kind=positive_number,
    )
    _option(
        serve,
        "--max-streams",
        "REINITD_MAX_STREAMS",
        18_000,
        "open streams per process before new requests get 503 with Retry-After",
        kind=positive_integer,
    )
    _option(
        serve,
        "--max-streams-per-agent",
        "REINITD_MAX_STREAMS_PER_AGENT",
        8,
        "open streams per agent token before new requests get 429",
        kind=positive_integer,
    )
    _option(
        serve,
        "--header-timeout",
        "REINITD_HEADER_TIMEOUT",
        30.0,
        "seconds a client has to finish its request headers (slowloris), and the idle "
        "keep-alive limit",
        kind=positive_number,
    )
    _option(
        serve,
        "--workers",
        "REINITD_WORKERS",
        1,
        "server processes sharing the port (SO_REUSEPORT), each with its own listener; "
        "up to the number of cores",
        kind=positive_integer,
    )
    _option(
        serve,
        "--shutdown-timeout",
        "REINITD_SHUTDOWN_TIMEOUT",
        5.0,
        "seconds to wait for requests to finish on shutdown",
        kind=positive_number,
    )
    _common(serve)

    mig = commands.add_parser(
        "migrate",
        help="apply missing schema migrations",
        description="Apply the migrations under sql/migrations that the database is missing. "
        "Idempotent; safe when several replicas run it at once.",
    )
    _option(mig, "--database-url", "DATABASE_URL", None, "libpq URL of PostgreSQL (required)")
    _common(mig)

    agent = commands.add_parser(
        "agent",
        help="the agent side: wait for the claim and run a command",
        description="Wait on the reinit endpoint with wait=true and run CMD once per claim, "
        "with REINITD_WORKSPACE_ID, REINITD_OWNER_ID and REINITD_REASON in its environment. "
        "Reconnects with capped exponential backoff on any error; a claim counts as handled once "
        "CMD exits 0, and handled claims are recorded in a state file so that a restarted "
        "agent never runs CMD twice for the same claim.",
        epilog=f"Exit codes: {EXIT_OK} --once printed an event; {EXIT_USAGE} bad usage; "
        f"{EXIT_NOT_WAITING} the server answered 409 (the workspace is not, or no longer, a "
        f"prebuild waiting to be claimed); {EXIT_COMMAND_FAILED} CMD failed on every attempt. "
        "SIGINT/SIGTERM stop the agent with exit code 0.",
    )
    _option(agent, "--url", "REINITD_URL", None, "base URL of reinitd, e.g. http://127.0.0.1:8080")
    _option(agent, "--token", "REINITD_AGENT_TOKEN", None, "the agent token (a UUID)")
    _option(agent, "--exec", "REINITD_EXEC", None, "shell command to run on each claim")
    agent.add_argument(
        "--once", action="store_true", help="print the first event as JSON on stdout and exit 0"
    )
    _option(
        agent,
        "--state-file",
        "REINITD_AGENT_STATE_FILE",
        None,
        "where handled claims are recorded; unset: "
        "$XDG_STATE_HOME/reinitd/agent-<token digest>.json",
        kind=Path,
    )
    _option(
        agent,
        "--max-attempts",
        "REINITD_AGENT_MAX_ATTEMPTS",
        5,
        "runs of a failing CMD before giving up",
        kind=positive_integer,
    )
    _option(
        agent,
        "--ping-interval",
        "REINITD_PING_INTERVAL",
        15.0,
        "the server's ping interval; three silent intervals mean a dead stream",
        kind=positive_number,
    )
    _common(agent)
    return parser


def _lock_embedded() -> None:
    """One `reinitd serve` per embedded cluster: a second one would restart it under the
    first. The lock lives as long as this process (and its forked workers)."""
    EMBEDDED_DIR.mkdir(exist_ok=True)
    lock = (EMBEDDED_DIR / "serve.lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        url_file = EMBEDDED_DIR / "database_url"
        url = url_file.read_text().strip() if url_file.exists() else "its database"
        raise PostgresError(
            f"another `reinitd serve` is using the embedded PostgreSQL under ./{EMBEDDED_DIR}/; "
            f"stop it first, or share it: DATABASE_URL='{url}' reinitd serve --port …"
        ) from None
    _HELD.append(lock)


_HELD: list[IO[str]] = []


def _start_embedded() -> tuple[Cluster, str]:
    _lock_embedded()
    print(f"reinitd: starting embedded PostgreSQL under ./{EMBEDDED_DIR}/ ...", file=sys.stderr)
    cluster = ensure_cluster(EMBEDDED_DIR.resolve() / "data")
    dsn = asyncio.run(cluster.ensure_database())
    (EMBEDDED_DIR / "database_url").write_text(dsn + "\n")
    print(f"reinitd: embedded PostgreSQL is ready:  psql '{dsn}'", file=sys.stderr)
    log.info("embedded_postgres_ready", dsn=dsn)
    return cluster, dsn


async def run_server(
    settings: Settings, *, reuse_port: bool = False, migrate_first: bool = True
) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting, end open streams and exit."""
    if migrate_first:
        await migrate(settings.database_url)
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log_class=logsetup.AccessLogger,
        shutdown_timeout=settings.shutdown_timeout,
        **server_options(settings),
    )
    await runner.setup()
    site = web.TCPSite(
        runner, settings.host, settings.port, backlog=settings.backlog, reuse_port=reuse_port
    )
    await site.start()
    # Start-up objects live for the whole run: keep the collector from rescanning them.
    gc.collect()
    gc.freeze()
    log.info("server_started", url=f"http://{settings.host}:{settings.port}")
    print(f"reinitd: serving on http://{settings.host}:{settings.port}", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    started = time.monotonic()
    app[LIFECYCLE].stopping = True
    log.info("server_stopping")
    await runner.cleanup()
    log.info("server_stopped", duration_s=round(time.monotonic() - started, 3))
    print("reinitd: stopped", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    cluster = None
    dsn = args.database_url
    if not dsn:
        cluster, dsn = _start_embedded()
    try:
        settings = Settings(
            database_url=dsn,
            listen_database_url=args.listen_database_url,
            host=args.host,
            port=args.port,
            ping_interval=args.ping_interval,
            write_timeout=args.write_timeout,
            resync_interval=args.resync_interval,
            probe_interval=args.probe_interval,
            shutdown_timeout=args.shutdown_timeout,
            max_streams=args.max_streams,
            max_streams_per_agent=args.max_streams_per_agent,
            header_timeout=args.header_timeout,
        )
        if args.workers == 1:
            asyncio.run(run_server(settings))
        else:
            asyncio.run(migrate(settings.database_url))
            return _run_workers(settings, args.workers)
    finally:
        if cluster is not None:
            cluster.stop()
    return 0


def _worker(settings: Settings) -> None:
    asyncio.run(run_server(settings, reuse_port=True, migrate_first=False))


def _run_workers(settings: Settings, workers: int) -> int:
    """N forked processes share the port (SO_REUSEPORT), each with its own listener."""
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_worker, args=(settings,), name=f"reinitd-worker-{i}")
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    log.info("workers_started", workers=workers, pids=[p.pid for p in processes])

    def forward(_signum: int, _frame: object) -> None:
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in processes:
        process.join()
    failed = [p.name for p in processes if p.exitcode]
    if failed:
        log.error("workers_failed", workers=failed)
    return 1 if failed else 0


def _migrate(args: argparse.Namespace) -> int:
    if not args.database_url:
        print("reinitd migrate: --database-url (or DATABASE_URL) is required", file=sys.stderr)
        return 2
    applied = asyncio.run(migrate(args.database_url))
    print(
        f"reinitd: {len(applied)} migration(s) applied: {', '.join(applied) or 'none'}",
        file=sys.stderr,
    )
    return 0


async def _until_signal(work: Coroutine[Any, Any, int]) -> int:
    """Run `work`; SIGINT/SIGTERM cancel it and the result is exit code 0."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        log.info("agent_stopping")
        return EXIT_OK


async def _print_first_event(url: str, token: str, ping_interval: float) -> int:
    try:
        async for event in reinit_events(url, token, ping_interval=ping_interval):
            print(event.to_json(), flush=True)
            return EXIT_OK
    except ReinitError as exc:
        log.error("agent_stopped", status=exc.status, message=exc.message, detail=exc.detail)
        return EXIT_NOT_WAITING
    return EXIT_OK


def _agent(args: argparse.Namespace) -> int:
    problems = []
    if not args.url:
        problems.append("--url (or REINITD_URL) is required")
    if not args.token or not is_token(args.token):
        problems.append("--token (or REINITD_AGENT_TOKEN) must be the agent token, a UUID")
    if not args.exec and not args.once:
        problems.append("give --exec CMD, or --once")
    if problems:
        print("reinitd agent: " + "; ".join(problems), file=sys.stderr)
        return EXIT_USAGE
    if args.once:
        return asyncio.run(
            _until_signal(_print_first_event(args.url, args.token, args.ping_interval))
        )
    config = AgentConfig(
        url=args.url,
        token=args.token,
        command=args.exec,
        state_file=args.state_file or default_state_file(args.token),
        max_attempts=args.max_attempts,
        ping_interval=args.ping_interval,
    )
    try:
        agent = Agent(config)
    except ValueError as exc:
        print(f"reinitd agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.info("agent_starting", url=args.url, state_file=str(config.state_file))
    return asyncio.run(_until_signal(agent.run()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logsetup.configure(
        args.log_level, args.log_format, sys.stderr if args.command == "agent" else sys.stdout
    )
    commands = {"serve": _serve, "migrate": _migrate, "agent": _agent}
    try:
        return commands[args.command](args)
    except PostgresError as exc:
        print(f"reinitd: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"reinitd: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
