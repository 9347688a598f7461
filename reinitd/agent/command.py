"""`reinitd agent`: the agent's command line, from parsed settings to an exit code."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import structlog

from reinitd import __version__
from reinitd import log as logsetup
from reinitd.agent import EXIT_NOT_WAITING, EXIT_OK, EXIT_USAGE
from reinitd.agent.client import reinit_events
from reinitd.agent.runner import Agent, AgentConfig, default_state_file
from reinitd.errors import ReinitError, SettingError

log = structlog.get_logger("reinitd.agent")


async def _until_signal(work: Coroutine[Any, Any, int]) -> int:
    """Run `work`; SIGINT/SIGTERM cancel it and the result is exit code 0."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        log.info("agent_stopping")
        return EXIT_OK


async def _print_first_event(url: str, token: str, ping_interval: float) -> int:
    try:
        async for event in reinit_events(url, token, ping_interval=ping_interval):
            print(event.to_json(), flush=True)
            return EXIT_OK
    except ReinitError as exc:
        log.error("agent_stopped", status=exc.status, message=exc.message, detail=exc.detail)
        return EXIT_NOT_WAITING
    return EXIT_OK


def main(_command: str, values: dict[str, Any]) -> int:
    logsetup.configure(values["log_level"], values["log_format"], sys.stderr)
    problems = []
    if not values["url"]:
        problems.append("--url (or REINITD_URL) is required")
    if not values["token"]:
        problems.append("--token (or REINITD_AGENT_TOKEN) is required: the agent token, a UUID")
    if not values["exec"] and not values["once"]:
        problems.append("give --exec CMD, or --once")
    if problems:
        print("reinitd agent: " + "; ".join(problems), file=sys.stderr)
        return EXIT_USAGE
    if values["once"]:
        return asyncio.run(
            _until_signal(
                _print_first_event(values["url"], values["token"], values["ping_interval"])
            )
        )
    config = AgentConfig(
        url=values["url"],
        token=values["token"],
        command=values["exec"],
        state_file=values["state_file"] or default_state_file(values["token"]),
        max_attempts=values["max_attempts"],
        ping_interval=values["ping_interval"],
    )
    try:
        agent = Agent(config)  # opens the state file: unwritable or corrupt is bad usage
    except SettingError as exc:
        print(f"reinitd agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.info(
        "agent_starting", version=__version__, url=values["url"], state_file=str(config.state_file)
    )
    return asyncio.run(_until_signal(agent.run()))
