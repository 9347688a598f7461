"""The access log: one `http_request` line per request, never the query string."""

from __future__ import annotations

import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

_access = structlog.get_logger("reinitd.access")


class AccessLogger(AbstractAccessLogger):
    """One `http_request` line per request; never the query string (it may hold a token)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        _access.info(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_s=round(time, 4),
            remote=request.remote,
        )

    @property
    def enabled(self) -> bool:
        return True
