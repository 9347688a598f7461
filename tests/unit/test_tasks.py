"""Supervised background tasks: a crash is logged, and the task starts again."""

from __future__ import annotations

import asyncio

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
