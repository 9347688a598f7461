"""Background tasks with names and a supervisor: a task that dies of a bug is logged and
started again (with backoff), never left dead without a word."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import structlog

from reinitd.backoff import backoff_delay

log = structlog.get_logger("reinitd.server.tasks")

TaskFactory = Callable[[], Coroutine[Any, Any, None]]
# A task that ran this long before failing restarts after a short delay again.
STABLE_AFTER = 60.0


async def supervise(name: str, factory: TaskFactory) -> None:
    """Run `factory()` forever: a return or a crash is logged and followed by a restart."""
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await factory()
            log.error("task_ended", task=name)  # every supervised task is meant to run forever
        except Exception:
            log.exception("task_crashed", task=name)
        failures = 1 if time.monotonic() - started > STABLE_AFTER else failures + 1
        delay = backoff_delay(failures, 0.1, 10.0)
        log.warning("task_restarting", task=name, attempt=failures, retry_in_s=round(delay, 3))
        await asyncio.sleep(delay)


@contextlib.asynccontextmanager
async def running(tasks: dict[str, TaskFactory]) -> AsyncIterator[dict[str, asyncio.Task[None]]]:
    """Supervise the named tasks for the duration of the block; cancel and await them after."""
    started = {
        name: asyncio.create_task(supervise(name, factory), name=f"reinitd-{name}")
        for name, factory in tasks.items()
    }
    try:
        yield started
    finally:
        for task in started.values():
            task.cancel()
        for task in started.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
