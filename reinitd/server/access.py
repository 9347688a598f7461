"""The access log: one `http_request` line per request served, never the query string."""

from __future__ import annotations

import logging

import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from reinitd.server.keys import UNLOGGED

_access = structlog.get_logger("reinitd.access")


class AccessLogger(AbstractAccessLogger):
    """One `http_request` line per request served; never the query string (it may hold a
    token). A refused request marked UNLOGGED (a 401 among them: a token-guessing flood) gets
    none: it is counted in full and logged once per interval per reason (`request_refused`,
    `database_unavailable`), so no flood can fill a disk."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if request.get(UNLOGGED):
            return
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
        """Whether lines at info are logged at all (aiohttp asks once per connection): at
        `--log-level warning` a request does not even gather its access line's fields."""
        return logging.getLogger().isEnabledFor(logging.INFO)
