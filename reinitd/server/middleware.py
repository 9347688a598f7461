"""Request middleware: a request id on every log line, and every error as JSON."""

from __future__ import annotations

import os
import re

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from reinitd.errors import ApiError
from reinitd.server import metrics
from reinitd.server.keys import REFUSALS

log = structlog.get_logger("reinitd.http")

REQUEST_ID = web.RequestKey("request_id", str)
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
    except Exception:
        log.exception("request_failed")
        response = _json_error(500, "Internal server error.", f"Request id {request_id}.")
    return response


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """As headers go out (streams included): echo the request id, count reinit answers."""
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]
    if request.match_info.route.name == "reinit":
        metrics.RESPONSES.labels(str(response.status)).inc()
