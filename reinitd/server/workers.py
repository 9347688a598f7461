"""`serve --workers N`: N forked server processes sharing the port, watched by the parent,
which restarts a dead one (with backoff) and stops them all on the way out."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import structlog

from reinitd.backoff import backoff_delay
from reinitd.server.stopping import STOP_SIGNALS, Stop

if TYPE_CHECKING:
    from multiprocessing.context import ForkProcess

    from reinitd.settings import Settings

log = structlog.get_logger("reinitd.server.workers")


# A worker that ran this long before dying starts its next life with a short delay again.
STABLE_AFTER = 60.0


class _Slot:
    """One worker position: its current process, and how often it died in a row."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: ForkProcess | None = None
        self.started = 0.0
        self.deaths = 0
        self.restart_at = 0.0


def run_workers(settings: Settings, target: Callable[[], None], stop: Stop) -> int:
    context = multiprocessing.get_context("fork")
    slots = [_Slot(i) for i in range(settings.workers)]

    def start(slot: _Slot) -> int | None:
        process = context.Process(target=target, name=f"reinitd-worker-{slot.index}")
        # The child is born with the stop signals blocked, so that none lands in it before
        # it installed its own policy (they wait, and it unblocks them: `unblock_stop_signals`).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        slot.process, slot.started = process, time.monotonic()
        return process.pid

    log.info("workers_started", workers=len(slots), pids=[start(slot) for slot in slots])
    try:
        with _woken_by_signals() as woken:
            _watch(slots, start, stop, woken)
    except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
        _stop_all(slots, grace=0.0)
        raise
    return _stop_all(slots, settings.shutdown_timeout + 10)


@contextlib.contextmanager
def _woken_by_signals() -> Iterator[int]:
    """A file that becomes readable when a signal arrives (the interpreter writes a byte to
    it), so that the watch wakes at once on a stop, not at the end of its wait. The workers
    inherit it: they take it out before they install their own policy."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    try:
        yield read
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)


def _watch(
    slots: list[_Slot], start: Callable[[_Slot], int | None], stop: Stop, woken: int
) -> None:
    """Until asked to stop: restart the dead, after their backoff."""
    while stop.signal is None:
        now = time.monotonic()
        for slot in slots:
            if slot.process is None and now >= slot.restart_at:
                log.info("worker_restarted", worker=slot.index, pid=start(slot))
        alive = {s.process.sentinel: s for s in slots if s.process is not None}
        ready = multiprocessing.connection.wait([*alive, woken], timeout=0.5)
        if woken in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(woken, 512)
        if stop.requested:
            # Asked to stop: a worker that exited meanwhile (a stop signal sent to the whole
            # group, as systemd does) is stopping too, not dead.
            return
        for sentinel in ready:
            if sentinel == woken:
                continue
            slot = alive[sentinel]  # type: ignore[index]
            assert slot.process is not None
            slot.process.join()
            slot.deaths = 1 if time.monotonic() - slot.started > STABLE_AFTER else slot.deaths + 1
            delay = backoff_delay(slot.deaths, 0.5, 30.0)
            log.error(
                "worker_died",
                worker=slot.index,
                pid=slot.process.pid,
                exit_code=slot.process.exitcode,
                restart_in_s=round(delay, 2),
            )
            slot.process, slot.restart_at = None, time.monotonic() + delay


def _stop_all(slots: list[_Slot], grace: float) -> int:
    """SIGTERM every worker, wait up to `grace`, then kill what is left: whatever happens
    (another Ctrl-C included), no worker outlives the parent."""
    running = [s.process for s in slots if s.process is not None]
    for process in running:
        if process.pid is not None and process.exitcode is None:
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
    finally:
        for process in running:
            if process.exitcode is None:
                log.error("worker_killed", pid=process.pid, after_s=grace)
                process.kill()
                process.join()
    # -SIGTERM is a worker stopped by us, cleanly: not a failure.
    failed = [p.name for p in running if p.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        log.error("workers_failed", workers=failed)
    return 1 if failed else 0
