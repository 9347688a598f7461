"""Request middleware: a request id on every log line, and every error as JSON."""

from __future__ import annotations

import os
import re

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from reinitd.errors import ApiError
from reinitd.server import database, metrics
from reinitd.server.database import CONNECTION_ERRORS
from reinitd.server.keys import REFUSALS, REQUEST_ID, SETTINGS
from reinitd.server.throttle import LogThrottle

log = structlog.get_logger("reinitd.http")

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _json_error(status: int, message: str, detail: str) -> web.Response:
    return web.json_response({"message": message, "detail": detail}, status=status)


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id (X-Request-ID when sane) and turn every failure into JSON."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if _SAFE_REQUEST_ID.fullmatch(given) else os.urandom(8).hex()
    # bind (not the context-manager form): the access log line after the handler keeps it.
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except ApiError as exc:
        response = _json_error(exc.status, exc.message, exc.detail)
        response.headers.update(exc.headers)
        request.app[REFUSALS].refuse(exc.reason, exc.status, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json_error(exc.status, exc.reason, exc.text or "")
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
        request.app[REFUSALS].refuse(f"http_{exc.status}", exc.status, request.path[:200])
    except Exception as exc:
        response = _failure(request, exc, request_id)
    return response


_database_down = LogThrottle()


def _failure(request: web.Request, exc: Exception, request_id: str) -> web.Response:
    """What an unexpected exception means: the client left (499, nothing to send), the
    database is away (503, retry), or a bug (500, logged with its traceback)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        # The agent hung up before its answer: not a server error, and nothing to answer.
        metrics.CLIENT_GONE.inc()
        log.debug("client_gone", error=type(exc).__name__)
        return web.Response(status=499)
    if isinstance(exc, CONNECTION_ERRORS):
        suppressed = _database_down.allow("database")
        if suppressed is not None:
            log.warning(
                "database_unavailable",
                error=database.describe(exc, timeout=request.app[SETTINGS].query_timeout),
                suppressed=suppressed,
            )
        request.app[REFUSALS].refuse("database_unavailable", 503, type(exc).__name__)
        response = _json_error(
            503,
            "Service unavailable.",
            "The database does not answer; retry shortly (open streams are kept).",
        )
        response.headers["Retry-After"] = "5"
        return response
    log.exception("request_failed")
    return _json_error(500, "Internal server error.", f"Request id {request_id}.")


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """As headers go out (streams included): echo the request id, count reinit answers."""
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]
    if request.match_info.route.name == "reinit":
        metrics.RESPONSES.labels(str(response.status)).inc()
