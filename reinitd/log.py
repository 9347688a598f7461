"""structlog set-up: JSON lines off a terminal, console on one; stdlib logs routed through it."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["json", "console", "auto"]


# Whether lines at info are written at all: set by `configure` (until then structlog's default
# writes every level).
_info = True


def info_enabled() -> bool:
    """Whether lines at info are written. On hot paths (a delivery, a stream's start and end) a
    line below the level still costs its call and its fields (a UUID's text is ~1.5 µs): ask
    first."""
    return _info


def configure(level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger: one event per line on `stream`
    (stdout by default; the agent logs to stderr so that its stdout stays the command's)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    global _info  # noqa: PLW0603 -- one process-wide setting, like structlog's own
    _info = logging.getLevelName(level.upper()) <= logging.INFO
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Drops events below the level before any processor runs: cheap on hot paths.
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncio and aiohttp are chatty at debug; their warnings still come through.
    for noisy in ("asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # While the database is down, asyncpg's pool logs a traceback every few seconds; the
    # outage is already reported by listener_connect_failed and read_failed.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
