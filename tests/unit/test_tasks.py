"""Supervised background tasks: a crash is logged, and the task starts again."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import structlog

from reinitd.server.tasks import running


async def test_a_crashed_task_is_logged_and_restarted() -> None:
    """A task that dies of a bug is logged with its name (task_crashed) and runs again."""
    runs: list[int] = []
    second_run = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("a bug in the pinger")
        second_run.set()
        await asyncio.Event().wait()

    with structlog.testing.capture_logs() as logs:
        async with running({"pinger": flaky}) as tasks:
            await asyncio.wait_for(second_run.wait(), 5)
            assert not tasks["pinger"].done()
    crashed = [entry for entry in logs if entry["event"] == "task_crashed"]
    assert [entry["task"] for entry in crashed] == ["pinger"]
    assert crashed[0]["log_level"] == "error"
    assert runs == [0, 1]
    assert tasks["pinger"].cancelled()


@pytest.mark.parametrize("refusals", [1, 1000])
async def test_a_task_that_ignores_its_cancellation_cannot_hold_the_stop(refusals: int) -> None:
    """A task that swallows its cancel (once, or every time) holds `running()`'s exit no longer
    than its bound, and is logged as task_stuck at ERROR with its name."""
    swallowed = asyncio.Event()
    release = asyncio.Event()

    async def stubborn() -> None:
        ignored = 0
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed.set()
                if release.is_set() or ignored == refusals:
                    raise
                ignored += 1

    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        async with running({"doorbell": stubborn}, stop_within=0.2) as tasks:
            await asyncio.sleep(0)  # the task starts
        elapsed = time.monotonic() - started
    assert swallowed.is_set()
    assert 0.2 <= elapsed < 1.0
    stuck = [entry for entry in logs if entry["event"] == "task_stuck"]
    assert [(entry["task"], entry["log_level"]) for entry in stuck] == [("doorbell", "error")]
    release.set()
    tasks["doorbell"].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(tasks["doorbell"], 5)  # nothing left pending
