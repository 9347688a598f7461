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
# How long a stop waits for cancelled tasks before it goes on without them.
STOP_WITHIN = 3.0


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


async def stop(tasks: dict[str, asyncio.Task[None]], within: float = STOP_WITHIN) -> None:
    """Cancel the tasks and wait at most `within` seconds for them to end. A task still running
    then (a cancellation it lost or swallowed) is logged as `task_stuck` and left behind: no
    task may hold a process's exit. Cancelled meanwhile, this still cancels every task."""
    for task in tasks.values():
        task.cancel()
    pending = {task for task in tasks.values() if not task.done()}
    if pending:
        # asyncio.wait never raises a task's exception, and gives up at its timeout
        _done, pending = await asyncio.wait(pending, timeout=within)
    for name, task in tasks.items():
        if task in pending:
            log.error("task_stuck", task=name, waited_s=within)
        elif not task.cancelled() and task.exception() is not None:
            log.error("task_failed_on_stop", task=name, error=repr(task.exception()))


@contextlib.asynccontextmanager
async def running(
    tasks: dict[str, TaskFactory], *, stop_within: float = STOP_WITHIN
) -> AsyncIterator[dict[str, asyncio.Task[None]]]:
    """Supervise the named tasks for the duration of the block; then cancel them and wait for
    them, `stop_within` seconds at most (see `stop`)."""
    started = {
        name: asyncio.create_task(supervise(name, factory), name=f"reinitd-{name}")
        for name, factory in tasks.items()
    }
    try:
        yield started
    finally:
        await stop(started, stop_within)
