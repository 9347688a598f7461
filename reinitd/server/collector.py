"""Garbage collection for a process that holds tens of thousands of long-lived streams.

CPython's cyclic collector rescans every live container on each full collection: at 10 000
idle streams that was a pause of up to 300 ms, and a claim written meanwhile was that late.
Objects that survived a full collection are long-lived, so they are moved out of its way
(`gc.freeze`): later collections only scan what is new. Frozen objects are still freed by
reference counting, and a closed stream leaves no cycle (tests/unit/test_collector.py); to
reclaim any cycle among frozen objects all the same, they are unfrozen and collected once
every RESCAN seconds. Every pause is measured (`reinitd_gc_pause_seconds{generation}`).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any, Final

import structlog

from reinitd.server import metrics

log = structlog.get_logger("reinitd.server.collector")

RESCAN: Final = 600.0
CHECK: Final = 1.0


class Collector:
    """Installed once per server process; `run` is its supervised task."""

    def __init__(self) -> None:
        self._started = 0.0
        self.full_collections = 0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        metrics.GC_PAUSE_SECONDS[generation].observe(time.perf_counter() - self._started)
        if generation == 2:
            self.full_collections += 1

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def settle(self) -> None:
        """Collect everything, then freeze what survived: the pause is paid now, once."""
        gc.unfreeze()
        started = time.perf_counter()
        collected = gc.collect()
        gc.freeze()
        log.debug(
            "gc_settled",
            collected=collected,
            frozen=gc.get_freeze_count(),
            pause_s=round(time.perf_counter() - started, 4),
        )

    async def run(self) -> None:
        seen = self.full_collections
        rescan_at = time.monotonic() + RESCAN
        while True:
            await asyncio.sleep(CHECK)
            if time.monotonic() >= rescan_at:
                self.settle()
                rescan_at = time.monotonic() + RESCAN
            elif self.full_collections != seen:
                gc.freeze()  # the survivors of the full collection that just ran
            seen = self.full_collections
