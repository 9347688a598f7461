"""`reinitd serve` and `reinitd migrate`: from parsed settings to a running server, and back.

Order of a start: bind the port (a port in use fails at once), start the embedded cluster
when there is no database URL, apply missing migrations as the owner, then serve under the
server's role. SIGINT, SIGTERM and SIGHUP ask for a clean stop; a second SIGINT cuts the
wait short. Whatever happens, an embedded PostgreSQL started here is stopped on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from errno import EADDRINUSE
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from reinitd import log as logsetup
from reinitd.errors import ReinitdError
from reinitd.server import database, embedded
from reinitd.server.access import AccessLogger
from reinitd.server.app import create_app, make_runner
from reinitd.server.collector import GcPacer
from reinitd.server.connection import ACCEPT_BATCH, AcceptErrors, budgeted
from reinitd.server.migration import migrate
from reinitd.server.stopping import STOP_SIGNALS, Stop
from reinitd.server.tasks import running
from reinitd.server.workers import run_workers
from reinitd.settings import SERVE, Settings, serve_settings

log = structlog.get_logger("reinitd.server.serve")

EMBEDDED_DIR = Path(".reinitd")


def bind(settings: Settings, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """The listening socket, before any other work: a port in use is the first error. It
    carries SO_KEEPALIVE, which every accepted connection inherits (Linux): aiohttp need not
    set it per connection, a system call and a socket object each (`run_server`).

    With `listen` false the port is only held: bound, taking no connections. The supervisor
    of `--workers` holds it so, from its start to its end, and each worker binds its own
    listening socket beside it (SO_REUSEPORT): while the database starts or a worker
    restarts, no free-port pick (the embedded PostgreSQL's, a bind to port 0) lands on it,
    nor a bind without SO_REUSEADDR. (A program that sets SO_REUSEADDR and asks for this very
    port still can, until a worker listens: docs/protocol.md §5.7.)"""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As socket.create_server does, listen apart.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((settings.host, settings.port))
        if listen:
            sock.listen(settings.backlog)
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = (
            " (another server is there: pick another port with --port or REINITD_PORT, "
            "e.g. make run REINITD_PORT=8081)"
            if exc.errno == EADDRINUSE
            else ""
        )
        raise ReinitdError(
            f"cannot listen on {settings.host}:{settings.port}: {reason}{hint}"
        ) from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


async def run_server(settings: Settings, sock: socket.socket, stop: Stop) -> None:
    """Serve on `sock` until asked to stop, then stop accepting, end open streams and exit."""
    loop = asyncio.get_running_loop()
    accept_errors = AcceptErrors()
    loop.set_exception_handler(accept_errors)
    app = create_app(settings)
    runner = make_runner(app, access_log_class=AccessLogger, tcp_keepalive=False)  # see bind
    await runner.setup()
    collector = GcPacer(lambda: runner.streams_taken)
    collector.install()
    try:
        # asyncio accepts up to `backlog` connections per loop iteration: a short burst keeps
        # the connection budget exact; the kernel's queue stays deep.
        await web.SockSite(runner, sock, backlog=ACCEPT_BATCH).start()
        sock.listen(settings.backlog)
        collector.freeze_survivors()  # start-up objects live for the whole run
        url = f"http://{settings.host}:{settings.port}"
        log.info("server_started", url=url, event_loop=type(loop).__module__.split(".")[0])
        print(f"reinitd: serving on {url}", file=sys.stderr, flush=True)
        tasks = {"collector": collector.run}
        if not AcceptErrors.reported_by(loop):  # uvloop: failed accepts are found by probing
            tasks["accept-watch"] = functools.partial(accept_errors.watch, sock)
        async with running(tasks):
            await stop.wait()
        log.info("server_stopping", signal=signal.Signals(stop.signal or signal.SIGTERM).name)
    finally:
        started = time.monotonic()
        await runner.cleanup()
        collector.uninstall(exiting=True)  # the process ends next
        log.info("server_stopped", duration_s=round(time.monotonic() - started, 3))


@contextlib.contextmanager
def embedded_database(settings: Settings) -> Iterator[Settings]:
    """With a database URL: the settings as they are. Without: an embedded cluster under
    ./.reinitd/, stopped when the block ends, however it ends; the settings then migrate as
    its owner and serve as its server role."""
    if settings.database_url:
        yield settings
        return
    root = EMBEDDED_DIR.resolve()
    with embedded.exclusive(root):
        print(f"reinitd: starting embedded PostgreSQL under ./{EMBEDDED_DIR}/ ...", file=sys.stderr)
        cluster = embedded.ensure_cluster(root)
        try:
            owner = asyncio.run(cluster.ensure_database())
            asyncio.run(migrate(owner))
            server = asyncio.run(cluster.ensure_server_role())
            (root / embedded.OWNER_URL_FILE).write_text(owner + "\n")
            (root / embedded.SERVER_URL_FILE).write_text(server + "\n")
            print(f"reinitd: embedded PostgreSQL is ready:  psql '{owner}'", file=sys.stderr)
            log.info("embedded_postgres_ready", dsn=owner, server_role=embedded.SERVER_ROLE)
            yield replace(settings, database_url=server, migrate_database_url=owner)
        finally:
            cluster.stop()


def _serve(settings: Settings, stop: Stop) -> int:
    settings = budgeted(settings)
    single = settings.workers == 1
    # One process: its listening socket. Workers: the port held (bound, not listening) until
    # the last worker is gone; each worker listens on a socket of its own beside it.
    sock = bind(settings, reuse_port=not single, listen=single)
    with sock, embedded_database(settings) as ready:
        if ready.migrate_database_url is None and stop.signal is None:
            # the embedded cluster's is done
            asyncio.run(migrate(ready.dsn, connect_timeout=ready.connect_timeout))
        if stop.signal is not None:
            return 0
        if single:
            asyncio.run(run_server(ready, sock, stop))
            return 0
        return run_workers(ready, lambda: _worker(ready, sock), stop)


def _worker(settings: Settings, held: socket.socket) -> None:
    """A worker's life, in its own process: a fresh signal policy, its own socket (the
    supervisor's `held` one, inherited, is the supervisor's to keep). A second Ctrl-C (the
    terminal sends it to every process of the group) ends it quietly."""
    held.close()
    # Outermost: a second Ctrl-C may land anywhere, the restoring of the handlers included.
    with contextlib.suppress(KeyboardInterrupt), Stop().installed() as stop:
        # The supervisor's wake-up file is not this process's to write.
        signal.set_wakeup_fd(-1)
        # Born with them blocked (run_workers): what came meanwhile is handled now, by `stop`.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        sock = bind(settings, reuse_port=True)
        asyncio.run(run_server(settings, sock, stop))


def use_event_loop(choice: str) -> None:
    """uvloop when asked, or when `auto` finds it installed; asyncio's own loop otherwise.
    (`make bench` measures both: uvloop halves the objects a stream keeps, so the collector's
    pauses, and is faster on every figure.)"""
    if choice == "asyncio":
        return
    try:
        import uvloop  # noqa: PLC0415 -- optional: only when the loop is chosen
    except ImportError:
        if choice == "uvloop":
            raise ReinitdError(
                "--event-loop uvloop: uvloop is not installed (pip install 'reinitd[server]')"
            ) from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(command: str, values: dict[str, Any]) -> int:
    logsetup.configure(values["log_level"], values["log_format"], sys.stdout)
    database.quiet_asyncpg_noise()
    with Stop().installed() as stop:
        try:
            if command == "migrate":
                return _migrate(values)
            settings = serve_settings(**{option.name: values[option.name] for option in SERVE})
            if settings.database_url is None and settings.embedded == "never":
                print(
                    "reinitd serve: --database-url (or DATABASE_URL) is required: the embedded "
                    "PostgreSQL is off (--embedded never, or REINITD_EMBEDDED=never)",
                    file=sys.stderr,
                )
                return 2
            use_event_loop(settings.event_loop)
            code = _serve(settings, stop)
        except KeyboardInterrupt:
            print("reinitd: interrupted", file=sys.stderr)
            return 130
        except (ReinitdError, *database.CONNECT_ERRORS) as exc:
            if stop.signal is not None:
                print("reinitd: interrupted", file=sys.stderr)
                return 0
            print(f"reinitd {command}: {database.describe(exc)}", file=sys.stderr)
            return 1
    print("reinitd: stopped", file=sys.stderr)
    return code


def _migrate(values: dict[str, Any]) -> int:
    if not values["database_url"]:
        print("reinitd migrate: --database-url (or DATABASE_URL) is required", file=sys.stderr)
        return 2
    applied = asyncio.run(migrate(values["database_url"]))
    print(
        f"reinitd: {len(applied)} migration(s) applied: {', '.join(applied) or 'none'}",
        file=sys.stderr,
    )
    return 0
