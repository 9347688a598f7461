"""The naive baseline: one PostgreSQL connection with its own LISTEN per waiting request.

Same endpoint and frames as reinitd (auth, durable read, SSE), none of its design: every
request opens a connection, LISTENs, reads, and waits on it. Run: python -m
bench.baseline --port P --database-url DSN.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json

import asyncpg
from aiohttp import web

from reinitd.server.claim import Deliver, Refuse, read_verdicts
from reinitd.server.doorbell import CHANNEL
from reinitd.server.query import QUERIES

DSN = web.AppKey("dsn", str)


async def reinit(request: web.Request) -> web.StreamResponse:
    token = request.headers.get("Coder-Session-Token", "")
    digest = hashlib.sha256(token.lower().encode()).digest()
    try:
        conn: asyncpg.Connection = await asyncpg.connect(request.app[DSN])
    except (OSError, asyncpg.PostgresError) as exc:
        return web.json_response({"message": "database", "detail": str(exc)}, status=503)
    try:
        agent = await conn.fetchrow(QUERIES["agent_by_token_hash"], digest)
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
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if isinstance(verdict, Deliver):
            await response.write(verdict.event.frame())
        while True:
            try:
                payload = await asyncio.wait_for(queue.get(), 15)
            except TimeoutError:
                await response.write(b"event: ping\n\n")
                continue
            await response.write(f"event: data\ndata: {payload}\n\n".encode())
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args()
    app = web.Application()
    app[DSN] = args.database_url
    app.router.add_get("/api/v2/workspaceagents/me/reinit", reinit)
    app.router.add_get("/healthz", lambda _r: asyncio.sleep(0, web.Response(text="ok")))
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        backlog=4096,
        shutdown_timeout=1,
    )


if __name__ == "__main__":
    main()
