"""What the benchmark reads about processes (/proc: CPU, RSS, PSS, open files) and the
statistics its report uses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children)
    return pids


def _sum_kb(pids: list[int], file: str, field: str) -> int:
    """Sum a `Field:  N kB` line of /proc/<pid>/<file> over processes (gone ones count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
    return total


def rss_kb(pids: list[int]) -> int:
    return _sum_kb(pids, "status", "VmRSS:")


def pss_kb(pids: list[int]) -> int:
    """Proportional set size: shared pages split among the processes sharing them."""
    return _sum_kb(pids, "smaps_rollup", "Pss:")


def cpu_seconds(pids: list[int], *, reaped: bool = False) -> float:
    """User plus system CPU time the processes used so far; with `reaped`, also their
    children's that exited and were waited for (for a whole tree whose members come and go,
    such as PostgreSQL's backends)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            if reaped:
                ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def open_files(pid: int) -> int:
    """File descriptors the process holds (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


async def settled(
    read: Callable[[], int],
    *,
    slack: int = 0,
    share: float = 0.0,
    at_most: float = 20.0,
    interval: float = 0.25,
    readings: int = 5,
) -> int:
    """A figure once it stopped moving: `readings` samples `interval` apart lie within
    max(`slack`, `share` of the last) of each other. After `at_most` seconds, the last
    sample as it is."""
    samples = [read()]
    deadline = time.monotonic() + at_most
    while time.monotonic() < deadline:
        await asyncio.sleep(interval)
        samples = [*samples[-(readings - 1) :], read()]
        spread = max(samples) - min(samples)
        if len(samples) == readings and spread <= max(slack, int(share * samples[-1])):
            break
    return samples[-1]


async def settled_kb(read: Callable[[], int]) -> int:
    """Memory (KB) once it stopped growing: within max(256 KB, 0.2 %) over a second."""
    return await settled(read, slack=256, share=0.002)


async def cpu_share(pids: Callable[[], list[int]], window: float) -> float:
    """The share of one core that the processes used over a measurement window of `window`
    seconds (a measurement, not a wait: the window is the figure's definition)."""
    before, started = cpu_seconds(pids()), time.monotonic()
    await asyncio.sleep(window)
    return (cpu_seconds(pids()) - before) / (time.monotonic() - started)


def median_range(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def kernel_kb() -> dict[str, int]:
    """The kernel's memory that sockets take (KB): the slab (socket, file, epoll and TCP
    structures; its unreclaimable part) from /proc/meminfo, and TCP's buffer pages from
    /proc/net/sockstat, with the TCP sockets in use."""
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Slab", "SUnreclaim"):
            out[name] = int(rest.split()[0])
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            out["tcp_inuse"] = int(values["inuse"])
            out["tcp_mem_kb"] = int(values["mem"]) * PAGE_KB
    return out
