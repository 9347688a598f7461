"""A compound fault for tests and the bench: PostgreSQL stopped (SIGSTOP) under a flood of
request heads, whole or split in two segments, with a liveness probe, a scrape and a late
agent watching."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from reinitd.server.embedded import Cluster
from reinitd.wire import REINIT_PATH, TOKEN_HEADER
from tests.support import ServerProcess

SEGMENT_GAP = 0.2  # seconds between the two segments of a split head (the fault's shape)
PROBE_EVERY = 0.2  # seconds between /healthz probes during the fault, as a kubelet's would


@dataclass
class Fault:
    """What was seen while the database was stalled under the flood."""

    probes: list[int | str] = field(default_factory=list)  # /healthz statuses
    answers: list[bytes] = field(default_factory=list)  # the flood's answers (head first)
    refused_early: int = 0  # flood heads answered 503 before the database came back
    peak_slots: float = 0.0  # reinitd_admission_slots: requests in flight and streams
    rss_before_kb: int = 0
    peak_rss_kb: int = 0
    agent_wait: float = math.inf  # from its first request to its stream
    after_resume: float = math.inf  # from the database's return to the agent's stream

    @property
    def statuses(self) -> list[int | str]:
        return sorted({status(answer) for answer in self.answers}, key=str)

    def summary(self) -> str:
        return (
            f"healthz {self.probes.count(200)}/{len(self.probes)} answered 200; peak slots "
            f"{self.peak_slots:.0f}; RSS {self.rss_before_kb} kB, peak "
            f"+{self.peak_rss_kb - self.rss_before_kb} kB; agent waited {self.agent_wait:.2f} s "
            f"({self.after_resume:.2f} s after the database came back); flood answers "
            f"{self.statuses}, {self.refused_early} refused before the database came back"
        )


@contextlib.asynccontextmanager
async def stalled(conn: asyncpg.Connection, postgres: Cluster) -> AsyncIterator[list[int]]:
    """Stop the backends of the server's pool and the postmaster (so that no new connection
    gets through either); continue them on the way out, whatever happens."""
    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = 'reinitd'")
    postmaster = int((postgres.datadir / "postmaster.pid").read_text().split()[0])
    pids = [postmaster, *(row["pid"] for row in rows)]
    stopped: list[int] = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield stopped
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def rss_kb(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise LookupError(field_name)


async def request(port: int, head: bytes, *, timeout: float = 30.0) -> bytes:
    """Send a request head on a new connection; whatever comes back before the server closes
    it (b"" for a connection closed or reset unanswered)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return b""
    try:
        writer.write(head)
        return await asyncio.wait_for(reader.read(), timeout)
    except OSError:
        return b""
    finally:
        writer.close()


def status(answer: bytes) -> int | str:
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else "no answer"


async def flood_one(port: int, split: bool, resumed: asyncio.Event, fault: Fault) -> None:
    """One flooding socket: a head with a random token, whole or in two segments."""
    head = (
        f"GET {REINIT_PATH}?wait=true HTTP/1.1\r\nHost: r\r\n{TOKEN_HEADER}: {uuid.uuid4()}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    answer = b""
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        if split:
            await loop.sock_sendall(sock, head[:30])
            await asyncio.sleep(SEGMENT_GAP)
            await loop.sock_sendall(sock, head[30:])
        else:
            await loop.sock_sendall(sock, head)
        async with asyncio.timeout(30):
            while b"\r\n\r\n" not in answer and (chunk := await loop.sock_recv(sock, 4096)):
                answer += chunk
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()
    if answer:
        fault.answers.append(answer)
        if not resumed.is_set() and status(answer) == 503:
            fault.refused_early += 1


async def watch(server: ServerProcess, over: asyncio.Event, fault: Fault) -> None:
    """Until `over`: /healthz on a fresh connection (a liveness probe), and the server's
    admission slots and memory, every PROBE_EVERY."""
    probe = b"GET /healthz HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    scrape = b"GET /metrics HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    while not over.is_set():
        fault.probes.append(status(await request(server.port, probe, timeout=5)))
        metrics = (await request(server.port, scrape, timeout=5)).partition(b"\r\n\r\n")[2]
        for family in text_string_to_metric_families(metrics.decode(errors="replace")):
            if family.name == "reinitd_admission_slots":
                fault.peak_slots = max(fault.peak_slots, family.samples[0].value)
        fault.peak_rss_kb = max(fault.peak_rss_kb, rss_kb(server.process.pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(over.wait(), PROBE_EVERY)


async def agent_stream(url: str, token: str) -> float:
    """A legitimate agent: retries after each 503 as its Retry-After says (and at once after a
    connection the server closed); returns when its stream opened."""
    async with aiohttp.ClientSession() as http:
        while True:
            retry_after = 0.1
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(
                    f"{url}{REINIT_PATH}",
                    params={"wait": "true"},
                    headers={TOKEN_HEADER: token},
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as response:
                    if response.status == 200:
                        return time.monotonic()
                    assert response.status == 503, await response.text()
                    retry_after = float(response.headers["Retry-After"])
            await asyncio.sleep(retry_after)  # the agent's own backoff, as the server asks


async def stall_under_flood(
    server: ServerProcess,
    conn: asyncpg.Connection,
    postgres: Cluster,
    token: str,
    *,
    flood: int,
    split_share: float,
    stall: float,
) -> Fault:
    """Stop PostgreSQL for `stall` seconds while `flood` sockets send heads at once (a share
    of them split in two), probing all along; an agent with `token` starts mid-stall."""
    fault, over, resumed = Fault(), asyncio.Event(), asyncio.Event()
    fault.rss_before_kb = rss_kb(server.process.pid)
    split = round(flood * split_share)
    watcher = asyncio.ensure_future(watch(server, over, fault))
    try:
        async with stalled(conn, postgres):
            stall_began = time.monotonic()
            flooding = asyncio.gather(
                *(flood_one(server.port, i < split, resumed, fault) for i in range(flood))
            )
            await asyncio.sleep(stall / 2)  # the fault goes on: the agent starts mid-stall
            agent_began = time.monotonic()
            agent = asyncio.ensure_future(agent_stream(server.url, token))
            await asyncio.sleep(stall - (agent_began - stall_began))  # the rest of the fault
        resumed_at = time.monotonic()
        resumed.set()
        with contextlib.suppress(TimeoutError):  # not in time: counted as never opened
            await asyncio.wait_for(asyncio.shield(agent), 30)
        await asyncio.wait_for(flooding, 60)
    finally:
        over.set()
        await watcher
    if agent.done():
        fault.agent_wait = agent.result() - agent_began
        fault.after_resume = agent.result() - resumed_at
    agent.cancel()
    return fault
