"""The baselines reinitd is measured against, each a server process of its own.

`naive`: reinitd's endpoint and frames (auth, durable read, SSE) with none of its design:
every request opens a PostgreSQL connection, LISTENs, reads, and waits on it.
`plain`: aiohttp alone, no database: reinitd's SSE headers, each stream held on an asyncio
queue, the same server options and backlog. What the framework costs per connect and per
idle stream, the floor reinitd's own figures are divided by.
`fanout`: `plain`, plus one asyncpg LISTEN whose every NOTIFY is written, as it says, to the
streams of the workspace it names (a map of token hashes read once at start, never per
connect): the floor of a burst of claims, fan-out without the doorbell's read.

Run: python -m bench.baseline {naive,plain,fanout} --port P [--database-url DSN]
[--event-loop asyncio|uvloop] (asyncio, aiohttp's own, unless asked).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from reinitd.server.app import server_options
from reinitd.server.claim import Deliver, Refuse, read_verdicts
from reinitd.server.doorbell import CHANNEL
from reinitd.server.handler import SSE_HEADERS
from reinitd.server.query import QUERIES
from reinitd.settings import serve_settings
from reinitd.wire import PING_FRAME, REINIT_PATH

DSN = web.AppKey("dsn", str)
STREAMS = web.AppKey("streams", set[asyncio.Queue[bytes]])
# fanout: workspace of each token hash, and the queues of the streams waiting on each workspace
WORKSPACES = web.AppKey("workspaces", dict[bytes, str])
WAITING = web.AppKey("waiting", dict[str, set[asyncio.Queue[bytes]]])


def digest(request: web.Request) -> bytes:
    token = request.headers.get("Coder-Session-Token", "")
    return hashlib.sha256(token.lower().encode()).digest()


async def naive_reinit(request: web.Request) -> web.StreamResponse:
    try:
        conn: asyncpg.Connection = await asyncpg.connect(request.app[DSN])
    except (OSError, asyncpg.PostgresError) as exc:
        return web.json_response({"message": "database", "detail": str(exc)}, status=503)
    try:
        agent = await conn.fetchrow(QUERIES["agent_by_token_hash"], digest(request))
        if agent is None:
            return web.json_response({"message": "Unauthorized.", "detail": ""}, status=401)
        workspace_id = agent["workspace_id"]
        queue: asyncio.Queue[str] = asyncio.Queue()

        def on_notify(_c: object, _p: int, _ch: str, payload: object) -> None:
            if json.loads(str(payload))["workspace_id"] == str(workspace_id):
                queue.put_nowait(str(payload))

        await conn.add_listener(CHANNEL, on_notify)
        verdict = (await read_verdicts(conn, [workspace_id]))[workspace_id]
        if isinstance(verdict, Refuse):
            return web.json_response({"message": verdict.message, "detail": ""}, status=409)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        if isinstance(verdict, Deliver):
            await response.write(verdict.event.frame())
        while True:
            try:
                payload = await asyncio.wait_for(queue.get(), 15)
            except TimeoutError:
                await response.write(PING_FRAME)
                continue
            await response.write(f"event: data\ndata: {payload}\n\n".encode())
    finally:
        await conn.close()


async def plain_reinit(request: web.Request) -> web.StreamResponse:
    """The headers, then the stream waits on its own queue (nobody writes to it here)."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
    streams = request.app[STREAMS]
    streams.add(queue)
    try:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        while True:
            await response.write(await queue.get())
    finally:
        streams.discard(queue)


async def fanout_reinit(request: web.Request) -> web.StreamResponse:
    """`plain`, with the stream's queue filed under its workspace for the LISTEN to write to."""
    workspace_id = request.app[WORKSPACES][digest(request)]
    queues = request.app[WAITING].setdefault(workspace_id, set())
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
    queues.add(queue)
    try:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        while True:
            await response.write(await queue.get())
    finally:
        queues.discard(queue)


async def listen(app: web.Application) -> AsyncIterator[None]:
    """fanout's start-up: the token map, then a LISTEN that writes each payload as a frame."""
    conn: asyncpg.Connection = await asyncpg.connect(app[DSN])
    rows = await conn.fetch("SELECT token_hash, workspace_id FROM reinitd.workspace_agents")
    app[WORKSPACES] = {bytes(r["token_hash"]): str(r["workspace_id"]) for r in rows}
    waiting = app[WAITING]

    def on_notify(_c: object, _p: int, _ch: str, payload: object) -> None:
        frame = f"event: data\ndata: {payload}\n\n".encode()
        for queue in waiting.get(json.loads(str(payload))["workspace_id"], ()):
            queue.put_nowait(frame)

    await conn.add_listener(CHANNEL, on_notify)
    try:
        yield
    finally:
        await conn.close()


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def serve(app: web.Application, port: int) -> None:
    """Serve with reinitd's aiohttp options and backlog until SIGTERM or SIGINT."""
    settings = serve_settings()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=1, **server_options(settings)
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=settings.backlog).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("kind", choices=("naive", "plain", "fanout"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    app = web.Application()
    app[DSN] = args.database_url
    app[STREAMS] = set()
    app[WAITING] = {}
    handlers = {"naive": naive_reinit, "plain": plain_reinit, "fanout": fanout_reinit}
    app.router.add_get(REINIT_PATH, handlers[args.kind])
    if args.kind == "fanout":
        app.cleanup_ctx.append(listen)
    app.router.add_get("/healthz", healthz)
    if args.event_loop == "uvloop":
        import uvloop  # noqa: PLC0415 -- only when asked: the baselines need no more than aiohttp

        uvloop.run(serve(app, args.port))
    else:
        asyncio.run(serve(app, args.port))


if __name__ == "__main__":
    main()
