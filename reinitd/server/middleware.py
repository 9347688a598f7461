"""Request middleware: a request id on every log line, and every error as JSON."""

from __future__ import annotations

import os
import re

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Counter

from reinitd.errors import ApiError
from reinitd.server import database, metrics
from reinitd.server.keys import REFUSALS, REQUEST_ID, SETTINGS, UNLOGGED

log = structlog.get_logger("reinitd.http")

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Refusals that still get an access line: answers to an agent whose token is known (so no
# stranger can flood them), which an operator looks for when an agent says it was refused.
# Every other refusal is counted in full and logged once per interval per reason.
LOGGED_REFUSALS = frozenset({409, 429})


def _json_error(status: int, message: str, detail: str) -> web.Response:
    return web.json_response({"message": message, "detail": detail}, status=status)


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id and turn every failure into JSON. A client's sane X-Request-ID is the
    request id only behind a trusted proxy (--trust-request-id); otherwise the id is our own
    and the client's is logged beside it as `client_request_id`, so that no client can pass
    its requests off as another stream's in the log."""
    given = request.headers.get("X-Request-ID", "")
    sane = _SAFE_REQUEST_ID.fullmatch(given) is not None
    trusted = sane and request.app[SETTINGS].trust_request_id
    request_id = given if trusted else os.urandom(8).hex()
    # bind (not the context-manager form): the access log line after the handler keeps it.
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    if sane and not trusted:
        structlog.contextvars.bind_contextvars(client_request_id=given)
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except ApiError as exc:
        response = _json_error(exc.status, exc.message, exc.detail)
        response.headers.update(exc.headers)
        request.app[REFUSALS].refuse(exc.reason, exc.status, exc.detail)
        request[UNLOGGED] = exc.status not in LOGGED_REFUSALS
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json_error(exc.status, exc.reason, exc.text or "")
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
        request.app[REFUSALS].refuse(f"http_{exc.status}", exc.status, request.path[:200])
        request[UNLOGGED] = True
    except Exception as exc:
        response = _failure(request, exc, request_id)
    return response


def _failure(request: web.Request, exc: Exception, request_id: str) -> web.Response:
    """What an unexpected exception means: the client left (499, nothing to send), the
    database is away or turned us away, whichever way (503, retry; see database.classify),
    or a bug (500, logged with its traceback)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        # The agent hung up before its answer: not a server error, and nothing to answer.
        metrics.CLIENT_GONE.inc()
        log.debug("client_gone", error=type(exc).__name__)
        return web.Response(status=499)
    outage = database.classify(exc)
    if outage is not None:
        error = database.describe(exc, timeout=request.app[SETTINGS].query_timeout)
        request.app[REFUSALS].outage(outage, error)
        request[UNLOGGED] = True
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
    count_response(request, response.status)


_RESPONSES: dict[int, Counter] = {}


def count_response(request: web.Request, status: int) -> None:
    """Count an answer of the reinit endpoint (`reinitd_responses_total`)."""
    if request.match_info.route.name == "reinit":
        if (counter := _RESPONSES.get(status)) is None:
            counter = _RESPONSES[status] = metrics.RESPONSES.labels(str(status))
        counter.inc()
