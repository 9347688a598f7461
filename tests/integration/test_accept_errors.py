"""The file limit reached anyway: failed accepts are counted and logged on both event loops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support import server_process

# Connections opened beyond the files left to the server: enough to fail accepts for sure.
CLIENTS = 64


async def accept_errors_total(url: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("reinitd_accept_errors_total "):
            return float(line.split()[1])
    raise AssertionError("reinitd_accept_errors_total is not exported")


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_out_of_files_is_counted_and_logged_once_on_either_loop(
    database_url: str, tmp_path: Path, event_loop: str
) -> None:
    """A server whose file limit is reached (here: lowered under it while it runs) counts the
    accepts that fail in reinitd_accept_errors_total and says so in one accept_failed line per
    interval, under uvloop (which drops such connections without a word) as under asyncio."""
    args = ("--event-loop", event_loop, "--max-connections", "10000")
    async with server_process(database_url, tmp_path, *args) as server:
        pid = server.process.pid
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        limit = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 8, limit[1]))
        started = time.monotonic()
        clients: list[socket.socket] = []
        try:
            for _ in range(CLIENTS):  # the kernel completes each handshake from the backlog
                clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            async with asyncio.timeout(15):
                while "accept_failed" not in [e["event"] for e in server.log_events()]:
                    await asyncio.sleep(0.05)
        finally:
            for client in clients:
                client.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
        async with asyncio.timeout(15):  # the server's files come back as it sees the closes
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    if await accept_errors_total(server.url) >= 1:
                        break
                await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        failed = [e for e in server.log_events() if e["event"] == "accept_failed"]
    assert 1 <= len(failed) <= 1 + int(elapsed // 10)  # one line per 10 s, whatever the rate
    assert failed[0]["level"] == "error"
    assert "Too many open files" in failed[0]["error"]
