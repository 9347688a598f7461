"""Garbage collection for a process that holds tens of thousands of long-lived streams.

CPython's cyclic collector rescans every live container on each full collection: at 10 000
idle streams that was a pause of up to 300 ms, and a claim written meanwhile was that late.
Objects that survived a full collection are long-lived, so they are moved out of its way
(`gc.freeze`): later collections only scan what is new. Frozen objects are still freed by
reference counting, and a closed stream leaves no cycle (tests/unit/test_collector.py); to
reclaim any cycle among frozen objects all the same, they are unfrozen and collected once
every RESCAN seconds. After a storm of new streams, the first full collection would scan them
all at some random later moment; the collector pays that pause itself, as soon as the storm is
over. Every pause is measured (`reinitd_gc_pause_seconds{generation}`).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import time
from collections.abc import Callable
from typing import Any, Final

import structlog

from reinitd.server import metrics

log = structlog.get_logger("reinitd.server.collector")

RESCAN: Final = 600.0
CHECK: Final = 1.0
# New streams since the last settle that make the next quiet second settle again.
SETTLE_AFTER: Final = 1000


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), or nothing where there is no glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


trim_heap = _malloc_trim()


class GcPacer:
    """Installed once per server process; `run` is its supervised task."""

    def __init__(self, streams: Callable[[], int] = lambda: 0) -> None:
        """`streams`: how many streams were ever opened here (grows with every new one)."""
        self._streams = streams
        self._started = 0.0
        self.full_collections = 0
        self.freezes = 0  # survivors frozen after a full collection (not by a settle)

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

    def uninstall(self, *, exiting: bool = False) -> None:
        """Stop measuring pauses. `exiting`: the process ends next, so everything left is
        frozen rather than unfrozen: the interpreter's last full collection at exit then has
        nothing to scan (at 19 000 streams it cost 0.5 s of CPU, a third of the stop)."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if exiting:
            gc.freeze()
        else:
            gc.unfreeze()

    def freeze_survivors(self) -> None:
        """Collect everything, then freeze what survived: the pause is paid now, once. The
        heap the storm's requests used and freed goes back to the kernel."""
        gc.unfreeze()
        started = time.perf_counter()
        collected = gc.collect()
        gc.freeze()
        trim_heap()
        metrics.GC_SETTLES.inc()
        log.debug(
            "gc_settled",
            collected=collected,
            frozen=gc.get_freeze_count(),
            pause_s=round(time.perf_counter() - started, 4),
        )

    async def run(self) -> None:
        seen = self.full_collections
        rescan_at = time.monotonic() + RESCAN
        settled_at = previous = self._streams()
        while True:
            await asyncio.sleep(CHECK)
            streams = self._streams()
            storm_over = streams - settled_at >= SETTLE_AFTER and streams == previous
            if storm_over or time.monotonic() >= rescan_at:
                self.freeze_survivors()
                rescan_at, settled_at = time.monotonic() + RESCAN, streams
            elif self.full_collections != seen:
                # The survivors of the full collection that just ran, once the young garbage
                # made since is gone (a cycle frozen would live until the next rescan).
                gc.collect(1)
                gc.freeze()
                self.freezes += 1
            seen, previous = self.full_collections, streams
